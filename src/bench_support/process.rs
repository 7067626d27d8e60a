//! `Process` start-up: the `start_fork`, `start_forkserver` and `start_spawn` rows.

use crate::context::{StartMethod, get_context};
use crate::error::{Error, Result};
use crate::process::Process;

use super::median;

/// What the measured children run: nothing.
pub fn noop(_: ()) {}

/// Median seconds of `n` rounds of `Process::new(noop, ())` + `start` + `join` under `method`
/// (checking that each child exited with 0).
pub fn start_join(method: StartMethod, n: usize) -> Result<f64> {
    let ctx = get_context(method);
    let mut times = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let t = std::time::Instant::now();
        let mut p = Process::new(noop, ()).context(ctx);
        p.start()?;
        let status = p.join()?;
        times.push(t.elapsed().as_secs_f64());
        if !status.success() {
            return Err(Error::state(format!(
                "a no-op child started with {method} ended with {status}"
            )));
        }
    }
    Ok(median(times))
}
