//! Measurements shared by `benches/` and the `multiproc bench` command. Not a stable API.

pub mod sync;

pub use sync::value_lock;
