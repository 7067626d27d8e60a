//! Seed 001's `check_prime` with an input and an output `Queue`, written the right way.
//!
//! The Python tutorial's workers loop on `if qin.empty(): break`, which races: a worker may
//! see the queue non-empty, lose the last number to another worker, and block in `get`
//! forever (or quit before the parent has put everything). Here the parent puts one `None`
//! sentinel per worker after the numbers, and each worker stops when it takes one. The parent
//! collects exactly one result per number, then joins the workers.
//!
//! Run: `cargo run --example check_prime_queue`

use std::time::{Duration, Instant};

use multiproc::{Process, Queue};

/// A number to check, or `None`: the sentinel that tells a worker to stop.
type Job = Option<u64>;
/// `(worker pid, number, is_prime)`.
type Answer = (u32, u64, bool);

/// What each worker runs: take numbers until the sentinel, answer each one.
fn check_prime((qin, qout): (Queue<Job>, Queue<Answer>)) {
    while let Some(num) = qin.get().expect("input queue") {
        std::thread::sleep(Duration::from_millis(100)); // the seed's `time.sleep(0.1)`
        let is_prime = num >= 2 && (2..num).all(|i| num % i != 0);
        qout.put((std::process::id(), num, is_prime))
            .expect("output queue");
    }
}

fn main() -> multiproc::Result<()> {
    multiproc::init();
    let tic = Instant::now();
    let numbers = [222377u64, 3334, 2212, 3345, 23441, 454577, 341737, 565633];
    let in_qu: Queue<Job> = Queue::new()?;
    let out_qu: Queue<Answer> = Queue::new()?;
    for &n in &numbers {
        in_qu.put(Some(n))?;
    }

    // Use 5 workers to work on the list of numbers; one sentinel each.
    let mut workers: Vec<Process> = (0..5)
        .map(|_| Process::new(check_prime, (in_qu.clone(), out_qu.clone())))
        .collect();
    for w in &mut workers {
        w.start()?;
    }
    for _ in &workers {
        in_qu.put(None)?;
    }

    // One answer per number: no `empty()` polling needed, and nothing can be missed.
    let results: Vec<Answer> = numbers
        .iter()
        .map(|_| out_qu.get_timeout(Duration::from_secs(60)))
        .collect::<multiproc::Result<_>>()?;
    for w in &workers {
        w.join()?;
    }
    println!("All workers have finished working");
    for (pid, num, is_prime) in &results {
        let word = if *is_prime { "True" } else { "False" };
        println!("Worker with process id {pid} says {num} is {word} prime");
    }
    let mut primes: Vec<u64> = results.iter().filter(|r| r.2).map(|r| r.1).collect();
    primes.sort();
    assert_eq!(primes, [454577], "the seed's answer");
    println!("Total time taken: {:?}", tic.elapsed());
    Ok(())
}
