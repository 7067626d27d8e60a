//! Seed 000: primes in [100000000, 101000000) by trial division, sequentially and with a pool
//! of workers, and which worker processes did the work.
//!
//! `cargo run --release --example primes_parallel [FROM TO WORKERS]`

use std::collections::BTreeSet;
use std::time::Instant;

use multiproc::Pool;

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    if n % 2 == 0 {
        return n == 2;
    }
    let mut d = 3;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 2;
    }
    true
}

/// Primes in one block, and the pid of the process that counted them.
fn primes_in((lo, hi): (u64, u64)) -> (Vec<u64>, u32) {
    (
        (lo..hi).filter(|&n| is_prime(n)).collect(),
        std::process::id(),
    )
}

fn main() {
    multiproc::init();
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (from, to) = (
        args.first().copied().unwrap_or(100_000_000),
        args.get(1).copied().unwrap_or(101_000_000),
    );
    let workers = args
        .get(2)
        .map_or_else(multiproc::cpu_count, |&w| w as usize);

    let t = Instant::now();
    let (seq, _) = primes_in((from, to));
    let seq_time = t.elapsed();
    println!("primes_sequential: {} primes in {seq_time:.2?}", seq.len());

    // The range cut into blocks: the pool maps the blocks over its workers.
    let pool = Pool::new(workers).expect("pool");
    let step = (to - from).div_ceil(64).max(1);
    let blocks: Vec<(u64, u64)> = (from..to)
        .step_by(step as usize)
        .map(|a| (a, (a + step).min(to)))
        .collect();
    let t = Instant::now();
    let outputs = pool.map(primes_in, blocks).expect("map");
    let par_time = t.elapsed();
    let primes: Vec<u64> = outputs
        .iter()
        .flat_map(|(p, _)| p.iter().copied())
        .collect();
    let pids: BTreeSet<u32> = outputs.iter().map(|(_, pid)| *pid).collect();
    assert_eq!(primes, seq);
    println!(
        "primes_parallel: {} primes in {par_time:.2?} with {workers} workers (speedup {:.2}x)",
        primes.len(),
        seq_time.as_secs_f64() / par_time.as_secs_f64()
    );
    println!(
        "main process {}, worker processes that did the work: {pids:?}",
        std::process::id()
    );
    pool.close();
    pool.join().expect("join");
}
