//! Seed 001, section "Lock": workers that print through a shared lock so that their lines never
//! interleave.
//!
//! Python:
//! ```python
//! def printer(num, lock):
//!     with lock:
//!         print("Worker {} (process id {}) holds the lock".format(num, os.getpid()))
//!         print("Worker {} releases it".format(num))
//!
//! lock = multiprocessing.Lock()
//! workers = [multiprocessing.Process(target=printer, args=(i, lock)) for i in range(5)]
//! for w in workers: w.start()
//! for w in workers: w.join()
//! print("All workers have finished working")
//! ```
//!
//! Run: `cargo run --example lock`.

use std::io::Write;

use multiproc::{Lock, Process};

fn printer((num, lock): (u32, Lock)) {
    // The guard is the `with lock:` block: released when it goes out of scope.
    let _held = lock.acquire().expect("lock");
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "Worker {num} (process id {}) holds the lock",
        std::process::id()
    )
    .unwrap();
    writeln!(out, "Worker {num} releases it").unwrap();
    out.flush().unwrap();
}

fn main() -> multiproc::Result<()> {
    multiproc::init();
    let lock = Lock::new()?;
    let mut workers: Vec<Process> = (0..5)
        .map(|i| Process::new(printer, (i, lock.clone())))
        .collect();
    for w in &mut workers {
        w.start()?;
    }
    for w in &workers {
        w.join()?;
    }
    println!("All workers have finished working");
    Ok(())
}
