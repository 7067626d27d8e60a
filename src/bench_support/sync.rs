//! The `value_lock` row: two processes each add 1 to a locked `Value` `n` times, as
//! `reference/python-bench/f_value.py` does with `with v.get_lock(): v.value += 1`.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sharedctypes::Value;
use crate::synchronize::{Event, Semaphore};
use crate::{Process, StartMethod, get_context};

fn add_locked((v, n, ready, go): (Value<u64>, u64, Semaphore, Event)) {
    ready.release().expect("unbounded semaphore");
    go.wait();
    for _ in 0..n {
        *v.lock().expect("value lock") += 1;
    }
}

/// Time for 2 processes x `n` locked increments of one shared `Value<u64>`, from the moment
/// both children are started and waiting until both are joined (process start-up excluded, as
/// in the Python script). Fails if the total is not exactly `2 * n`.
///
/// Increments per second: `2 * n / elapsed`.
pub fn value_lock(n: u64) -> Result<Duration> {
    let ctx = get_context(StartMethod::Fork);
    let v = Value::new(0u64)?;
    let ready = Semaphore::new(0)?;
    let go = Event::new()?;
    let mut ps = Vec::new();
    for _ in 0..2 {
        let mut p =
            Process::new(add_locked, (v.clone(), n, ready.clone(), go.clone())).context(ctx);
        p.start()?;
        ps.push(p);
    }
    for _ in 0..2 {
        ready.acquire_timeout(Duration::from_secs(30))?.forget();
    }
    let t = Instant::now();
    go.set();
    for p in &ps {
        let st = p.join()?;
        if !st.success() {
            return Err(Error::state(format!("value_lock child ended with {st}")));
        }
    }
    let dt = t.elapsed();
    let total = v.get()?;
    if total != 2 * n {
        return Err(Error::state(format!(
            "value_lock lost increments: {total} != {}",
            2 * n
        )));
    }
    Ok(dt)
}
