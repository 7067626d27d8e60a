//! `Event`: a futex over a shared flag.
//!
//! Payload: `flag` (the futex word, 0 or 1) and `waiters`. `set` stores the flag before reading
//! `waiters`, a waiter increments `waiters` before the kernel re-checks the flag (all `SeqCst`),
//! so a `set` never misses a sleeper; it wakes them all.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Deadline;
use crate::error::Result;
use crate::heap::{self, Segment, kind};
use crate::platform;

const LEN: usize = 64;

/// A process-shared flag that processes can wait for (Python's `multiprocessing.Event`).
///
/// ```
/// use std::time::Duration;
/// let ev = multiproc::Event::new().unwrap();
/// assert!(!ev.wait_timeout(Duration::from_millis(1)));
/// ev.set();
/// assert!(ev.is_set());
/// ev.wait(); // returns at once
/// ev.clear();
/// assert!(!ev.is_set());
/// ```
#[derive(Clone)]
pub struct Event {
    seg: Arc<Segment>,
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("set", &self.is_set())
            .finish()
    }
}

impl Event {
    /// A new event, not set.
    pub fn new() -> Result<Event> {
        Ok(Event {
            seg: Arc::new(Segment::create(kind::EVENT, LEN)?),
        })
    }

    fn word(&self, off: usize) -> &AtomicU32 {
        // SAFETY: off + 4 <= LEN, 4-aligned; only accessed atomically.
        unsafe { &*(self.seg.payload().add(off) as *const AtomicU32) }
    }

    fn flag(&self) -> &AtomicU32 {
        self.word(0)
    }

    fn waiters(&self) -> &AtomicU32 {
        self.word(4)
    }

    /// Whether the flag is set.
    pub fn is_set(&self) -> bool {
        self.flag().load(Ordering::Acquire) != 0
    }

    /// Sets the flag and wakes every waiter.
    pub fn set(&self) {
        self.flag().store(1, Ordering::SeqCst);
        if self.waiters().load(Ordering::SeqCst) > 0 {
            platform::futex_wake(self.flag(), u32::MAX);
        }
    }

    /// Clears the flag.
    pub fn clear(&self) {
        self.flag().store(0, Ordering::SeqCst);
    }

    /// Waits until the flag is set.
    pub fn wait(&self) {
        self.wait_opt(None);
    }

    /// Waits at most `timeout` for the flag; returns whether it is set (Python's `wait(t)`).
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.wait_opt(Some(timeout))
    }

    fn wait_opt(&self, timeout: Option<Duration>) -> bool {
        let deadline = Deadline::after(timeout);
        loop {
            if self.is_set() {
                return true;
            }
            let Some(left) = deadline.left() else {
                return false;
            };
            self.waiters().fetch_add(1, Ordering::SeqCst);
            if self.flag().load(Ordering::SeqCst) == 0 {
                platform::futex_wait(self.flag(), 0, left);
            }
            self.waiters().fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Serialize for Event {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.seg.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let seg = heap::deserialize_segment(d, kind::EVENT, Some(LEN))?;
        Ok(Event { seg: Arc::new(seg) })
    }
}
