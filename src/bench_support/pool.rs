//! Pool rows of `multiproc bench`: `primes`, `map_default`, `map_chunk1`, `apply_rtt`,
//! `worker_rss`, and the raw pipe ping-pong `apply_rtt` is judged against.
//!
//! Each function builds a warm pool (workers started and used once) before it measures, as the
//! Python scripts in `shared/reference/python-bench/` do, and reports the median of 3 runs.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use crate::Pool;
use crate::platform::{self, Forked};

/// Trial division, as the seed's `is_prime`.
pub fn is_prime(n: u64) -> bool {
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

/// Number of primes in `[lo, hi)`.
pub fn count_primes((lo, hi): (u64, u64)) -> u64 {
    (lo..hi).filter(|&n| is_prime(n)).count() as u64
}

/// `[lo, hi)` cut into `k` nearly equal blocks (Python's `blocks`).
pub fn blocks(lo: u64, hi: u64, k: u64) -> Vec<(u64, u64)> {
    let step = (hi - lo).div_ceil(k.max(1)).max(1);
    (lo..hi)
        .step_by(step as usize)
        .map(|a| (a, (a + step).min(hi)))
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn sq(x: u64) -> u64 {
    x.wrapping_mul(x)
}

/// Counts primes in `[from, to)` sequentially and on a warm pool of `workers` (64 blocks per
/// worker, chunk size 1). Returns `(count, sequential seconds, parallel seconds)`, each the
/// median of 3 runs.
pub fn primes(from: u64, to: u64, workers: usize) -> (u64, f64, f64) {
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
    let pool = Pool::new(workers).expect("pool");
    let nblocks = (64 * workers) as u64;
    let bl = blocks(from, to, nblocks);
    pool.map_chunksize(count_primes, blocks(0, 1000, nblocks), 1)
        .expect("warm-up");
    let par = median(
        (0..3)
            .map(|_| {
                let t = Instant::now();
                let c: u64 = pool
                    .map_chunksize(count_primes, bl.clone(), 1)
                    .expect("map")
                    .iter()
                    .sum();
                let dt = t.elapsed().as_secs_f64();
                assert_eq!(c, count, "parallel count differs");
                dt
            })
            .collect(),
    );
    (count, seq, par)
}

fn map_rate(n: u64, chunksize: Option<usize>) -> f64 {
    let pool = Pool::new(2).expect("pool");
    pool.map(sq, 0..1000u64).expect("warm-up");
    median(
        (0..4)
            .map(|_| {
                let t = Instant::now();
                let r = match chunksize {
                    None => pool.map(sq, 0..n),
                    Some(c) => pool.map_chunksize(sq, 0..n, c),
                }
                .expect("map");
                let dt = t.elapsed().as_secs_f64();
                assert_eq!(r.len() as u64, n);
                assert_eq!(r[n as usize - 1], sq(n - 1));
                n as f64 / dt
            })
            .skip(1)
            .collect(),
    )
}

/// `Pool(2).map(x*x)` over `n` ints with Python's default chunk size: tasks per second.
pub fn map_default(n: u64) -> f64 {
    map_rate(n, None)
}

/// `Pool(2).map(x*x)` over `n` ints with chunk size 1: tasks per second.
pub fn map_chunk1(n: u64) -> f64 {
    map_rate(n, Some(1))
}

/// `apply_async(x*x).get()` on a warm `Pool(2)`: median seconds per round trip over `iters`
/// calls (median of 3 series).
pub fn apply_rtt(iters: usize) -> f64 {
    let pool = Pool::new(2).expect("pool");
    for i in 0..1000u64 {
        pool.apply_async(sq, i).expect("apply").get().expect("get");
    }
    median(
        (0..3)
            .map(|_| {
                let mut lat = Vec::with_capacity(iters);
                for i in 0..iters as u64 {
                    let t = Instant::now();
                    let r = pool.apply_async(sq, i).expect("apply").get().expect("get");
                    lat.push(t.elapsed().as_secs_f64());
                    debug_assert_eq!(r, sq(i));
                }
                median(lat)
            })
            .collect(),
    )
}

/// The raw limit for `apply_rtt`: a 1-byte ping-pong over two pipes with a forked child,
/// median seconds per round trip over `iters` (median of 3 series).
pub fn pipe_rtt(iters: usize) -> f64 {
    median((0..3).map(|_| pipe_rtt_once(iters)).collect())
}

fn pipe_rtt_once(iters: usize) -> f64 {
    let (a_r, a_w) = platform::pipe().expect("pipe");
    let (b_r, b_w) = platform::pipe().expect("pipe");
    let total = iters + 100;
    // SAFETY: the child only reads and writes pipes and exits with _exit.
    match unsafe { platform::fork() }.expect("fork") {
        Forked::Child => {
            let mut b = [0u8; 1];
            for _ in 0..total {
                if !matches!(platform::read(a_r.as_fd(), &mut b), Ok(1)) {
                    break;
                }
                let _ = platform::write(b_w.as_fd(), &b);
            }
            platform::exit_now(0)
        }
        Forked::Parent(pid) => {
            drop(a_r);
            drop(b_w);
            let mut lat = Vec::with_capacity(total);
            let mut b = [0u8; 1];
            for _ in 0..total {
                let t = Instant::now();
                platform::write(a_w.as_fd(), b"x").expect("write");
                platform::read(b_r.as_fd(), &mut b).expect("read");
                lat.push(t.elapsed().as_secs_f64());
            }
            platform::reap_pid(pid);
            median(lat.split_off(100))
        }
    }
}

/// Resident memory of an idle pool worker, MiB (`/proc/PID/statm`), after it ran one task.
pub fn worker_rss() -> f64 {
    let pool = Pool::new(1).expect("pool");
    pool.apply(sq, 3).expect("apply");
    std::thread::sleep(Duration::from_millis(50));
    let pid = pool.worker_pids()[0];
    platform::rss_bytes(pid).expect("statm") as f64 / (1024.0 * 1024.0)
}
