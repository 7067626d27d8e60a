//! The shared-memory ring behind every queue: a memfd holding a header and a byte ring of
//! variable-size records, guarded by a robust process-shared mutex with an undo log. The
//! invariants are written down in `README.md` beside this file; read it before changing
//! anything here.

use std::cell::Cell;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::platform::{self, Mapping, RawRobustMutex, RobustLock};

const MAGIC: u64 = u64::from_le_bytes(*b"mpqring1");
/// Slots for operations that copy outside the main lock (one per concurrent large op).
const NSLOTS: usize = 32;
/// Undo-log entries; no critical section logs more than a dozen mutations.
const LOG_CAP: usize = 32;
/// Bytes of a record header: `state: u32`, `len: u32`.
const REC_HDR: u64 = 8;
/// Payloads up to this size are copied while holding the main lock; larger ones reserve their
/// record under the lock and copy outside it, holding an operation slot.
pub(crate) const INLINE_MAX: usize = 16 * 1024;
/// Marks a slot with no operation in flight.
const NO_POS: u64 = u64::MAX;
/// Marks a 32-bit field in an undo-log key.
const KEY_U32: u64 = 1 << 63;
/// How long a blocked caller sleeps before it looks again for dead peers (bounded recovery).
const WAIT_SLICE: Duration = Duration::from_millis(50);
/// How long to busy-wait before sleeping on a futex (waking an idle vCPU costs tens of µs).
const SPIN_FOR: Duration = Duration::from_micros(200);
/// The first part of that wait spins without yielding the CPU.
const SPIN_ONLY_FOR: Duration = Duration::from_micros(20);
/// `try_lock` attempts (with growing pauses between them) before blocking in the kernel.
const SPIN_LOCK: u32 = 200;

// Record kinds (low byte of the state word; the slot index of an in-flight record above it).
const READY: u32 = 1;
const DONE: u32 = 2;
const PAD: u32 = 3;
const WRITING: u32 = 4;
const READING: u32 = 5;

/// Points inside queue operations where a test can stop a process (to kill it there).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestPoint {
    /// In `put`, holding the main lock, the message written but not committed.
    PutLocked,
    /// In `get`, holding the main lock, the message decoded but its removal not committed.
    GetLocked,
    /// In `put` of a large message, its record reserved, before copying (no lock held).
    PutCopying,
    /// In `get` of a large message, its record claimed, before copying (no lock held).
    GetCopying,
}

static TEST_HOOK_ON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static TEST_HOOK: std::sync::RwLock<Option<fn(TestPoint)>> = std::sync::RwLock::new(None);

/// Installs (or removes) a function called at each [`TestPoint`] in this process. For tests.
#[doc(hidden)]
pub fn set_test_hook(hook: Option<fn(TestPoint)>) {
    *TEST_HOOK.write().unwrap_or_else(|p| p.into_inner()) = hook;
    TEST_HOOK_ON.store(hook.is_some(), Ordering::SeqCst);
}

#[inline]
fn test_point(p: TestPoint) {
    if TEST_HOOK_ON.load(Ordering::Relaxed) {
        let hook = *TEST_HOOK.read().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = hook {
            h(p);
        }
    }
}

fn kind(state: u32) -> u32 {
    state & 0xff
}

fn in_flight(k: u32, slot: usize) -> u32 {
    k | ((slot as u32) << 8)
}

/// Bytes a record with a payload of `len` bytes occupies in the ring.
pub(crate) fn rec_size(len: u64) -> u64 {
    REC_HDR + len.next_multiple_of(8)
}

/// Where a new record of `rec` bytes goes, given the ring's capacity and its `free` and `tail`
/// positions (monotonic byte counts; offset = position % cap). Returns the padding to skip to
/// the end of the ring first, or `None` if it does not fit now.
///
/// Records never straddle the end of the ring. Past `soft` bytes into the ring, a record wraps
/// early to offset 0 when the backlog is small, so that an idle-ish queue keeps touching the
/// same few pages instead of cycling through its whole capacity.
pub(crate) fn placement(cap: u64, free: u64, tail: u64, rec: u64, soft: u64) -> Option<u64> {
    let used = tail - free;
    let off = tail % cap;
    let to_end = cap - off;
    // Pad to the end when the record does not fit before it, or to wrap early.
    let wrap_early = off >= soft && used <= off / 2 && rec <= off - used;
    let pad = if rec > to_end || wrap_early {
        to_end
    } else {
        0
    };
    (used + pad + rec <= cap).then_some(pad)
}

#[repr(C, align(64))]
struct Line<T>(T);

#[repr(C)]
struct Fixed {
    magic: AtomicU64,
    cap: AtomicU64,
    maxsize: AtomicU64,
    /// Non-zero for a JoinableQueue: puts count unfinished tasks.
    joinable: AtomicU64,
}

/// Fields changed only under the main lock (through the undo log); read without it as hints.
#[repr(C)]
struct State {
    /// Start of the oldest record not yet reclaimed.
    free: AtomicU64,
    /// No READY record lies before it.
    head: AtomicU64,
    /// End of the newest record.
    tail: AtomicU64,
    /// READY records (what `qsize` reports).
    ready: AtomicU64,
    /// READY plus WRITING records (what a bounded queue limits).
    queued: AtomicU64,
    /// Items put and not yet marked done (JoinableQueue).
    unfinished: AtomicU64,
    /// Non-zero once `close` was called.
    closed: AtomicU64,
    /// Slots with an operation in flight (their `pos` is set).
    inflight: AtomicU64,
}

/// A futex word and a "someone sleeps" flag, both changed under the main lock.
#[repr(C)]
struct Wake {
    seq: AtomicU32,
    /// Set by a caller about to sleep on `seq`; cleared by the first waker, which wakes every
    /// sleeper at once. Later changes then make no system call until someone sleeps again.
    sleeping: AtomicU32,
}

#[repr(C)]
struct Log {
    len: AtomicU64,
    entries: [[AtomicU64; 2]; LOG_CAP],
}

#[repr(C)]
struct Slot {
    mutex: RawRobustMutex,
    /// Position of the record its holder is copying, or `NO_POS`. Changed under the main lock.
    pos: AtomicU64,
}

#[repr(C)]
struct Header {
    fixed: Line<Fixed>,
    lock: Line<RawRobustMutex>,
    state: Line<State>,
    items: Line<Wake>,
    space: Line<Wake>,
    joined: Line<Wake>,
    log: Line<Log>,
    slots: [Line<Slot>; NSLOTS],
}

const HDR_BYTES: usize = std::mem::size_of::<Header>().next_multiple_of(4096);

/// Smallest ring accepted.
pub(crate) const MIN_CAPACITY: usize = 256;

/// How a caller waits: not at all, or until a deadline (`None`: forever).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Wait {
    Try,
    Until(Option<Instant>),
}

impl Wait {
    pub(crate) fn timeout(t: Duration) -> Wait {
        Wait::Until(Instant::now().checked_add(t))
    }
    fn deadline(self) -> Option<Instant> {
        match self {
            Wait::Try => Some(Instant::now()),
            Wait::Until(d) => d,
        }
    }
}

/// One process's view of a ring: its mapping and its descriptor.
#[derive(Debug)]
pub(crate) struct Shared {
    map: Mapping,
    fd: OwnedFd,
    cap: u64,
    soft: u64,
}

thread_local! {
    static SLOT_HINT: Cell<usize> = Cell::new(platform::gettid() as usize % NSLOTS);
}

impl Shared {
    /// A new ring of `cap` bytes (rounded up to 8) limited to `maxsize` messages (0: no limit).
    pub(crate) fn create(cap: usize, maxsize: u64, joinable: bool) -> Result<Shared> {
        let cap = cap.max(MIN_CAPACITY).next_multiple_of(8);
        if cap > u32::MAX as usize {
            return Err(Error::arg("queue byte capacity above 4 GiB"));
        }
        let fd = platform::memfd(c"multiproc-queue", HDR_BYTES + cap)?;
        let map = Mapping::new(fd.as_fd(), HDR_BYTES + cap)?;
        let s = Shared::from_parts(map, fd, cap as u64);
        let h = s.hdr();
        // SAFETY: the mapping is fresh, zero-filled, page aligned and large enough for a Header;
        // nobody else can see it before this function returns.
        unsafe {
            RawRobustMutex::init_at(&h.lock.0 as *const RawRobustMutex as *mut _, false)?;
            for slot in &h.slots {
                RawRobustMutex::init_at(&slot.0.mutex as *const RawRobustMutex as *mut _, false)?;
            }
        }
        for slot in &h.slots {
            slot.0.pos.store(NO_POS, Ordering::Relaxed);
        }
        h.fixed.0.cap.store(cap as u64, Ordering::Relaxed);
        h.fixed.0.maxsize.store(maxsize, Ordering::Relaxed);
        h.fixed.0.joinable.store(joinable as u64, Ordering::Relaxed);
        h.fixed.0.magic.store(MAGIC, Ordering::Release);
        Ok(s)
    }

    /// Maps a ring received from another process.
    pub(crate) fn open(fd: OwnedFd) -> Result<Shared> {
        let size = platform::fstat_size(fd.as_fd())?;
        if size < HDR_BYTES + MIN_CAPACITY {
            return Err(Error::arg("not a multiproc queue (file too small)"));
        }
        let map = Mapping::new(fd.as_fd(), size)?;
        let cap = (size - HDR_BYTES) as u64;
        let s = Shared::from_parts(map, fd, cap);
        let f = &s.hdr().fixed.0;
        if f.magic.load(Ordering::Acquire) != MAGIC || f.cap.load(Ordering::Relaxed) != cap {
            return Err(Error::arg("not a multiproc queue (bad header)"));
        }
        Ok(s)
    }

    fn from_parts(map: Mapping, fd: OwnedFd, cap: u64) -> Shared {
        let soft = (cap / 2).min(4 << 20);
        Shared { map, fd, cap, soft }
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub(crate) fn capacity(&self) -> usize {
        self.cap as usize
    }

    fn joinable(&self) -> bool {
        self.hdr().fixed.0.joinable.load(Ordering::Relaxed) != 0
    }

    pub(crate) fn maxsize(&self) -> u64 {
        self.hdr().fixed.0.maxsize.load(Ordering::Relaxed)
    }

    fn hdr(&self) -> &Header {
        // SAFETY: the mapping is page aligned and at least HDR_BYTES long (checked at create and
        // open); Header holds only atomics and a pthread mutex, valid for any bit pattern the
        // protocol writes, and is shared on purpose.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }

    fn st(&self) -> &State {
        &self.hdr().state.0
    }

    fn ring(&self) -> *mut u8 {
        // SAFETY: HDR_BYTES is within the mapping (checked at create and open).
        unsafe { self.map.as_ptr().add(HDR_BYTES) }
    }

    fn word(&self, pos: u64, second: bool) -> &AtomicU32 {
        let off = (pos % self.cap) as usize + if second { 4 } else { 0 };
        // SAFETY: off is a multiple of 4 below cap (positions are multiples of 8, cap too), so
        // the u32 lies inside the ring and is aligned; ring words are only accessed atomically.
        unsafe { &*(self.ring().add(off) as *const AtomicU32) }
    }

    fn rec_state(&self, pos: u64) -> &AtomicU32 {
        self.word(pos, false)
    }

    fn rec_len(&self, pos: u64) -> &AtomicU32 {
        self.word(pos, true)
    }

    fn next(&self, pos: u64) -> u64 {
        pos + rec_size(self.rec_len(pos).load(Ordering::Relaxed) as u64)
    }

    /// The payload of the record at `pos`, `len` bytes. Callers pass a length that fits (they
    /// reserved it, or checked it with [`Shared::checked_len`]).
    fn payload(&self, pos: u64, len: usize) -> *mut u8 {
        let off = (pos % self.cap) as usize + REC_HDR as usize;
        debug_assert!(off + len <= self.cap as usize);
        // SAFETY: in bounds of the ring, per the caller.
        unsafe { self.ring().add(off) }
    }

    /// The payload length of the record at `pos`, checked to lie inside the ring (a corrupt
    /// length becomes an error instead of an out-of-bounds read).
    fn checked_len(&self, pos: u64) -> Result<usize> {
        let len = self.rec_len(pos).load(Ordering::Relaxed) as u64;
        let off = pos % self.cap;
        if off + REC_HDR + len > self.cap {
            return Err(Error::Decode(
                "queue record overruns the ring (corrupt queue)".into(),
            ));
        }
        Ok(len as usize)
    }

    // -----------------------------------------------------------------------------------------
    // The main lock and its undo log
    // -----------------------------------------------------------------------------------------

    fn lock(&self, deadline: Option<Instant>) -> Result<Guard<'_>> {
        let m = &self.hdr().lock.0;
        let mut got = None;
        for i in 0..SPIN_LOCK {
            if let Some(r) = m.try_lock()? {
                got = Some(r);
                break;
            }
            for _ in 0..(1u32 << (i / 16).min(6)) {
                std::hint::spin_loop();
            }
        }
        let r = match got {
            Some(r) => r,
            None => m.lock(deadline.map(|d| d.saturating_duration_since(Instant::now())))?,
        };
        let g = Guard {
            s: self,
            wake: Cell::new(0),
        };
        if r == RobustLock::OwnerDied {
            // The previous holder died inside a critical section: undo what it half did.
            g.rollback();
            m.make_consistent()?;
        }
        Ok(g)
    }

    // -----------------------------------------------------------------------------------------
    // Ring bookkeeping (all under the main lock)
    // -----------------------------------------------------------------------------------------

    /// Advances `free` over finished records; restarts the ring at 0 when it is empty.
    fn reclaim(&self, g: &Guard<'_>) {
        let st = self.st();
        let free = st.free.load(Ordering::Relaxed);
        let tail = st.tail.load(Ordering::Relaxed);
        let mut f = free;
        while f < tail {
            let k = kind(self.rec_state(f).load(Ordering::Acquire));
            if k != DONE && k != PAD {
                break;
            }
            f = self.next(f);
        }
        if f >= tail {
            if tail != 0 {
                g.set(&st.free, 0);
                g.set(&st.head, 0);
                g.set(&st.tail, 0);
            }
        } else {
            if f != free {
                g.set(&st.free, f);
            }
            if st.head.load(Ordering::Relaxed) < f {
                g.set(&st.head, f);
            }
        }
    }

    /// Reserves room for a record with a `len`-byte payload; returns its position. Writes the
    /// padding record if any (beyond `tail`, so invisible until `tail` moves).
    fn reserve(&self, g: &Guard<'_>, len: u64) -> Option<u64> {
        self.reclaim(g);
        let st = self.st();
        let maxsize = self.maxsize();
        if maxsize != 0 && st.queued.load(Ordering::Relaxed) >= maxsize {
            return None;
        }
        let free = st.free.load(Ordering::Relaxed);
        let tail = st.tail.load(Ordering::Relaxed);
        let pad = placement(self.cap, free, tail, rec_size(len), self.soft)?;
        if pad > 0 {
            self.rec_len(tail)
                .store((pad - REC_HDR) as u32, Ordering::Relaxed);
            self.rec_state(tail).store(PAD, Ordering::Release);
        }
        Some(tail + pad)
    }

    /// Finds the first READY record from `head`; returns it and where `head` goes once it is
    /// claimed.
    fn find_ready(&self) -> Option<(u64, u64)> {
        let st = self.st();
        let tail = st.tail.load(Ordering::Relaxed);
        let mut p = st.head.load(Ordering::Relaxed);
        let mut first_writing = None;
        while p < tail {
            match kind(self.rec_state(p).load(Ordering::Acquire)) {
                READY => {
                    let next = self.next(p);
                    return Some((p, first_writing.unwrap_or(next)));
                }
                WRITING => {
                    first_writing.get_or_insert(p);
                }
                _ => {}
            }
            p = self.next(p);
        }
        None
    }

    /// Takes a free operation slot (non-blocking), repairing it first if its last holder died;
    /// says whether it repaired (which may have changed the ring: callers recompute).
    fn acquire_slot(&self, g: &Guard<'_>) -> Option<(usize, bool)> {
        let start = SLOT_HINT.with(Cell::get);
        for i in 0..NSLOTS {
            let s = (start + i) % NSLOTS;
            match self.hdr().slots[s].0.mutex.try_lock() {
                Ok(Some(RobustLock::Acquired)) => {
                    SLOT_HINT.with(|h| h.set(s));
                    return Some((s, false));
                }
                Ok(Some(RobustLock::OwnerDied)) => {
                    self.repair_slot(g, s);
                    if self.hdr().slots[s].0.mutex.make_consistent().is_ok() {
                        SLOT_HINT.with(|h| h.set(s));
                        return Some((s, true));
                    }
                    let _ = self.hdr().slots[s].0.mutex.unlock();
                }
                _ => {}
            }
        }
        None
    }

    /// Slot `s`'s holder died (the caller holds both the main lock and `s`): settle the record
    /// it was copying. A half-written message is dropped; a half-read one is made READY again
    /// (its reader never returned it, so nobody saw it twice).
    fn repair_slot(&self, g: &Guard<'_>, s: usize) {
        let slot = &self.hdr().slots[s].0;
        let pos = slot.pos.load(Ordering::Relaxed);
        if pos == NO_POS {
            return;
        }
        let st = self.st();
        let state = self.rec_state(pos).load(Ordering::Acquire);
        if state == in_flight(WRITING, s) {
            g.set_rec(pos, DONE);
            g.set(
                &st.queued,
                st.queued.load(Ordering::Relaxed).saturating_sub(1),
            );
        } else if state == in_flight(READING, s) {
            g.set_rec(pos, READY);
            g.set(&st.ready, st.ready.load(Ordering::Relaxed) + 1);
            g.set(&st.queued, st.queued.load(Ordering::Relaxed) + 1);
            if st.head.load(Ordering::Relaxed) > pos {
                g.set(&st.head, pos);
            }
        }
        g.slot_pos(slot, NO_POS);
        self.reclaim(g);
        g.commit();
        g.signal(&self.hdr().items, ITEMS);
        g.signal(&self.hdr().space, SPACE);
    }

    /// Looks for in-flight operations whose process died, and settles them.
    fn reap_dead(&self, g: &Guard<'_>) {
        for s in 0..NSLOTS {
            let slot = &self.hdr().slots[s].0;
            if slot.pos.load(Ordering::Relaxed) == NO_POS {
                continue;
            }
            match slot.mutex.try_lock() {
                Ok(Some(_)) => {
                    // A live holder keeps its slot locked while `pos` is set: this one is gone.
                    self.repair_slot(g, s);
                    let _ = slot.mutex.make_consistent();
                    let _ = slot.mutex.unlock();
                }
                _ => continue,
            }
        }
    }

    fn any_in_flight(&self) -> bool {
        self.st().inflight.load(Ordering::Acquire) != 0
    }

    // -----------------------------------------------------------------------------------------
    // Waiting and waking
    // -----------------------------------------------------------------------------------------

    /// Busy-waits (briefly) until `hint()` or the deadline: spins a few microseconds, then
    /// yields the CPU between looks (the peer may be waiting for this very CPU).
    fn spin(&self, deadline: Option<Instant>, hint: impl Fn() -> bool) {
        let start = Instant::now();
        let mut i = 0u32;
        let mut yielding = false;
        while !hint() {
            if yielding {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
            i = i.wrapping_add(1);
            if yielding || i % 64 == 0 {
                let now = Instant::now();
                let spent = now - start;
                if spent >= SPIN_FOR || deadline.is_some_and(|d| now >= d) {
                    return;
                }
                yielding = spent >= SPIN_ONLY_FOR;
            }
        }
    }

    /// Sleeps on `w` (the caller holds the main lock `g`, found it cannot proceed, and has
    /// already spun): registers as a waiter under the lock, so that whoever changes the state
    /// next sees it, then sleeps at most one slice. Returns false once the deadline passed.
    fn sleep(&self, g: Guard<'_>, w: &Line<Wake>, deadline: Option<Instant>) -> bool {
        let w = &w.0;
        let slice = match deadline {
            None => WAIT_SLICE,
            Some(d) => d.saturating_duration_since(Instant::now()).min(WAIT_SLICE),
        };
        if slice.is_zero() {
            return false;
        }
        w.sleeping.store(1, Ordering::Relaxed);
        let seen = w.seq.load(Ordering::Relaxed);
        drop(g);
        platform::futex_wait(&w.seq, seen, Some(slice));
        true
    }

    fn closed(&self) -> bool {
        self.st().closed.load(Ordering::Acquire) != 0
    }

    /// A lock-free guess whether a record of `rec` bytes would fit now.
    fn space_hint(&self, rec: u64) -> bool {
        let st = self.st();
        let maxsize = self.maxsize();
        if maxsize != 0 && st.queued.load(Ordering::Relaxed) >= maxsize {
            return false;
        }
        let used = st
            .tail
            .load(Ordering::Relaxed)
            .saturating_sub(st.free.load(Ordering::Relaxed));
        used + rec <= self.cap
    }

    // -----------------------------------------------------------------------------------------
    // Operations
    // -----------------------------------------------------------------------------------------

    /// Puts one record of `len` bytes, written by `write` straight into the ring (it returns
    /// how many bytes it wrote, which must be `len`). `Err(Full)` when `wait` runs out.
    pub(crate) fn put<F>(&self, len: usize, write: F, wait: Wait) -> Result<()>
    where
        F: FnOnce(&mut [u8]) -> Result<usize>,
    {
        let rec = rec_size(len as u64);
        if len > u32::MAX as usize || rec > self.cap {
            return Err(Error::arg(format!(
                "a message of {len} bytes does not fit in this queue's ring of {} bytes \
                 (create the queue with a larger byte capacity)",
                self.cap
            )));
        }
        let deadline = wait.deadline();
        let mut write = Some(write);
        let mut spun = false;
        loop {
            if self.closed() {
                return Err(Error::Closed);
            }
            let g = self.lock(deadline).map_err(timeout_to(Error::Full))?;
            if self.closed() {
                return Err(Error::Closed);
            }
            // The slot first: repairing a dead holder's slot may move the ring's positions.
            let slot = if len > INLINE_MAX {
                self.acquire_slot(&g).map(|(s, _)| s)
            } else {
                None
            };
            if let Some(pos) = self.reserve(&g, len as u64) {
                let write = write.take().expect("the writer runs once");
                return match slot {
                    None => self.put_inline(g, pos, len, write),
                    Some(s) => self.put_outside(g, pos, len, s, write),
                };
            }
            if let Some(s) = slot {
                let _ = self.hdr().slots[s].0.mutex.unlock();
            }
            if self.any_in_flight() {
                self.reap_dead(&g);
            }
            if matches!(wait, Wait::Try) {
                return Err(Error::Full);
            }
            if !spun {
                drop(g);
                self.spin(deadline, || self.closed() || self.space_hint(rec));
                spun = true;
            } else {
                spun = false;
                if !self.sleep(g, &self.hdr().space, deadline) {
                    return Err(Error::Full);
                }
            }
        }
    }

    fn put_inline<F>(&self, g: Guard<'_>, pos: u64, len: usize, write: F) -> Result<()>
    where
        F: FnOnce(&mut [u8]) -> Result<usize>,
    {
        // SAFETY: [pos+8, pos+8+len) was just reserved: it lies beyond `tail`, inside the ring,
        // and no other process touches it until `tail` moves past it (under this lock).
        let buf = unsafe { std::slice::from_raw_parts_mut(self.payload(pos, len), len) };
        let n = write(buf)?;
        if n != len {
            return Err(size_changed(len, n));
        }
        self.rec_len(pos).store(len as u32, Ordering::Relaxed);
        self.rec_state(pos).store(READY, Ordering::Release);
        let st = self.st();
        g.set(&st.tail, pos + rec_size(len as u64));
        g.set(&st.ready, st.ready.load(Ordering::Relaxed) + 1);
        g.set(&st.queued, st.queued.load(Ordering::Relaxed) + 1);
        if self.joinable() {
            g.set(&st.unfinished, st.unfinished.load(Ordering::Relaxed) + 1);
        }
        test_point(TestPoint::PutLocked);
        g.commit();
        g.signal(&self.hdr().items, ITEMS);
        drop(g);
        Ok(())
    }

    fn put_outside<F>(&self, g: Guard<'_>, pos: u64, len: usize, s: usize, write: F) -> Result<()>
    where
        F: FnOnce(&mut [u8]) -> Result<usize>,
    {
        let st = self.st();
        let slot = &self.hdr().slots[s].0;
        self.rec_len(pos).store(len as u32, Ordering::Relaxed);
        self.rec_state(pos)
            .store(in_flight(WRITING, s), Ordering::Release);
        g.slot_pos(slot, pos);
        g.set(&st.tail, pos + rec_size(len as u64));
        g.set(&st.queued, st.queued.load(Ordering::Relaxed) + 1);
        g.commit();
        drop(g);
        let op = SlotOp {
            s: self,
            slot: s,
            pos,
            done: false,
        };
        test_point(TestPoint::PutCopying);
        // SAFETY: the record is WRITING and owned by slot `s`, which this thread holds: no other
        // process reads or writes its payload until it becomes READY (or is repaired after our
        // death, by which time we no longer write).
        let buf = unsafe { std::slice::from_raw_parts_mut(self.payload(pos, len), len) };
        let n = write(buf)?;
        if n != len {
            return Err(size_changed(len, n));
        }
        let g = op.finish_lock()?;
        g.set_rec(pos, READY);
        g.set(&st.ready, st.ready.load(Ordering::Relaxed) + 1);
        if self.joinable() {
            g.set(&st.unfinished, st.unfinished.load(Ordering::Relaxed) + 1);
        }
        g.slot_pos(slot, NO_POS);
        g.commit();
        g.signal(&self.hdr().items, ITEMS);
        drop(g);
        op.release();
        Ok(())
    }

    /// Takes the oldest READY record and gives its payload to `read`. `Err(Empty)` when `wait`
    /// runs out, `Err(Closed)` once the queue is closed and drained. A record whose `read`
    /// fails is consumed all the same (it would fail again for everyone).
    pub(crate) fn get<R, F>(&self, read: F, wait: Wait) -> Result<R>
    where
        F: FnOnce(&[u8]) -> Result<R>,
    {
        let mut wait = wait;
        let st = self.st();
        let mut read = Some(read);
        let mut spun = false;
        loop {
            let deadline = wait.deadline();
            if st.ready.load(Ordering::Acquire) == 0 && !self.any_in_flight() {
                // Nothing to take and nothing in flight: no need for the lock yet.
                if self.drained() {
                    return Err(Error::Closed);
                }
                if matches!(wait, Wait::Try) {
                    return Err(Error::Empty);
                }
                if !spun {
                    self.spin(deadline, || {
                        st.ready.load(Ordering::Acquire) > 0 || self.closed()
                    });
                    spun = true;
                    continue;
                }
            }
            let g = self.lock(deadline).map_err(timeout_to(Error::Empty))?;
            if st.ready.load(Ordering::Relaxed) == 0 && self.any_in_flight() {
                self.reap_dead(&g);
            }
            let found = if st.ready.load(Ordering::Relaxed) > 0 {
                self.find_ready()
            } else {
                None
            };
            if let Some((mut pos, mut head)) = found {
                let mut len = self.checked_len(pos)?;
                let mut slot = None;
                if len > INLINE_MAX {
                    if let Some((s, repaired)) = self.acquire_slot(&g) {
                        slot = Some(s);
                        if repaired {
                            // A dead reader's message may be READY again before ours (and
                            // ours stays READY: a repair only adds READY records).
                            if let Some((p, h)) = self.find_ready() {
                                (pos, head) = (p, h);
                            }
                            len = self.checked_len(pos)?;
                        }
                    }
                }
                let read = read.take().expect("the reader runs once");
                return match slot {
                    None => self.get_inline(g, pos, head, len, read),
                    Some(s) => self.get_outside(g, pos, head, len, s, read),
                };
            }
            if self.drained() {
                return Err(Error::Closed);
            }
            if matches!(wait, Wait::Try) {
                return Err(Error::Empty);
            }
            if !spun {
                drop(g);
                self.spin(deadline, || {
                    st.ready.load(Ordering::Acquire) > 0 || self.closed()
                });
                spun = true;
            } else {
                spun = false;
                if !self.sleep(g, &self.hdr().items, deadline) {
                    // Out of time: one last look without waiting.
                    wait = Wait::Try;
                }
            }
        }
    }

    /// Closed, and nothing left nor being written.
    fn drained(&self) -> bool {
        self.closed() && self.st().queued.load(Ordering::Acquire) == 0
    }

    fn claim(&self, g: &Guard<'_>, pos: u64, head: u64, state: u32) {
        let st = self.st();
        g.set_rec(pos, state);
        g.set(&st.head, head);
        g.set(&st.ready, st.ready.load(Ordering::Relaxed) - 1);
        g.set(
            &st.queued,
            st.queued.load(Ordering::Relaxed).saturating_sub(1),
        );
    }

    fn get_inline<R, F>(&self, g: Guard<'_>, pos: u64, head: u64, len: usize, read: F) -> Result<R>
    where
        F: FnOnce(&[u8]) -> Result<R>,
    {
        // SAFETY: the record is READY and we hold the main lock: nobody changes it meanwhile.
        let buf = unsafe { std::slice::from_raw_parts(self.payload(pos, len), len) };
        let r = read(buf);
        self.claim(&g, pos, head, DONE);
        self.reclaim(&g);
        test_point(TestPoint::GetLocked);
        g.commit();
        g.signal(&self.hdr().space, SPACE);
        drop(g);
        r
    }

    fn get_outside<R, F>(
        &self,
        g: Guard<'_>,
        pos: u64,
        head: u64,
        len: usize,
        s: usize,
        read: F,
    ) -> Result<R>
    where
        F: FnOnce(&[u8]) -> Result<R>,
    {
        let slot = &self.hdr().slots[s].0;
        self.claim(&g, pos, head, in_flight(READING, s));
        g.slot_pos(slot, pos);
        g.commit();
        g.signal(&self.hdr().space, SPACE);
        drop(g);
        let op = SlotOp {
            s: self,
            slot: s,
            pos,
            done: false,
        };
        test_point(TestPoint::GetCopying);
        // SAFETY: the record is READING and owned by slot `s`, which this thread holds: `free`
        // cannot pass it and nobody else reads or writes it until we mark it DONE.
        let buf = unsafe { std::slice::from_raw_parts(self.payload(pos, len), len) };
        let r = read(buf);
        let g = op.finish_lock()?;
        g.set_rec(pos, DONE);
        g.slot_pos(slot, NO_POS);
        self.reclaim(&g);
        g.commit();
        g.signal(&self.hdr().space, SPACE);
        drop(g);
        op.release();
        r
    }

    /// Refuses further puts; wakes every blocked caller (see the queue docs for what each
    /// then gets).
    pub(crate) fn close(&self) -> Result<()> {
        let g = self.lock(None)?;
        g.set(&self.st().closed, 1);
        g.commit();
        g.signal_all();
        drop(g);
        Ok(())
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed()
    }

    /// READY records: messages that a `get` would find now.
    pub(crate) fn qsize(&self) -> usize {
        self.st().ready.load(Ordering::Acquire) as usize
    }

    /// Whether a put would have to wait now (count limit reached, or the ring has no room for
    /// even an empty message).
    pub(crate) fn full(&self) -> bool {
        !self.space_hint(rec_size(0))
    }

    /// Items put and not yet marked done.
    pub(crate) fn unfinished(&self) -> u64 {
        self.st().unfinished.load(Ordering::Acquire)
    }

    /// One `task_done`: fails if there is no unfinished item.
    pub(crate) fn task_done(&self) -> Result<()> {
        let g = self.lock(None)?;
        let st = self.st();
        let u = st.unfinished.load(Ordering::Relaxed);
        if u == 0 {
            return Err(Error::state(
                "task_done() called more times than there were items put",
            ));
        }
        g.set(&st.unfinished, u - 1);
        g.commit();
        if u == 1 {
            g.signal(&self.hdr().joined, JOINED);
        }
        drop(g);
        Ok(())
    }

    /// Waits until every item put has been marked done. `Err(Timeout)` when `wait` runs out.
    pub(crate) fn join(&self, wait: Wait) -> Result<()> {
        let deadline = wait.deadline();
        let mut spun = false;
        loop {
            if self.unfinished() == 0 {
                return Ok(());
            }
            if matches!(wait, Wait::Try) {
                return Err(Error::Timeout);
            }
            if !spun {
                self.spin(deadline, || self.unfinished() == 0);
                spun = true;
                continue;
            }
            spun = false;
            let g = self.lock(deadline)?;
            if self.unfinished() == 0 {
                return Ok(());
            }
            if !self.sleep(g, &self.hdr().joined, deadline) {
                return if self.unfinished() == 0 {
                    Ok(())
                } else {
                    Err(Error::Timeout)
                };
            }
        }
    }
}

fn timeout_to(e: Error) -> impl FnOnce(Error) -> Error {
    move |got| match got {
        Error::Timeout => e,
        other => other,
    }
}

fn size_changed(len: usize, n: usize) -> Error {
    Error::Encode(format!(
        "the value serialized to {len} bytes, then to {n}: its Serialize is not deterministic"
    ))
}

/// The main lock, held. Every change to shared state made while holding it goes through
/// [`Guard::set`] / [`Guard::set_rec`], which log the old value first; [`Guard::commit`]
/// forgets the log. Dropping the guard without committing (an error or a panic) undoes the
/// changes, and so does the next locker if the holder died.
struct Guard<'a> {
    s: &'a Shared,
    /// Futexes to wake once the lock is released (`ITEMS`, `SPACE`, `JOINED` bits).
    wake: Cell<u8>,
}

const ITEMS: u8 = 1;
const SPACE: u8 = 2;
const JOINED: u8 = 4;

impl Guard<'_> {
    /// After a change others may wait for: if someone sleeps on `w` (sleepers announce it
    /// under this lock, so none is missed), bumps its sequence now and wakes them all after
    /// unlock.
    fn signal(&self, w: &Line<Wake>, bit: u8) {
        if w.0.sleeping.load(Ordering::Relaxed) != 0 {
            w.0.sleeping.store(0, Ordering::Relaxed);
            w.0.seq.fetch_add(1, Ordering::Relaxed);
            self.wake.set(self.wake.get() | bit);
        }
    }

    /// Wakes everyone, registered or not (for `close`).
    fn signal_all(&self) {
        let h = self.s.hdr();
        for w in [&h.items, &h.space, &h.joined] {
            w.0.sleeping.store(0, Ordering::Relaxed);
            w.0.seq.fetch_add(1, Ordering::Relaxed);
        }
        self.wake.set(ITEMS | SPACE | JOINED);
    }

    /// Sets a slot's in-flight position, keeping the `inflight` count.
    fn slot_pos(&self, slot: &Slot, pos: u64) {
        let st = self.s.st();
        let was = slot.pos.load(Ordering::Relaxed) != NO_POS;
        let now = pos != NO_POS;
        self.set(&slot.pos, pos);
        if was != now {
            let n = st.inflight.load(Ordering::Relaxed);
            self.set(&st.inflight, if now { n + 1 } else { n.saturating_sub(1) });
        }
    }

    fn key_of(&self, p: *const u8, wide32: bool) -> u64 {
        let off = p as usize - self.s.map.as_ptr() as usize;
        off as u64 | if wide32 { KEY_U32 } else { 0 }
    }

    fn log(&self, key: u64, old: u64) {
        let l = &self.s.hdr().log.0;
        let n = l.len.load(Ordering::Relaxed) as usize;
        assert!(n < LOG_CAP, "queue undo log overflow");
        l.entries[n][0].store(key, Ordering::Relaxed);
        l.entries[n][1].store(old, Ordering::Relaxed);
        l.len.store(n as u64 + 1, Ordering::Release);
    }

    fn set(&self, field: &AtomicU64, v: u64) {
        self.log(
            self.key_of(field as *const AtomicU64 as *const u8, false),
            field.load(Ordering::Relaxed),
        );
        field.store(v, Ordering::Release);
    }

    fn set_rec(&self, pos: u64, v: u32) {
        let w = self.s.rec_state(pos);
        self.log(
            self.key_of(w as *const AtomicU32 as *const u8, true),
            w.load(Ordering::Relaxed) as u64,
        );
        w.store(v, Ordering::Release);
    }

    fn commit(&self) {
        self.s.hdr().log.0.len.store(0, Ordering::Release);
    }

    fn rollback(&self) {
        let l = &self.s.hdr().log.0;
        let n = (l.len.load(Ordering::Acquire) as usize).min(LOG_CAP);
        let base = self.s.map.as_ptr();
        let size = self.s.map.len();
        for e in l.entries[..n].iter().rev() {
            let key = e[0].load(Ordering::Relaxed);
            let old = e[1].load(Ordering::Relaxed);
            let off = (key & !KEY_U32) as usize;
            if key & KEY_U32 != 0 {
                if off % 4 == 0 && off + 4 <= size {
                    // SAFETY: in bounds and aligned (checked); shared words are atomics.
                    let w = unsafe { &*(base.add(off) as *const AtomicU32) };
                    w.store(old as u32, Ordering::Release);
                }
            } else if off % 8 == 0 && off + 8 <= size {
                // SAFETY: in bounds and aligned (checked); shared words are atomics.
                let w = unsafe { &*(base.add(off) as *const AtomicU64) };
                w.store(old, Ordering::Release);
            }
        }
        l.len.store(0, Ordering::Release);
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.rollback();
        let _ = self.s.hdr().lock.0.unlock();
        let wake = self.wake.get();
        if wake != 0 {
            let h = self.s.hdr();
            for (bit, w) in [(ITEMS, &h.items), (SPACE, &h.space), (JOINED, &h.joined)] {
                if wake & bit != 0 {
                    platform::futex_wake(&w.0.seq, u32::MAX);
                }
            }
        }
    }
}

/// An operation copying outside the main lock while holding slot `slot`. Dropped without
/// [`SlotOp::release`] (an error or a panic while copying), it settles the record: a put's
/// record is dropped, a get's record is consumed.
struct SlotOp<'a> {
    s: &'a Shared,
    slot: usize,
    pos: u64,
    done: bool,
}

impl<'a> SlotOp<'a> {
    /// Takes the main lock to finish the operation. Waits without a deadline: the lock is only
    /// ever held briefly, and a dead holder hands it over at once. Fails only if the lock is
    /// unusable (then the whole queue is).
    fn finish_lock(&self) -> Result<Guard<'a>> {
        self.s.lock(None)
    }

    fn release(mut self) {
        self.done = true;
        let _ = self.s.hdr().slots[self.slot].0.mutex.unlock();
    }
}

impl Drop for SlotOp<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let s = self.s;
        let st = s.st();
        let Ok(g) = self.finish_lock() else {
            let _ = s.hdr().slots[self.slot].0.mutex.unlock();
            return;
        };
        let state = s.rec_state(self.pos).load(Ordering::Acquire);
        if state == in_flight(WRITING, self.slot) {
            g.set(
                &st.queued,
                st.queued.load(Ordering::Relaxed).saturating_sub(1),
            );
        }
        g.set_rec(self.pos, DONE);
        g.slot_pos(&s.hdr().slots[self.slot].0, NO_POS);
        s.reclaim(&g);
        g.commit();
        g.signal(&s.hdr().space, SPACE);
        drop(g);
        let _ = s.hdr().slots[self.slot].0.mutex.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fits_its_pages() {
        assert!(std::mem::size_of::<Header>() <= HDR_BYTES);
        assert_eq!(HDR_BYTES % 4096, 0);
    }

    #[test]
    fn placement_rules() {
        let cap = 1024;
        // Empty ring: at 0, no padding.
        assert_eq!(placement(cap, 0, 0, 64, 512), Some(0));
        // A full ring refuses.
        assert_eq!(placement(cap, 0, 1024, 8, 512), None);
        // Does not fit before the end: pad to the end if the start is free.
        assert_eq!(placement(cap, 900, 1000, 64, 4096), Some(24));
        assert_eq!(placement(cap, 10, 1000, 64, 4096), None);
        // Past the soft limit with a small backlog: wrap early.
        assert_eq!(placement(cap, 600, 640, 64, 512), Some(384));
        // ... but not when the backlog is large.
        assert_eq!(placement(cap, 100, 640, 64, 512), Some(0));
        // Records never overlap live data.
        for free in (0..2048).step_by(8) {
            for used in (0..=1024u64).step_by(8) {
                let tail = free + used;
                for rec in [16u64, 64, 256, 1024] {
                    if let Some(pad) = placement(cap, free, tail, rec, 512) {
                        let start = tail + pad;
                        assert!(start + rec <= free + cap);
                        assert!(start % cap + rec <= cap, "record straddles the end");
                    }
                }
            }
        }
    }

    #[test]
    fn put_get_round_trip_and_reset() {
        let s = Shared::create(4096, 0, false).unwrap();
        for round in 0..100u8 {
            for i in 0..10u8 {
                s.put(
                    3,
                    |b| {
                        b.copy_from_slice(&[round, i, 7]);
                        Ok(3)
                    },
                    Wait::Try,
                )
                .unwrap();
            }
            assert_eq!(s.qsize(), 10);
            for i in 0..10u8 {
                let v = s.get(|b| Ok(b.to_vec()), Wait::Try).unwrap();
                assert_eq!(v, vec![round, i, 7]);
            }
            assert!(matches!(
                s.get(|b| Ok(b.len()), Wait::Try),
                Err(Error::Empty)
            ));
            // Drained: the ring restarts at 0.
            assert_eq!(s.st().tail.load(Ordering::Relaxed), 0);
        }
    }

    #[test]
    fn large_records_use_slots() {
        let s = Shared::create(1 << 20, 0, false).unwrap();
        let big = vec![5u8; INLINE_MAX * 4];
        for _ in 0..20 {
            s.put(
                big.len(),
                |b| {
                    b.copy_from_slice(&big);
                    Ok(big.len())
                },
                Wait::Try,
            )
            .unwrap();
            let v = s.get(|b| Ok(b.to_vec()), Wait::Try).unwrap();
            assert_eq!(v, big);
        }
        assert!(!s.any_in_flight());
    }

    #[test]
    fn failed_writer_leaves_nothing() {
        let s = Shared::create(4096, 0, false).unwrap();
        let r = s.put(8, |_| Err(Error::Encode("no".into())), Wait::Try);
        assert!(matches!(r, Err(Error::Encode(_))));
        assert_eq!(s.qsize(), 0);
        let big = INLINE_MAX + 8;
        let s = Shared::create(1 << 20, 0, false).unwrap();
        let r = s.put(big, |_| Err(Error::Encode("no".into())), Wait::Try);
        assert!(matches!(r, Err(Error::Encode(_))));
        assert_eq!(s.qsize(), 0);
        assert_eq!(s.st().queued.load(Ordering::Relaxed), 0);
        assert_eq!(
            s.st().tail.load(Ordering::Relaxed),
            0,
            "the dropped record was reclaimed"
        );
    }

    #[test]
    fn rollback_undoes_uncommitted_changes() {
        let s = Shared::create(4096, 0, false).unwrap();
        {
            let g = s.lock(None).unwrap();
            g.set(&s.st().ready, 42);
            g.set_rec(0, READY);
            // dropped without commit
        }
        assert_eq!(s.st().ready.load(Ordering::Relaxed), 0);
        assert_eq!(s.rec_state(0).load(Ordering::Relaxed), 0);
    }
}
