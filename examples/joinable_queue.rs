//! A worker pool fed through a `JoinableQueue`, as in Python's documentation: daemon workers
//! take tasks forever and call `task_done()` after each; the parent waits with `join()` until
//! every task put has been done, then reads the results. The daemon workers are terminated
//! when the parent exits.
//!
//! Run: `cargo run --example joinable_queue`

use std::time::Duration;

use multiproc::{JoinableQueue, Process, Queue};

/// A worker: square numbers forever, marking each task done once its result is out.
fn worker((tasks, results): (JoinableQueue<u64>, Queue<(u64, u64)>)) {
    loop {
        let n = tasks.get().expect("task queue");
        results.put((n, n * n)).expect("result queue");
        tasks.task_done().expect("one task_done per task");
    }
}

fn main() -> multiproc::Result<()> {
    multiproc::init();
    let tasks: JoinableQueue<u64> = JoinableQueue::new()?;
    let results: Queue<(u64, u64)> = Queue::new()?;
    let mut workers: Vec<Process> = (0..multiproc::process_cpu_count().max(2))
        .map(|i| {
            Process::new(worker, (tasks.clone(), results.clone()))
                .name(format!("worker-{i}"))
                .daemon(true)
        })
        .collect();
    for w in &mut workers {
        w.start()?;
    }

    for n in 1..=100 {
        tasks.put(n)?;
    }
    // Block until every task has been taken *and* marked done (bounded, to be safe).
    tasks.join_timeout(Duration::from_secs(60))?;
    println!("all {} tasks done by {} workers", 100, workers.len());

    // Every result is already in the queue: each task_done came after its put.
    let mut total = 0;
    for _ in 1..=100 {
        let (_n, sq) = results.try_get()?;
        total += sq;
    }
    assert_eq!(total, (1..=100u64).map(|n| n * n).sum::<u64>());
    println!("sum of squares 1..=100 = {total}");
    Ok(())
}
