//! # multiproc
//!
//! Python's `multiprocessing`, done properly in Rust: run Rust functions in parallel across
//! operating-system processes, with the `Process`, `Pool`, `Queue`, `Pipe`, shared memory, locks
//! and managers that Python programmers know, and what Python never got right: a pool that
//! cannot hang when a worker dies, per-task timeouts, locks that survive a dead holder.
//!
//! ```
//! fn square(x: u64) -> u64 {
//!     x * x
//! }
//! multiproc::init();
//! let h = multiproc::spawn(square, 12).unwrap();
//! assert_eq!(h.join().unwrap(), 144);
//! ```
//!
//! ## Start-up
//! Call [`init`] as the first line of `main`. Children started with [`StartMethod::Spawn`] and
//! the fork server enter before `main` (from the executable's `.init_array`), so `main` never runs
//! twice and test binaries work without `init`; `init` starts the fork server early, while the
//! program still has one thread.
//!
//! ## Layout
//! One module per idea, as CPython's `Lib/multiprocessing/`: [`process`], [`context`],
//! [`connection`], and the platform seam in `platform/` (the only place with system calls).

#![warn(missing_docs)]

#[doc(hidden)]
pub mod bench_support;
mod codec;
pub mod connection;
pub mod context;
pub mod dummy;
pub mod error;
mod frame;
mod function;
mod heap;
pub mod managers;
mod platform;
pub mod pool;
pub mod process;
pub mod queues;
pub mod shared_memory;
pub mod sharedctypes;
mod start;
pub mod synchronize;

pub use connection::{Connection, Pipe};
pub use context::{
    Context, StartMethod, get_all_start_methods, get_context, get_start_method, set_start_method,
};
pub use error::{Error, ExitStatus, Result};
pub use function::build_id;
pub use pool::{AsyncResult, IMap, Pool, PoolBuilder};
pub use process::{
    ChildSummary, CurrentProcess, JoinHandle, ParentProcess, Process, Worker, active_children,
    cpu_count, current_process, parent_process, process_cpu_count, spawn, spawn_in,
};
pub use queues::{JoinableQueue, Queue, SimpleQueue};
pub use serde_bytes;
pub use shared_memory::SharedMemory;
pub use sharedctypes::{Array, ArrayGuard, Pod, RawArray, RawValue, Value, ValueGuard};
pub use start::set_executable;
pub use synchronize::{
    Barrier, BoundedSemaphore, Condition, Event, Lock, LockError, LockGuard, LockResult, RLock,
    RLockGuard, Semaphore, SemaphoreGuard,
};

/// Call first in `main`. In a child process started by `multiproc` it does that child's job and
/// never returns (normally that already happened before `main`); in the main process it starts
/// the fork server while the program still has a single thread, if the default start method is
/// [`StartMethod::ForkServer`]. Calling it again is harmless.
///
/// ```
/// multiproc::init();
/// ```
pub fn init() {
    start::enter_if_child();
    if get_start_method() == StartMethod::ForkServer {
        if let Err(e) = start::ensure_forkserver() {
            tracing::warn!("could not start the fork server now ({e}); will retry on first use");
        }
    }
}

/// Pid of the fork server this process started, if any (for tests and diagnostics).
#[doc(hidden)]
pub fn forkserver_pid() -> Option<u32> {
    start::forkserver_pid()
}
