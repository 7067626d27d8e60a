//! Pool rows of `multiproc bench`: `primes`, `map_default`, `map_chunk1`, `apply_rtt`,
//! `worker_rss`, measured as `bench/python/mp_pool.py` and `mp_primes.py` measure Python.
//!
//! Each function builds a warm pool (workers started and used once) before it measures, as the
//! Python scripts do, so worker start-up is not in the figure. The workload is
//! [`super::workloads`]; `apply_rtt`'s raw limit is [`super::raw::pipe_rtt`].

use std::time::Instant;

use super::median;
use super::workloads::{blocks, count_primes};
use crate::Pool;
use crate::error::{Error, Result};
use crate::platform;

fn sq(x: u64) -> u64 {
    x.wrapping_mul(x)
}

/// A `Pool(workers)` that has run one small map, so every worker is up.
pub fn warm_pool(workers: usize) -> Result<Pool> {
    let pool = Pool::new(workers.max(1))?;
    pool.map(sq, 0..100u64)?;
    Ok(pool)
}

/// Seconds of counting the primes in `[from, to)` on `pool`, cut in `nblocks` blocks mapped
/// with chunk size 1 (as `mp_primes.py`); also the count.
pub fn primes_on(pool: &Pool, from: u64, to: u64, nblocks: usize) -> Result<(u64, f64)> {
    let bl = blocks(from, to, nblocks);
    let t = Instant::now();
    let count = pool.map_chunksize(count_primes, bl, 1)?.iter().sum();
    Ok((count, t.elapsed().as_secs_f64()))
}

/// Counts primes in `[from, to)` sequentially and on a warm pool of `workers` (8 blocks per
/// worker, chunk size 1). Returns `(count, sequential seconds, parallel seconds)`, each the
/// median of 3 runs.
pub fn primes(from: u64, to: u64, workers: usize) -> Result<(u64, f64, f64)> {
    let workers = workers.max(1);
    let mut count = 0;
    let seq = median(
        (0..3)
            .map(|_| {
                let t = Instant::now();
                count = count_primes((from, to));
                t.elapsed().as_secs_f64()
            })
            .collect(),
    );
    let pool = warm_pool(workers)?;
    let mut par = Vec::new();
    for _ in 0..3 {
        let (c, dt) = primes_on(&pool, from, to, 8 * workers)?;
        if c != count {
            return Err(Error::state(format!(
                "parallel count {c}, sequential {count}"
            )));
        }
        par.push(dt);
    }
    Ok((count, seq, median(par)))
}

fn map_rate(n: u64, chunksize: Option<usize>) -> Result<f64> {
    let pool = warm_pool(2)?;
    let mut rates = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let r = match chunksize {
            None => pool.map(sq, 0..n),
            Some(c) => pool.map_chunksize(sq, 0..n, c),
        }?;
        let dt = t.elapsed().as_secs_f64();
        if r.len() as u64 != n || r.last() != n.checked_sub(1).map(sq).as_ref() {
            return Err(Error::state("map: wrong results"));
        }
        rates.push(n as f64 / dt);
    }
    Ok(median(rates))
}

/// `Pool(2).map(x*x)` over `n` ints with Python's default chunk size: tasks per second
/// (median of 3 maps on a warm pool).
pub fn map_default(n: u64) -> Result<f64> {
    map_rate(n.max(1), None)
}

/// `Pool(2).map(x*x)` over `n` ints with chunk size 1: tasks per second (median of 3).
pub fn map_chunk1(n: u64) -> Result<f64> {
    map_rate(n.max(1), Some(1))
}

/// `apply_async(x*x).get()` on a warm `Pool(2)`: the median seconds per round trip over
/// `iters` calls (after 100 unmeasured ones).
pub fn apply_rtt(iters: usize) -> Result<f64> {
    let pool = warm_pool(2)?;
    for i in 0..100u64 {
        pool.apply_async(sq, i)?.get()?;
    }
    let mut lat = Vec::with_capacity(iters.max(1));
    for i in 0..iters.max(1) as u64 {
        let t = Instant::now();
        let r = pool.apply_async(sq, i)?.get()?;
        lat.push(t.elapsed().as_secs_f64());
        if r != sq(i) {
            return Err(Error::state("apply: wrong result"));
        }
    }
    Ok(median(lat))
}

/// Resident memory of an idle pool worker, MiB (`/proc/PID/statm`), after it ran one task.
pub fn worker_rss() -> Result<f64> {
    idle_worker_mib(platform::rss_bytes, "/proc/PID/statm")
}

/// Memory only an idle pool worker maps (unique set size: private pages), MiB
/// (`/proc/PID/smaps_rollup`), after it ran one task. What each further worker costs.
pub fn worker_uss() -> Result<f64> {
    idle_worker_mib(platform::private_bytes, "/proc/PID/smaps_rollup")
}

fn idle_worker_mib(bytes: fn(u32) -> Option<u64>, source: &str) -> Result<f64> {
    let pool = Pool::new(1)?;
    pool.apply(sq, 3)?;
    let pid = pool.worker_pids()[0];
    let b = bytes(pid).ok_or_else(|| Error::state(format!("no {source}")))?;
    Ok(b as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_rows_run_and_count_right() {
        crate::init();
        let (c, s, p) = primes(0, 1000, 2).unwrap();
        assert_eq!(c, 168);
        assert!(s >= 0.0 && p > 0.0);
        assert!(map_default(1000).unwrap() > 0.0);
        assert!(map_chunk1(100).unwrap() > 0.0);
        assert!(apply_rtt(10).unwrap() > 0.0);
        assert!(worker_rss().unwrap() > 0.0);
        assert!(worker_uss().unwrap() > 0.0);
    }
}
