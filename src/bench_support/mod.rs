//! Workloads the `multiproc bench` command and `benches/` measure. Not a public API.

pub mod pool;
