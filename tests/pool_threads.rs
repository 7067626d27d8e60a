//! A pool outlives the thread that created it (or replaced its workers), whatever the start
//! method: workers are daemons (they die with the process), not with a thread.

use multiproc::{Pool, StartMethod, get_context};

fn sq(x: u64) -> u64 {
    x * x
}
fn die(_: ()) -> u8 {
    std::process::abort()
}

#[test]
fn pool_made_in_a_thread_that_exits_keeps_its_workers() {
    for m in StartMethod::ALL {
        let pool: Pool = std::thread::spawn(move || get_context(m).pool(2).unwrap())
            .join()
            .unwrap();
        let before = pool.worker_pids();
        // Replace a worker from another short-lived thread, too.
        std::thread::scope(|s| {
            s.spawn(|| assert!(pool.apply(die, ()).is_err()));
        });
        let after = pool.worker_pids();
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(pool.map(sq, 0..20u64).unwrap().len(), 20, "{m}");
        assert_eq!(
            pool.worker_pids(),
            after,
            "{m}: workers were lost when a thread exited"
        );
        assert_ne!(before, after, "{m}");
    }
}
