//! Measurement functions shared by the `multiproc bench` command and the criterion benches.
//!
//! Not part of the public API (hidden from the docs, no stability promise): each submodule
//! measures one family of rows of the benchmark suite, the crate's side and the raw limit (the
//! same operation with bare system calls). The Python side lives in the command-line program.
//!
//! Conventions: every function returns one figure in SI units (seconds per operation,
//! operations or bytes per second), the median of its samples, so a single slow run on a noisy
//! VM does not decide a row; callers take [`median3`] of such figures and convert to the row's
//! unit.

pub mod managers;
pub mod pipe;
pub mod pool;
pub mod process;
pub mod queue;
pub mod raw;
pub mod sync;
pub mod workloads;

pub use queue::{queue_large, queue_small, queue_transfer};
pub use sync::value_lock;

use std::time::Instant;

/// Runs `f` once as a warm-up, then three times, and returns the median of the three.
pub fn median3(mut f: impl FnMut() -> f64) -> f64 {
    f();
    let mut v = [f(), f(), f()];
    v.sort_by(f64::total_cmp);
    v[1]
}

/// The median of `v` (the upper one of the two middle values for an even length); `NaN` when
/// `v` is empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds `f` takes, and what it returns.
pub fn timed<R>(f: impl FnOnce() -> R) -> (f64, R) {
    let t = Instant::now();
    let r = f();
    (t.elapsed().as_secs_f64(), r)
}

/// The median time in seconds of `n` calls of `f`, each timed on its own.
pub fn median_each(n: usize, mut f: impl FnMut()) -> f64 {
    median(
        (0..n.max(1))
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_picks_the_middle() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 3.0);
        assert!(median(vec![]).is_nan());
        let mut calls = 0;
        let m = median3(|| {
            calls += 1;
            [100.0, 5.0, 1.0, 3.0][calls - 1]
        });
        assert_eq!((m, calls), (3.0, 4));
    }
}
