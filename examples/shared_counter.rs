//! A shared counter: why `value += 1` needs the lock held across the read and the write.
//!
//! Python (`reference/python-bench/f_value.py`):
//! ```python
//! def inc_racy(v):
//!     for _ in range(N): v.value += 1          # get, then set: two separate locked steps
//! def inc_locked(v):
//!     for _ in range(N):
//!         with v.get_lock(): v.value += 1      # one locked read-modify-write
//! ```
//!
//! Run: `cargo run --release --example shared_counter`.

use multiproc::{Event, Process, Value};

const N: u64 = 200_000;

/// `v.value += 1` without holding the lock: `get` and `set` each take it, but another process
/// can update the value between them, and its increment is overwritten.
fn inc_racy((v, go): (Value<u64>, Event)) {
    go.wait();
    for _ in 0..N {
        let x = v.get().expect("get");
        v.set(x + 1).expect("set");
    }
}

/// `with v.get_lock(): v.value += 1`: the guard holds the lock for the whole update.
fn inc_locked((v, go): (Value<u64>, Event)) {
    go.wait();
    for _ in 0..N {
        *v.lock().expect("lock") += 1;
    }
}

fn run<F>(f: F, name: &str) -> multiproc::Result<()>
where
    F: Fn((Value<u64>, Event)) + Copy + Send + 'static,
{
    let v = Value::new(0u64)?;
    let go = Event::new()?;
    let mut ps: Vec<Process> = Vec::new();
    for _ in 0..2 {
        let mut p = Process::new(f, (v.clone(), go.clone()));
        p.start()?;
        ps.push(p);
    }
    go.set();
    for p in &ps {
        p.join()?;
    }
    let total = v.get()?;
    println!(
        "{name:>6}: total {total} (expected {}): {} increments lost",
        2 * N,
        2 * N - total
    );
    Ok(())
}

fn main() -> multiproc::Result<()> {
    multiproc::init();
    run(inc_racy, "racy")?;
    run(inc_locked, "locked")?;
    Ok(())
}
