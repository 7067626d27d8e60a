//! Process-shared synchronization primitives, as in Python's `multiprocessing.synchronize`:
//! [`Lock`], [`RLock`], [`Semaphore`], [`BoundedSemaphore`], [`Event`], [`Condition`],
//! [`Barrier`].
//!
//! Every object lives in its own anonymous shared-memory segment (a memfd: nothing to leak in
//! /dev/shm) and is a cheap handle: `clone` it to share it between threads, pass it as an
//! argument to a [`Process`](crate::Process) or [`spawn`](crate::spawn) to share it with another
//! process (its descriptor travels with the arguments, under every start method).
//!
//! * `Lock`/`RLock` are robust pthread mutexes: a holder that dies is reported to the next
//!   acquirer as [`LockError::OwnerDied`], with the guard (see `README.md` beside this file).
//! * The others are futexes over atomics. They have no owner, so a process that dies holding a
//!   semaphore permit does not give it back (as in Python): every wait has a timeout variant.
//! * Every blocking call has a `_timeout` form; a [`Barrier`] breaks when a wait times out, so a
//!   dead participant cannot hang the others forever.
//!
//! ```
//! use multiproc::{Event, Lock, Semaphore};
//! let lock = Lock::new().unwrap();
//! let sem = Semaphore::new(2).unwrap();
//! let ev = Event::new().unwrap();
//! {
//!     let _g = lock.acquire().unwrap();
//!     let _p = sem.acquire();
//!     ev.set();
//! }
//! assert!(ev.is_set());
//! assert_eq!(sem.get_value(), 2);
//! ```

mod barrier;
mod condition;
mod event;
mod lock;
mod semaphore;

use std::time::{Duration, Instant};

pub use barrier::Barrier;
pub use condition::Condition;
pub use event::Event;
pub use lock::{Lock, LockError, LockGuard, LockResult, RLock, RLockGuard};
pub use semaphore::{BoundedSemaphore, Semaphore, SemaphoreGuard};

use crate::context::Context;
use crate::error::Result;

/// What is left of a bounded wait.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Deadline(Option<Instant>);

impl Deadline {
    /// A deadline `timeout` from now (`None`: never; an overflowing timeout: never).
    pub(crate) fn after(timeout: Option<Duration>) -> Deadline {
        Deadline(timeout.and_then(|t| Instant::now().checked_add(t)))
    }

    /// `Some(remaining)` (`Some(None)` = unbounded), or `None` once expired.
    pub(crate) fn left(&self) -> Option<Option<Duration>> {
        match self.0 {
            None => Some(None),
            Some(d) => {
                let now = Instant::now();
                if now >= d { None } else { Some(Some(d - now)) }
            }
        }
    }
}

/// Constructors, as Python's `ctx.Lock()`, `ctx.Semaphore(n)`, ... The start method does not
/// matter to these objects: every handle works with children of every method.
impl Context {
    /// A new [`Lock`].
    pub fn lock(&self) -> Result<Lock> {
        Lock::new()
    }
    /// A new [`RLock`].
    pub fn rlock(&self) -> Result<RLock> {
        RLock::new()
    }
    /// A new [`Semaphore`] with `value` permits.
    pub fn semaphore(&self, value: u32) -> Result<Semaphore> {
        Semaphore::new(value)
    }
    /// A new [`BoundedSemaphore`] with `value` permits, never more.
    pub fn bounded_semaphore(&self, value: u32) -> Result<BoundedSemaphore> {
        BoundedSemaphore::new(value)
    }
    /// A new, clear [`Event`].
    pub fn event(&self) -> Result<Event> {
        Event::new()
    }
    /// A new [`Condition`] with its own [`Lock`].
    pub fn condition(&self) -> Result<Condition> {
        Condition::new()
    }
    /// A new [`Barrier`] for `parties` participants.
    pub fn barrier(&self, parties: u32) -> Result<Barrier> {
        Barrier::new(parties)
    }
}
