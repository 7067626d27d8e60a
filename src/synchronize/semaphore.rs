//! `Semaphore` and `BoundedSemaphore`: a futex over a shared counter.
//!
//! Payload: `value` (the futex word), `waiters` (how many may sleep: a releaser skips the wake
//! system call when it is zero), `max` (`u32::MAX` for an unbounded semaphore).
//! Lost wake-ups cannot happen: a waiter increments `waiters` before the kernel re-checks
//! `value == 0`, a releaser increments `value` before reading `waiters`, all `SeqCst`. A
//! release wakes every sleeper (they race for the permits), so a woken waiter that dies cannot
//! strand a permit while others sleep.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Deadline;
use crate::error::{Error, Result};
use crate::heap::{self, Segment, kind};
use crate::platform;

const LEN: usize = 64;

/// A process-shared counting semaphore (Python's `multiprocessing.Semaphore`).
///
/// [`acquire`](Semaphore::acquire) takes a permit and returns a [`SemaphoreGuard`] that gives
/// it back when dropped; [`SemaphoreGuard::forget`] keeps it taken, for a permit that another
/// process will [`release`](Semaphore::release). A semaphore has no owner: a process that dies
/// with a permit does not return it, so bound waits with
/// [`acquire_timeout`](Semaphore::acquire_timeout) where that matters.
///
/// ```
/// use std::time::Duration;
/// let s = multiproc::Semaphore::new(1).unwrap();
/// let p = s.acquire();
/// assert!(s.acquire_timeout(Duration::from_millis(1)).is_err());
/// drop(p);
/// assert_eq!(s.get_value(), 1);
/// ```
#[derive(Clone)]
pub struct Semaphore {
    seg: Arc<Segment>,
}

impl fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Semaphore")
            .field("value", &self.get_value())
            .finish()
    }
}

impl Semaphore {
    /// A semaphore with `value` permits.
    pub fn new(value: u32) -> Result<Semaphore> {
        Semaphore::with_max(value, u32::MAX)
    }

    fn with_max(value: u32, max: u32) -> Result<Semaphore> {
        if value == u32::MAX {
            return Err(Error::arg("semaphore value too large"));
        }
        let seg = Segment::create(kind::SEMAPHORE, LEN)?;
        let s = Semaphore { seg: Arc::new(seg) };
        s.word(8).store(max, Ordering::Relaxed);
        s.word(0).store(value, Ordering::Release);
        Ok(s)
    }

    fn word(&self, off: usize) -> &AtomicU32 {
        // SAFETY: off + 4 <= LEN, 4-aligned in a 64-aligned payload; only accessed atomically.
        unsafe { &*(self.seg.payload().add(off) as *const AtomicU32) }
    }

    fn value(&self) -> &AtomicU32 {
        self.word(0)
    }

    fn waiters(&self) -> &AtomicU32 {
        self.word(4)
    }

    fn max(&self) -> u32 {
        self.word(8).load(Ordering::Relaxed)
    }

    fn try_take(&self) -> bool {
        let v = self.value();
        let mut cur = v.load(Ordering::Relaxed);
        while cur > 0 {
            match v.compare_exchange_weak(cur, cur - 1, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(x) => cur = x,
            }
        }
        false
    }

    fn take(&self, timeout: Option<Duration>) -> bool {
        let deadline = Deadline::after(timeout);
        loop {
            if self.try_take() {
                return true;
            }
            let Some(left) = deadline.left() else {
                return false;
            };
            self.waiters().fetch_add(1, Ordering::SeqCst);
            if self.value().load(Ordering::SeqCst) == 0 {
                platform::futex_wait(self.value(), 0, left);
            }
            self.waiters().fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Takes a permit, waiting as long as it takes.
    pub fn acquire(&self) -> SemaphoreGuard<'_> {
        self.take(None);
        SemaphoreGuard { sem: self }
    }

    /// Takes a permit, waiting at most `timeout`; `Err(Error::Timeout)` after.
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<SemaphoreGuard<'_>> {
        if self.take(Some(timeout)) {
            Ok(SemaphoreGuard { sem: self })
        } else {
            Err(Error::Timeout)
        }
    }

    /// Takes a permit if one is free right now.
    pub fn try_acquire(&self) -> Option<SemaphoreGuard<'_>> {
        self.try_take().then_some(SemaphoreGuard { sem: self })
    }

    /// Gives a permit back (Python's `release()`, also from a process that never acquired).
    /// For a [`BoundedSemaphore`], `Err(Error::InvalidState)` if that would exceed its
    /// initial value (Python raises `ValueError`).
    pub fn release(&self) -> Result<()> {
        let v = self.value();
        let max = self.max();
        let mut cur = v.load(Ordering::Relaxed);
        loop {
            if !release_allowed(cur, max) {
                return Err(Error::state("semaphore released too many times"));
            }
            match v.compare_exchange_weak(cur, cur + 1, Ordering::SeqCst, Ordering::Relaxed) {
                Ok(_) => break,
                Err(x) => cur = x,
            }
        }
        if self.waiters().load(Ordering::SeqCst) > 0 {
            platform::futex_wake(v, u32::MAX);
        }
        Ok(())
    }

    /// The number of free permits now (Python's `get_value()`).
    pub fn get_value(&self) -> u32 {
        self.value().load(Ordering::Relaxed)
    }
}

/// Whether a release may raise the count from `cur` under the bound `max` (pure).
pub(crate) fn release_allowed(cur: u32, max: u32) -> bool {
    cur < max && cur < u32::MAX - 1
}

/// A permit of a [`Semaphore`]; gives it back when dropped.
#[must_use = "the permit is returned as soon as the guard is dropped"]
#[derive(Debug)]
pub struct SemaphoreGuard<'a> {
    sem: &'a Semaphore,
}

impl SemaphoreGuard<'_> {
    /// Keeps the permit taken (someone will [`Semaphore::release`] it).
    pub fn forget(self) {
        std::mem::forget(self);
    }
}

impl Drop for SemaphoreGuard<'_> {
    fn drop(&mut self) {
        let _ = self.sem.release();
    }
}

impl Serialize for Semaphore {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.seg.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Semaphore {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let seg = heap::deserialize_segment(d, kind::SEMAPHORE, Some(LEN))?;
        Ok(Semaphore { seg: Arc::new(seg) })
    }
}

/// A semaphore that refuses to be released above its initial value (Python's
/// `multiprocessing.BoundedSemaphore`). It derefs to [`Semaphore`] for everything else.
///
/// ```
/// let s = multiproc::BoundedSemaphore::new(1).unwrap();
/// assert!(s.release().is_err()); // already at its bound
/// s.acquire().forget();
/// assert!(s.release().is_ok());
/// ```
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BoundedSemaphore(Semaphore);

impl BoundedSemaphore {
    /// A semaphore with `value` permits and never more.
    pub fn new(value: u32) -> Result<BoundedSemaphore> {
        Ok(BoundedSemaphore(Semaphore::with_max(value, value)?))
    }
}

impl std::ops::Deref for BoundedSemaphore {
    type Target = Semaphore;
    fn deref(&self) -> &Semaphore {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_bound() {
        assert!(release_allowed(0, 1));
        assert!(!release_allowed(1, 1));
        assert!(release_allowed(5, u32::MAX));
        assert!(!release_allowed(u32::MAX - 1, u32::MAX));
    }
}
