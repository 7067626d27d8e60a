//! Measurement helpers for `multiproc bench` and the criterion benches. Not a stable API: the
//! functions here exist so the command-line benchmark and `cargo bench` measure the same thing.

pub mod queue;

pub use queue::{memcpy_bandwidth, queue_large, queue_small, queue_transfer};
