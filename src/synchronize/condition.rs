//! `Condition`: a [`Lock`] plus a futex sequence number.
//!
//! Payload: `seq` (the futex word) and `waiters`. A waiter reads `seq` while it holds the lock,
//! releases the lock, and sleeps while `seq` is unchanged; `notify` bumps `seq` then wakes. A
//! notify that happens after the waiter released the lock therefore changes `seq` before the
//! kernel's check, and is never lost. Wake-ups may be spurious (a notify wakes the waiters that
//! had not gone to sleep yet as well): use [`Condition::wait_for`] with a predicate, as with
//! `std::sync::Condvar`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Deadline;
use super::lock::{Lock, LockGuard, LockResult};
use crate::error::{Error, Result};
use crate::heap::{self, Segment, kind};
use crate::platform::{self, RobustLock};

const LEN: usize = 64;

/// A process-shared condition variable (Python's `multiprocessing.Condition`), tied to a
/// [`Lock`].
///
/// Acquire it with [`acquire`](Condition::acquire) (a [`LockGuard`] of its lock), then
/// [`wait`](Condition::wait) with that guard: the lock is released while waiting and held again
/// on return. If the lock's holder died meanwhile, the wait returns `Err(Error::OwnerDied)`
/// with the guard still held and marked (see [`LockError`](crate::LockError)).
///
/// Python's default lock for a `Condition` is an `RLock`; here it is a [`Lock`], because
/// waiting while holding a re-entrant lock several levels deep cannot release it.
///
/// ```
/// use std::time::Duration;
/// let c = multiproc::Condition::new().unwrap();
/// let mut g = c.acquire().unwrap();
/// // Nobody notifies: the wait times out and the lock is held again.
/// assert!(!c.wait_timeout(&mut g, Duration::from_millis(1)).unwrap());
/// c.notify_all();
/// ```
#[derive(Clone)]
pub struct Condition {
    lock: Lock,
    seg: Arc<Segment>,
}

impl fmt::Debug for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Condition")
            .field("lock", &self.lock)
            .finish()
    }
}

impl Condition {
    /// A condition with a new lock of its own.
    pub fn new() -> Result<Condition> {
        Condition::with_lock(Lock::new()?)
    }

    /// A condition over an existing lock (Python's `Condition(lock)`).
    pub fn with_lock(lock: Lock) -> Result<Condition> {
        Ok(Condition {
            lock,
            seg: Arc::new(Segment::create(kind::CONDITION, LEN)?),
        })
    }

    /// Its lock.
    pub fn get_lock(&self) -> &Lock {
        &self.lock
    }

    /// Acquires its lock.
    pub fn acquire(&self) -> LockResult<LockGuard<'_>> {
        self.lock.acquire()
    }

    /// Acquires its lock, waiting at most `timeout`.
    pub fn acquire_timeout(&self, timeout: Duration) -> LockResult<LockGuard<'_>> {
        self.lock.acquire_timeout(timeout)
    }

    fn word(&self, off: usize) -> &AtomicU32 {
        // SAFETY: off + 4 <= LEN, 4-aligned; only accessed atomically.
        unsafe { &*(self.seg.payload().add(off) as *const AtomicU32) }
    }

    fn seq(&self) -> &AtomicU32 {
        self.word(0)
    }

    fn waiters(&self) -> &AtomicU32 {
        self.word(4)
    }

    /// Releases the lock, waits for a notify, and takes the lock again.
    pub fn wait(&self, guard: &mut LockGuard<'_>) -> Result<()> {
        self.wait_opt(guard, None).map(|_| ())
    }

    /// As [`wait`](Condition::wait) for at most `timeout`: `Ok(false)` if it timed out (the lock
    /// is held again either way).
    pub fn wait_timeout(&self, guard: &mut LockGuard<'_>, timeout: Duration) -> Result<bool> {
        self.wait_opt(guard, Some(timeout))
    }

    /// Waits until `pred()` is true (checked with the lock held), at most `timeout` (`None`:
    /// forever). Returns the last value of `pred()` (Python's `wait_for`).
    pub fn wait_for(
        &self,
        guard: &mut LockGuard<'_>,
        timeout: Option<Duration>,
        mut pred: impl FnMut() -> bool,
    ) -> Result<bool> {
        let deadline = Deadline::after(timeout);
        loop {
            if pred() {
                return Ok(true);
            }
            match deadline.left() {
                None => return Ok(false),
                Some(left) => {
                    self.wait_opt(guard, left)?;
                }
            }
        }
    }

    fn wait_opt(&self, guard: &mut LockGuard<'_>, timeout: Option<Duration>) -> Result<bool> {
        if !std::ptr::eq(guard.core, &*self.lock.core) {
            return Err(Error::arg("this guard does not hold the condition's lock"));
        }
        let seq = self.seq().load(Ordering::SeqCst);
        self.waiters().fetch_add(1, Ordering::SeqCst);
        guard.core.unlock();
        let notified = platform::futex_wait(self.seq(), seq, timeout);
        self.waiters().fetch_sub(1, Ordering::SeqCst);
        // Relocking has no timeout: the guard must hold the lock again when we return, and a
        // dead holder cannot block us (robust mutex).
        let r = guard.core.raw().lock(None)?;
        let died = guard.core.after_lock(r)?;
        if r == RobustLock::OwnerDied {
            guard.owner_died = died;
            return Err(Error::OwnerDied);
        }
        Ok(notified)
    }

    /// Wakes up to `n` waiters (possibly more: wake-ups may be spurious).
    pub fn notify(&self, n: u32) {
        self.seq().fetch_add(1, Ordering::SeqCst);
        if self.waiters().load(Ordering::SeqCst) > 0 {
            platform::futex_wake(self.seq(), n);
        }
    }

    /// Wakes one waiter.
    pub fn notify_one(&self) {
        self.notify(1)
    }

    /// Wakes every waiter.
    pub fn notify_all(&self) {
        self.notify(u32::MAX)
    }
}

impl Serialize for Condition {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        (&self.lock, &*self.seg).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Condition {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let (lock, fd) = <(Lock, heap::RawSegmentFd)>::deserialize(d)?;
        let seg =
            Segment::open(fd.0, kind::CONDITION, Some(LEN)).map_err(serde::de::Error::custom)?;
        Ok(Condition {
            lock,
            seg: Arc::new(seg),
        })
    }
}
