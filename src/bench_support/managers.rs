//! The `manager_dict` row of `multiproc bench`, measured as `bench/python/mp_manager.py`
//! measures Python: a child process does `n` sets then `n` gets on a manager's dict and times
//! itself (the manager's and the child's start are not measured).

use std::time::Instant;

use crate::error::{Error, Result};
use crate::managers::{DictProxy, Manager};

/// The child: `n` sets then `n` gets, operations per second of the two together.
fn dict_child((d, n): (DictProxy<u64, u64>, u64)) -> std::result::Result<f64, String> {
    let t = Instant::now();
    for i in 0..n {
        d.set(&i, &i).map_err(|e| e.to_string())?;
    }
    let mut sum = 0;
    for i in 0..n {
        sum += d.get(&i).map_err(|e| e.to_string())?.unwrap_or(0);
    }
    let dt = t.elapsed().as_secs_f64();
    if sum != n * n.saturating_sub(1) / 2 {
        return Err(format!("dict gave back {sum}"));
    }
    Ok((2 * n) as f64 / dt)
}

/// Operations per second of `n` `set`s then `n` `get`s on a `Manager` dict from a child.
pub fn manager_dict(n: u64) -> Result<f64> {
    let m = Manager::start()?;
    let d = m.dict::<u64, u64>()?;
    crate::spawn(dict_child, (d, n.max(1)))?
        .join()?
        .map_err(Error::state)
}

#[cfg(test)]
mod tests {
    #[test]
    fn manager_dict_round_trips_every_key() {
        crate::init();
        assert!(super::manager_dict(50).unwrap() > 0.0);
    }
}
