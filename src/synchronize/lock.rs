//! `Lock` and `RLock`: robust, process-shared pthread mutexes in a memfd segment.
//!
//! See `README.md` beside this file for the owner-died protocol.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};
use crate::heap::{self, Segment, kind};
use crate::platform::{RawRobustMutex, RobustLock};

// ---------------------------------------------------------------------------------------------
// The result of acquiring a lock
// ---------------------------------------------------------------------------------------------

/// Why an acquire did not simply succeed.
///
/// `OwnerDied` is not a failure to acquire: the caller **holds the lock** through the guard
/// inside, exactly as after a normal acquire, but the previous holder died while holding it, so
/// what the lock protects may be half-updated. Repair it, then call the guard's
/// `mark_consistent()`; until someone does, every later acquire (in any process) also reports
/// `OwnerDied`, so a dead holder can never go unnoticed. Dropping the guard without marking the
/// state consistent just releases the lock.
///
/// With `?` in a function returning [`crate::Result`], a `LockError` becomes
/// [`Error::OwnerDied`] (the guard is dropped, the lock released and still marked) or the
/// underlying error.
///
/// ```
/// use multiproc::{Lock, LockError};
/// let lock = Lock::new().unwrap();
/// let guard = match lock.acquire() {
///     Ok(g) => g,
///     Err(LockError::OwnerDied(mut g)) => {
///         // repair the protected state here, then:
///         g.mark_consistent();
///         g
///     }
///     Err(LockError::Failed(e)) => panic!("{e}"),
/// };
/// assert!(!guard.owner_died());
/// ```
pub enum LockError<G> {
    /// The previous holder died holding the lock; the guard is yours (see above).
    OwnerDied(G),
    /// The lock was not acquired: [`Error::Timeout`], or a misuse such as locking a [`Lock`]
    /// twice from the same thread ([`Error::InvalidState`]).
    Failed(Error),
}

/// The result of acquiring a process-shared lock: the guard, or a [`LockError`].
pub type LockResult<G> = std::result::Result<G, LockError<G>>;

impl<G> LockError<G> {
    /// The guard if the lock is held (owner died), otherwise the error.
    pub fn into_guard(self) -> Result<G> {
        match self {
            LockError::OwnerDied(g) => Ok(g),
            LockError::Failed(e) => Err(e),
        }
    }

    /// Applies `f` to the guard inside, if any.
    pub fn map<H>(self, f: impl FnOnce(G) -> H) -> LockError<H> {
        match self {
            LockError::OwnerDied(g) => LockError::OwnerDied(f(g)),
            LockError::Failed(e) => LockError::Failed(e),
        }
    }

    /// True for [`LockError::OwnerDied`].
    pub fn is_owner_died(&self) -> bool {
        matches!(self, LockError::OwnerDied(_))
    }
}

impl<G> fmt::Debug for LockError<G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockError::OwnerDied(_) => f.write_str("OwnerDied(..)"),
            LockError::Failed(e) => f.debug_tuple("Failed").field(e).finish(),
        }
    }
}

impl<G> fmt::Display for LockError<G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockError::OwnerDied(_) => fmt::Display::fmt(&Error::OwnerDied, f),
            LockError::Failed(e) => fmt::Display::fmt(e, f),
        }
    }
}

impl<G> std::error::Error for LockError<G> {}

impl<G> From<LockError<G>> for Error {
    fn from(e: LockError<G>) -> Error {
        match e {
            LockError::OwnerDied(_) => Error::OwnerDied,
            LockError::Failed(e) => e,
        }
    }
}

impl<G> From<Error> for LockError<G> {
    fn from(e: Error) -> Self {
        LockError::Failed(e)
    }
}

// ---------------------------------------------------------------------------------------------
// The shared core: a robust mutex and a sticky owner-died mark
// ---------------------------------------------------------------------------------------------

const MARK_OFFSET: usize = 64;
const CORE_LEN: usize = 128;
const _: () = assert!(std::mem::size_of::<RawRobustMutex>() <= MARK_OFFSET);

/// Rounds of spinning before sleeping in the kernel: a locked increment lasts nanoseconds, so
/// waiting a little in user space avoids a futex sleep and wake-up (two system calls) per
/// contended acquire. Each round reads the lock word (no cache-line write) and tries the lock
/// only when it looks free. Tuned with `benches/sync.rs` (`value_lock`) on 2 vCPUs: 32 x 16
/// pauses (about 1-3 us) gave the best median; much longer spins lose when the machine is busy.
const SPIN: u32 = 32;
const SPIN_PAUSE: u32 = 16;

/// A robust mutex in its own segment, plus the sticky "a holder died" mark.
#[derive(Debug)]
pub(crate) struct RobustCore {
    seg: Segment,
}

impl RobustCore {
    fn create(recursive: bool) -> Result<RobustCore> {
        let k = if recursive { kind::RLOCK } else { kind::LOCK };
        let seg = Segment::create(k, CORE_LEN)?;
        // SAFETY: the payload is 64-byte aligned, CORE_LEN >= size_of::<RawRobustMutex>(), and
        // nobody else has the segment yet.
        unsafe { RawRobustMutex::init_at(seg.payload().cast(), recursive)? };
        Ok(RobustCore { seg })
    }

    fn open(seg: Segment) -> RobustCore {
        RobustCore { seg }
    }

    pub(crate) fn raw(&self) -> &RawRobustMutex {
        // SAFETY: the payload holds a mutex initialised by `create` (checked by the segment's
        // kind on open) and lives as long as the segment.
        unsafe { &*(self.seg.payload() as *const RawRobustMutex) }
    }

    fn mark(&self) -> &AtomicU32 {
        // SAFETY: MARK_OFFSET + 4 <= CORE_LEN, aligned; only accessed atomically.
        unsafe { &*(self.seg.payload().add(MARK_OFFSET) as *const AtomicU32) }
    }

    /// Locks, waiting at most `timeout`. `Ok(true)` when the lock is held but a holder died
    /// (now or earlier, unrepaired).
    pub(crate) fn lock(&self, timeout: Option<Duration>) -> Result<bool> {
        let raw = self.raw();
        let mut got = None;
        if timeout != Some(Duration::ZERO) {
            for _ in 0..SPIN {
                if !raw.is_locked_hint() {
                    if let Some(r) = raw.try_lock()? {
                        got = Some(r);
                        break;
                    }
                }
                for _ in 0..SPIN_PAUSE {
                    std::hint::spin_loop();
                }
            }
        }
        let r = match got {
            Some(r) => r,
            None if timeout == Some(Duration::ZERO) => raw.try_lock()?.ok_or(Error::Timeout)?,
            None => raw.lock(timeout)?,
        };
        self.after_lock(r)
    }

    /// Bookkeeping after the raw mutex was taken: a fresh owner death makes the mutex
    /// consistent at once (so the pthread object never becomes unusable) and sets the sticky
    /// mark, which stays until a guard's `mark_consistent`.
    pub(crate) fn after_lock(&self, r: RobustLock) -> Result<bool> {
        if r == RobustLock::OwnerDied {
            self.mark().store(1, Ordering::SeqCst);
            if let Err(e) = self.raw().make_consistent() {
                let _ = self.raw().unlock();
                return Err(e);
            }
        }
        Ok(self.mark().load(Ordering::SeqCst) != 0)
    }

    pub(crate) fn unlock(&self) {
        if let Err(e) = self.raw().unlock() {
            tracing::error!("multiproc: unlock failed: {e}");
        }
    }

    fn clear_mark(&self) {
        self.mark().store(0, Ordering::SeqCst);
    }

    fn marked(&self) -> bool {
        self.mark().load(Ordering::SeqCst) != 0
    }
}

// ---------------------------------------------------------------------------------------------
// Lock
// ---------------------------------------------------------------------------------------------

/// A process-shared mutual-exclusion lock (Python's `multiprocessing.Lock`), held through an
/// RAII [`LockGuard`].
///
/// It is a robust pthread mutex in anonymous shared memory: if a process dies holding it (even
/// by `SIGKILL`), the next `acquire` gets [`LockError::OwnerDied`] with the guard, instead of
/// waiting forever. Cloning gives another handle to the same lock; a handle passes to other
/// processes as an argument (its memory travels as a file descriptor).
///
/// Unlike Python's `Lock`, it has an owner: the thread that acquired it releases it (when the
/// guard drops), and acquiring it twice from one thread is an error
/// ([`Error::InvalidState`]), not a deadlock. Use [`RLock`] for re-entrant locking and a
/// [`Semaphore`](crate::Semaphore) for a permit released by another process.
///
/// ```
/// use std::time::Duration;
/// let lock = multiproc::Lock::new().unwrap();
/// {
///     let _held = lock.acquire().unwrap();
///     // Held here: another acquire times out.
///     let other = lock.clone();
///     std::thread::spawn(move || {
///         assert!(other.acquire_timeout(Duration::from_millis(10)).is_err());
///     })
///     .join()
///     .unwrap();
/// }
/// assert!(lock.try_acquire().is_ok());
/// ```
#[derive(Clone)]
pub struct Lock {
    pub(crate) core: Arc<RobustCore>,
}

impl fmt::Debug for Lock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lock")
            .field("owner_died", &self.core.marked())
            .finish()
    }
}

impl Lock {
    /// A new, unlocked lock.
    pub fn new() -> Result<Lock> {
        Ok(Lock {
            core: Arc::new(RobustCore::create(false)?),
        })
    }

    /// Acquires, waiting as long as it takes (a dead holder cannot make it wait forever).
    pub fn acquire(&self) -> LockResult<LockGuard<'_>> {
        self.acquire_opt(None)
    }

    /// Acquires, waiting at most `timeout`: `Err(LockError::Failed(Error::Timeout))` after.
    pub fn acquire_timeout(&self, timeout: Duration) -> LockResult<LockGuard<'_>> {
        self.acquire_opt(Some(timeout))
    }

    /// Acquires if free right now; `Err(LockError::Failed(Error::Timeout))` if held.
    pub fn try_acquire(&self) -> LockResult<LockGuard<'_>> {
        self.acquire_opt(Some(Duration::ZERO))
    }

    pub(crate) fn acquire_opt(&self, timeout: Option<Duration>) -> LockResult<LockGuard<'_>> {
        let died = self.core.lock(timeout)?;
        let g = LockGuard {
            core: &self.core,
            owner_died: died,
            _not_send: PhantomData,
        };
        if died {
            Err(LockError::OwnerDied(g))
        } else {
            Ok(g)
        }
    }

    /// True while a holder's death has not been repaired (see [`LockError`]).
    pub fn owner_died(&self) -> bool {
        self.core.marked()
    }
}

/// Proof that this thread holds a [`Lock`]; releases it when dropped.
///
/// Not `Send`: a pthread mutex must be released by the thread that acquired it.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct LockGuard<'a> {
    pub(crate) core: &'a RobustCore,
    pub(crate) owner_died: bool,
    _not_send: PhantomData<*const ()>,
}

impl LockGuard<'_> {
    /// True if a previous holder died and the protected state has not been repaired yet.
    pub fn owner_died(&self) -> bool {
        self.owner_died
    }

    /// Declares the protected state repaired: later acquires succeed normally again.
    pub fn mark_consistent(&mut self) {
        self.core.clear_mark();
        self.owner_died = false;
    }
}

impl fmt::Debug for LockGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("owner_died", &self.owner_died)
            .finish()
    }
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        self.core.unlock();
    }
}

impl Serialize for Lock {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.core.seg.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Lock {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let seg = heap::deserialize_segment(d, kind::LOCK, Some(CORE_LEN))?;
        Ok(Lock {
            core: Arc::new(RobustCore::open(seg)),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// RLock
// ---------------------------------------------------------------------------------------------

/// A process-shared re-entrant lock (Python's `multiprocessing.RLock`): the thread holding it
/// may acquire it again; it is released when every guard is dropped. A holder's death is
/// reported as for [`Lock`] ([`LockError::OwnerDied`]).
///
/// ```
/// let r = multiproc::RLock::new().unwrap();
/// let a = r.acquire().unwrap();
/// let b = r.acquire().unwrap(); // same thread: fine
/// drop((b, a));
/// ```
#[derive(Clone)]
pub struct RLock {
    core: Arc<RobustCore>,
}

impl fmt::Debug for RLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RLock")
            .field("owner_died", &self.core.marked())
            .finish()
    }
}

impl RLock {
    /// A new, unlocked re-entrant lock.
    pub fn new() -> Result<RLock> {
        Ok(RLock {
            core: Arc::new(RobustCore::create(true)?),
        })
    }

    /// Acquires (again, if this thread holds it), waiting as long as it takes.
    pub fn acquire(&self) -> LockResult<RLockGuard<'_>> {
        self.acquire_opt(None)
    }

    /// Acquires, waiting at most `timeout`.
    pub fn acquire_timeout(&self, timeout: Duration) -> LockResult<RLockGuard<'_>> {
        self.acquire_opt(Some(timeout))
    }

    /// Acquires if free (or held by this thread) right now.
    pub fn try_acquire(&self) -> LockResult<RLockGuard<'_>> {
        self.acquire_opt(Some(Duration::ZERO))
    }

    fn acquire_opt(&self, timeout: Option<Duration>) -> LockResult<RLockGuard<'_>> {
        let died = self.core.lock(timeout)?;
        let g = RLockGuard(LockGuard {
            core: &self.core,
            owner_died: died,
            _not_send: PhantomData,
        });
        if died {
            Err(LockError::OwnerDied(g))
        } else {
            Ok(g)
        }
    }

    /// True while a holder's death has not been repaired.
    pub fn owner_died(&self) -> bool {
        self.core.marked()
    }
}

/// One level of holding an [`RLock`]; dropping it releases that level.
#[must_use = "the lock is released as soon as the guard is dropped"]
#[derive(Debug)]
pub struct RLockGuard<'a>(LockGuard<'a>);

impl RLockGuard<'_> {
    /// True if a previous holder died and the protected state has not been repaired yet.
    pub fn owner_died(&self) -> bool {
        self.0.owner_died()
    }

    /// Declares the protected state repaired.
    pub fn mark_consistent(&mut self) {
        self.0.mark_consistent()
    }
}

impl Serialize for RLock {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.core.seg.serialize(s)
    }
}

impl<'de> Deserialize<'de> for RLock {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let seg = heap::deserialize_segment(d, kind::RLOCK, Some(CORE_LEN))?;
        Ok(RLock {
            core: Arc::new(RobustCore::open(seg)),
        })
    }
}
