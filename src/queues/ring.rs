//! The shared-memory ring behind every queue: a memfd holding a header and a byte ring of
//! variable-size records. Producers and consumers each have their own robust process-shared
//! mutex with its own undo log, so one producer and one consumer never contend. The
//! invariants are written down in `README.md` beside this file; read it before changing
//! anything here.

use std::cell::Cell;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::platform::{self, Mapping, RawRobustMutex, RobustLock};

const MAGIC: u64 = u64::from_le_bytes(*b"mpqring2");
/// Slots for operations that copy outside the locks (one per concurrent large op): the first
/// half for puts, the second for gets (see [`slot_range`]).
const NSLOTS: usize = 32;

/// The slots a side may use. Each side has its own: a slot's `pos` is then only ever changed
/// under one side's lock and undone by that side's log. (Shared slots let a getter take a slot
/// whose dead putter's unfinished section the put side's recovery later rolled back, writing a
/// stale `pos` over the getter's and orphaning a record.)
fn slot_range(side: Side) -> std::ops::Range<usize> {
    match side {
        Side::Put => 0..NSLOTS / 2,
        Side::Get => NSLOTS / 2..NSLOTS,
    }
}
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
/// Marks the entry of a critical section's publishing store (its commit point, see README).
const KEY_PUBLISH: u64 = 1 << 62;
/// How long a blocked caller sleeps before it looks again for dead peers (bounded recovery).
const WAIT_SLICE: Duration = Duration::from_millis(50);
/// How long to busy-wait before sleeping on a futex (waking an idle vCPU costs tens of µs).
const SPIN_FOR: Duration = Duration::from_micros(200);
/// The first part of that wait spins without yielding the CPU.
const SPIN_ONLY_FOR: Duration = Duration::from_micros(20);
/// Past the soft limit, bytes put between two looks at the get side's `free`.
const SOFT_CHECK_EVERY: u64 = 64 * 1024;
/// CPU pauses between two looks at the peer's progress while spinning.
const SPIN_PAUSES: u32 = 16;
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
    /// In `put`, holding the put lock, the message written but not published.
    PutLocked,
    /// In `get`, holding the get lock, the message decoded but its removal not committed.
    GetLocked,
    /// In `put` of a large message, its record reserved, before copying (no lock held).
    PutCopying,
    /// In `get` of a large message, its record claimed, before copying (no lock held).
    GetCopying,
    /// In `put`, holding the put lock, just after its publishing store, before the log is
    /// cleared (a death here must keep the message).
    PutPublished,
    /// In `get`, holding the get lock, just after its publishing store (space handed back),
    /// before the log is cleared (a death here must not give the message out again).
    GetPublished,
    /// In `put` of a large message, copied, holding the put lock, its slot's position cleared
    /// but the record not yet READY (a death here drops the message).
    PutFinishing,
    /// In `get`, holding the get lock, having scanned up to the tail it knew past a record
    /// still being written, before it looks at the tail again.
    GetScanned,
    /// In `unfinished` (what `join` waits on), between the loads of its two counters.
    Counting,
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

/// Where a new record of `rec` bytes goes, given the ring's capacity (a power of two) and its
/// `free` and `tail` positions (monotonic byte counts; offset = position % cap). Returns the
/// padding to skip to the end of the ring first, or `None` if it does not fit now.
///
/// Records never straddle the end of the ring. Past `soft` bytes into the ring, a record
/// wraps early to offset 0, so that a queue that keeps up touches the same few MiB instead of
/// cycling through its whole capacity: when the ring is empty (the padding then lies at
/// `free`, reclaimable at once), or when the backlog is small and `consuming` (getters are
/// taking messages: the padding is freed as soon as they get past the backlog). Not behind a
/// backlog nobody consumes: that padding would hold its room, and a producer filling the queue
/// before its consumers start would find only part of the ring.
pub(crate) fn placement(
    cap: u64,
    free: u64,
    tail: u64,
    rec: u64,
    soft: u64,
    consuming: bool,
) -> Option<u64> {
    let used = tail - free;
    debug_assert!(cap.is_power_of_two());
    let off = tail & (cap - 1);
    let to_end = cap - off;
    // Pad to the end when the record does not fit before it, or to wrap early.
    let wrap_early =
        off >= soft && (used == 0 || (consuming && used <= off / 2 && rec <= off - used));
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
    /// Non-zero for a JoinableQueue: `task_done` is allowed.
    joinable: AtomicU64,
    /// Non-zero once `close` was called (set under the put lock, never cleared).
    closed: AtomicU64,
}

/// Which lock a critical section holds, and so which undo log it writes. The put side owns
/// [`PutState`], the get side [`GetState`]; each reads the other's fields only as atomics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Put,
    Get,
}

/// Changed only under the put lock (through its undo log, except `free_seen`).
#[repr(C)]
struct PutState {
    /// End of the newest record. Storing it publishes the records before it.
    tail: AtomicU64,
    /// Records reserved: every put that got room (READY, WRITING, or since consumed/dropped).
    reserved: AtomicU64,
    /// Records made READY by their put.
    published: AtomicU64,
    /// WRITING records dropped (their writer failed or died): reserved, never published.
    dropped: AtomicU64,
    /// Large puts copying outside the lock (slots whose `pos` a put set).
    inflight: AtomicU64,
    /// The last `free` a putter read: `free` only grows, so an old value is a safe (pessimistic)
    /// bound, and a putter re-reads the consumers' line only when that bound says "no room".
    free_seen: AtomicU64,
    /// The `free` the previous put past the soft limit saw in this lap (`NO_POS`: none yet), to
    /// tell whether getters are consuming. A hint, like `free_seen`.
    soft_free: AtomicU64,
    /// `tail` at that put (`NO_POS`: none yet). Past the limit a putter reads the get side's
    /// line once per `SOFT_CHECK_EVERY` bytes put, not once per message.
    soft_check: AtomicU64,
}

/// Changed only under the get lock (through its undo log).
#[repr(C)]
struct GetState {
    /// Start of the oldest record not yet reclaimed. Storing it hands space back to putters.
    free: AtomicU64,
    /// No READY record lies before it.
    head: AtomicU64,
    /// Records claimed by a get.
    taken: AtomicU64,
    /// Claimed records made READY again (their reader died copying them).
    returned: AtomicU64,
    /// `task_done` calls (JoinableQueue).
    done: AtomicU64,
    /// Large gets copying outside the lock (slots whose `pos` a get set).
    inflight: AtomicU64,
    /// The highest `tail` a getter read: records below it are published, so getters scan up to
    /// it without touching the put side's line. A hint (never above `tail`, which only grows).
    tail_seen: AtomicU64,
}

#[repr(C)]
struct Log {
    len: AtomicU64,
    entries: [[AtomicU64; 2]; LOG_CAP],
}

#[repr(C)]
struct Slot {
    mutex: RawRobustMutex,
    /// Position of the record its holder is copying, or `NO_POS`. Changed under the lock of the
    /// holder's side.
    pos: AtomicU64,
}

#[repr(C)]
struct Header {
    fixed: Line<Fixed>,
    put_lock: Line<RawRobustMutex>,
    put: Line<PutState>,
    put_log: Line<Log>,
    get_lock: Line<RawRobustMutex>,
    get: Line<GetState>,
    get_log: Line<Log>,
    /// Futex words: bit 0 = "someone sleeps on me", the bits above = a wake-up sequence.
    items: Line<AtomicU32>,
    space: Line<AtomicU32>,
    joined: Line<AtomicU32>,
    slots: [Line<Slot>; NSLOTS],
}

const HDR_BYTES: usize = std::mem::size_of::<Header>().next_multiple_of(4096);

/// Smallest ring accepted.
pub(crate) const MIN_CAPACITY: usize = 256;
/// Largest ring accepted (record lengths are 32-bit).
pub(crate) const MAX_CAPACITY: usize = 1 << 31;

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

/// Where a blocked caller is in its wait: first a bounded spin on lock-free hints, then sleeps
/// armed under the lock (see README, "Waiting").
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Fresh,
    Spun,
    Sleep,
}

impl Phase {
    fn next(self) -> Phase {
        match self {
            Phase::Fresh => Phase::Spun,
            Phase::Spun | Phase::Sleep => Phase::Sleep,
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
    /// A new ring of `cap` bytes (rounded up to a power of two) limited to `maxsize` messages
    /// (0: no limit).
    pub(crate) fn create(cap: usize, maxsize: u64, joinable: bool) -> Result<Shared> {
        if cap > MAX_CAPACITY {
            return Err(Error::arg("queue byte capacity above 2 GiB"));
        }
        let cap = cap.max(MIN_CAPACITY).next_power_of_two();
        let fd = platform::memfd(c"multiproc-queue", HDR_BYTES + cap)?;
        let map = Mapping::new(fd.as_fd(), HDR_BYTES + cap)?;
        let s = Shared::from_parts(map, fd, cap as u64);
        let h = s.hdr();
        // SAFETY: the mapping is fresh, zero-filled, page aligned and large enough for a Header;
        // nobody else can see it before this function returns.
        unsafe {
            RawRobustMutex::init_at(&h.put_lock.0 as *const RawRobustMutex as *mut _, false)?;
            RawRobustMutex::init_at(&h.get_lock.0 as *const RawRobustMutex as *mut _, false)?;
            for slot in &h.slots {
                RawRobustMutex::init_at(&slot.0.mutex as *const RawRobustMutex as *mut _, false)?;
            }
        }
        for slot in &h.slots {
            slot.0.pos.store(NO_POS, Ordering::Relaxed);
        }
        h.put.0.soft_free.store(NO_POS, Ordering::Relaxed);
        h.put.0.soft_check.store(NO_POS, Ordering::Relaxed);
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
        if f.magic.load(Ordering::Acquire) != MAGIC
            || f.cap.load(Ordering::Relaxed) != cap
            || !cap.is_power_of_two()
        {
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
        // open); Header holds only atomics and pthread mutexes, valid for any bit pattern the
        // protocol writes, and is shared on purpose.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }

    fn ps(&self) -> &PutState {
        &self.hdr().put.0
    }

    fn gs(&self) -> &GetState {
        &self.hdr().get.0
    }

    fn ring(&self) -> *mut u8 {
        // SAFETY: HDR_BYTES is within the mapping (checked at create and open).
        unsafe { self.map.as_ptr().add(HDR_BYTES) }
    }

    /// Where position `pos` lies in the ring (`cap` is a power of two: no division on the hot
    /// path).
    fn offset(&self, pos: u64) -> u64 {
        pos & (self.cap - 1)
    }

    fn word(&self, pos: u64, second: bool) -> &AtomicU32 {
        let off = self.offset(pos) as usize + if second { 4 } else { 0 };
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
        let off = self.offset(pos) as usize + REC_HDR as usize;
        debug_assert!(off + len <= self.cap as usize);
        // SAFETY: in bounds of the ring, per the caller.
        unsafe { self.ring().add(off) }
    }

    /// The payload length of the record at `pos`, checked to lie inside the ring (a corrupt
    /// length becomes an error instead of an out-of-bounds read).
    fn checked_len(&self, pos: u64) -> Result<usize> {
        let len = self.rec_len(pos).load(Ordering::Relaxed) as u64;
        let off = self.offset(pos);
        if off + REC_HDR + len > self.cap {
            return Err(Error::Decode(
                "queue record overruns the ring (corrupt queue)".into(),
            ));
        }
        Ok(len as usize)
    }

    // -----------------------------------------------------------------------------------------
    // The two locks and their undo logs
    // -----------------------------------------------------------------------------------------

    fn mutex(&self, side: Side) -> &RawRobustMutex {
        match side {
            Side::Put => &self.hdr().put_lock.0,
            Side::Get => &self.hdr().get_lock.0,
        }
    }

    fn undo_log(&self, side: Side) -> &Log {
        match side {
            Side::Put => &self.hdr().put_log.0,
            Side::Get => &self.hdr().get_log.0,
        }
    }

    /// Takes one side's lock. Lock order: put, then get (a putter short of room reclaims);
    /// a thread holding the get lock never waits for the put lock.
    fn lock(&self, side: Side, deadline: Option<Instant>) -> Result<Guard<'_>> {
        let m = self.mutex(side);
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
        self.held(side, r)
    }

    /// The guard of a lock just taken with outcome `r`.
    fn held(&self, side: Side, r: RobustLock) -> Result<Guard<'_>> {
        let g = Guard {
            s: self,
            side,
            wake: Cell::new(0),
        };
        if r == RobustLock::OwnerDied {
            // The previous holder died inside a critical section: finish or undo it.
            g.recover();
            self.mutex(side).make_consistent()?;
        }
        Ok(g)
    }

    /// Settles a section left half done by a dead holder of `side`'s lock, if the lock is free
    /// now: the counters then say the truth again without waiting for that side's next
    /// operation.
    fn heal(&self, side: Side) {
        if let Ok(Some(r)) = self.mutex(side).try_lock() {
            let _ = self.held(side, r);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Counters (each read lock-free; exact only under both locks, which nobody takes)
    // -----------------------------------------------------------------------------------------

    /// READY records, as far as the counters tell (what `qsize` says).
    fn ready_hint(&self) -> u64 {
        let (ps, gs) = (self.ps(), self.gs());
        let made = ps.published.load(Ordering::Acquire) + gs.returned.load(Ordering::Acquire);
        made.saturating_sub(gs.taken.load(Ordering::Acquire))
    }

    /// READY plus WRITING records: what a bounded queue limits.
    fn queued(&self) -> u64 {
        let (ps, gs) = (self.ps(), self.gs());
        let live = ps
            .reserved
            .load(Ordering::Acquire)
            .saturating_sub(ps.dropped.load(Ordering::Acquire));
        let gone = gs
            .taken
            .load(Ordering::Acquire)
            .saturating_sub(gs.returned.load(Ordering::Acquire));
        live.saturating_sub(gone)
    }

    fn any_in_flight(&self) -> bool {
        self.ps().inflight.load(Ordering::Acquire) != 0
            || self.gs().inflight.load(Ordering::Acquire) != 0
    }

    // -----------------------------------------------------------------------------------------
    // Ring bookkeeping
    // -----------------------------------------------------------------------------------------

    /// Get side: advances `free` over finished records (publishing the space to putters);
    /// says whether it did.
    fn reclaim(&self, g: &Guard<'_>) -> bool {
        self.reclaim_from(g, self.gs().free.load(Ordering::Relaxed))
    }

    /// [`Shared::reclaim`], knowing that everything before `from` (at or past `free`) is
    /// finished.
    fn reclaim_from(&self, g: &Guard<'_>, from: u64) -> bool {
        debug_assert_eq!(g.side, Side::Get);
        let gs = self.gs();
        let free = gs.free.load(Ordering::Relaxed);
        let mut tail = gs.tail_seen.load(Ordering::Relaxed);
        let mut f = from;
        loop {
            if f >= tail {
                // Never look at or past the real `tail`: what lies there is free space, with
                // stale states from an earlier lap.
                tail = self.published_tail();
                if f >= tail {
                    break;
                }
            }
            debug_assert!(
                f < self.ps().tail.load(Ordering::Acquire),
                "reclaim past tail"
            );
            let k = kind(self.rec_state(f).load(Ordering::Acquire));
            if k != DONE && k != PAD {
                break;
            }
            f = self.next(f);
        }
        if f != free {
            if gs.head.load(Ordering::Relaxed) < f {
                g.set(&gs.head, f);
            }
            g.publish(&gs.free, f);
        }
        f != free
    }

    /// Reclaims from outside any lock (after a put side dropped a record, or when a putter finds
    /// no room): takes the get lock briefly.
    fn reclaim_now(&self) {
        if let Ok(g) = self.lock(Side::Get, None) {
            let freed = self.reclaim(&g);
            g.commit();
            if freed {
                g.signal(SPACE);
            }
        }
    }

    /// Put side: reserves room for a record with a `len`-byte payload; returns its position.
    /// Writes the padding record if any (beyond `tail`, so invisible until `tail` moves).
    fn reserve(&self, g: &Guard<'_>, len: u64) -> Option<u64> {
        debug_assert_eq!(g.side, Side::Put);
        let ps = self.ps();
        let maxsize = self.maxsize();
        if maxsize != 0 && self.queued() >= maxsize {
            return None;
        }
        let tail = ps.tail.load(Ordering::Relaxed);
        let rec = rec_size(len);
        let mut free = ps.free_seen.load(Ordering::Relaxed);
        let mut consuming = false;
        let last = ps.soft_check.load(Ordering::Relaxed);
        if self.offset(tail) >= self.soft && (last == NO_POS || tail >= last + SOFT_CHECK_EVERY) {
            // Past the soft limit the true `free` decides whether to wrap early (a stale one
            // would walk the whole ring, touching every page), and whether getters are taking
            // messages (it moved since the previous put past the limit).
            free = self.gs().free.load(Ordering::Acquire);
            let before = ps.soft_free.load(Ordering::Relaxed);
            consuming = before != NO_POS && free > before;
            ps.soft_free.store(free, Ordering::Relaxed);
            ps.soft_check.store(tail, Ordering::Relaxed);
            ps.free_seen.store(free, Ordering::Relaxed);
        }
        let fits = |free| placement(self.cap, free, tail, rec, self.soft, consuming);
        let pad = match fits(free) {
            Some(pad) => pad,
            None => {
                free = self.gs().free.load(Ordering::Acquire);
                if fits(free).is_none() {
                    // Finished records (a padding left by an early wrap, say) may hold the
                    // room while no getter runs: reclaim them here. Lock order: the put lock
                    // may be held while taking the get lock, never the reverse.
                    self.reclaim_now();
                    free = self.gs().free.load(Ordering::Acquire);
                }
                ps.free_seen.store(free, Ordering::Relaxed);
                fits(free)?
            }
        };
        if pad > 0 {
            self.rec_len(tail)
                .store((pad - REC_HDR) as u32, Ordering::Relaxed);
            self.rec_state(tail).store(PAD, Ordering::Release);
            // A new lap: whether getters keep up is judged afresh past the limit.
            ps.soft_free.store(NO_POS, Ordering::Relaxed);
            ps.soft_check.store(NO_POS, Ordering::Relaxed);
        }
        Some(tail + pad)
    }

    /// Get side: finds the first READY record from `head`; returns it and where `head` goes
    /// once it is claimed.
    ///
    /// Every state read in a pass comes after the load of the tail the pass scans up to. A
    /// record seen WRITING may turn READY as soon as it was read, and its producer may then put
    /// more: so when the pass runs out and a newer tail shows more records, the next pass starts
    /// again at the first WRITING record instead of going on past it, or one producer's later
    /// message would be taken before its earlier one. (Only WRITING can change under the get
    /// lock: READY, DONE, PAD and READING records stay as read.)
    fn find_ready(&self) -> Option<(u64, u64)> {
        let gs = self.gs();
        let mut p = gs.head.load(Ordering::Relaxed);
        let mut first_writing = None;
        // Scan what getters already know is published first: the put side's line is only
        // pulled over when that runs out.
        let mut tail = gs.tail_seen.load(Ordering::Relaxed);
        loop {
            while p < tail {
                debug_assert!(p < self.ps().tail.load(Ordering::Acquire), "scan past tail");
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
            if first_writing.is_some() {
                test_point(TestPoint::GetScanned);
            }
            let now = self.published_tail();
            if now == tail {
                return None;
            }
            tail = now;
            if let Some(w) = first_writing.take() {
                p = w;
            }
        }
    }

    /// Get side: reads `tail` from the put side and remembers it in `tail_seen`.
    fn published_tail(&self) -> u64 {
        let tail = self.ps().tail.load(Ordering::Acquire);
        self.gs().tail_seen.fetch_max(tail, Ordering::Relaxed);
        tail
    }

    /// Lock-free: whether a get may find something (known unread records, or the counters).
    fn maybe_ready(&self) -> bool {
        let gs = self.gs();
        gs.head.load(Ordering::Relaxed) < gs.tail_seen.load(Ordering::Relaxed)
            || self.ready_hint() > 0
    }

    /// Takes a free operation slot (non-blocking), repairing it first if its last holder died
    /// copying a record of this side; says whether it repaired (which may have changed the
    /// ring: callers recompute). A dead holder of the other side's record is left for that side.
    fn acquire_slot(&self, g: &Guard<'_>) -> Option<(usize, bool)> {
        let side = slot_range(g.side);
        let start = SLOT_HINT.with(Cell::get);
        for i in 0..side.len() {
            let s = side.start + (start + i) % side.len();
            let slot = &self.hdr().slots[s].0;
            match slot.mutex.try_lock() {
                Ok(Some(RobustLock::Acquired)) if slot.pos.load(Ordering::Relaxed) == NO_POS => {
                    SLOT_HINT.with(|h| h.set(s));
                    return Some((s, false));
                }
                Ok(Some(_)) => {
                    // Its holder died (with or without an operation in flight).
                    let _ = slot.mutex.make_consistent();
                    match self.repair_slot(g, s) {
                        Repair::Nothing | Repair::Repaired => {
                            SLOT_HINT.with(|h| h.set(s));
                            let repaired = slot.pos.load(Ordering::Relaxed) == NO_POS;
                            if repaired {
                                return Some((s, true));
                            }
                            let _ = slot.mutex.unlock();
                        }
                        Repair::OtherSide => {
                            let _ = slot.mutex.unlock();
                        }
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// Slot `s`'s holder died (the caller holds its side's lock and slot `s`): settles the
    /// record it was copying if it belongs to the caller's side, and commits. A half-written
    /// message is dropped; a half-read one is made READY again (its reader never returned it,
    /// so nobody saw it twice).
    fn repair_slot(&self, g: &Guard<'_>, s: usize) -> Repair {
        let slot = &self.hdr().slots[s].0;
        let pos = slot.pos.load(Ordering::Relaxed);
        if pos == NO_POS {
            return Repair::Nothing;
        }
        let state = self.rec_state(pos).load(Ordering::Acquire);
        match g.side {
            Side::Put if state == in_flight(WRITING, s) => {
                let ps = self.ps();
                g.set(&ps.dropped, ps.dropped.load(Ordering::Relaxed) + 1);
                g.slot_pos(slot, NO_POS);
                g.publish_rec(pos, DONE);
                g.commit();
                g.signal(SPACE);
            }
            Side::Get if state == in_flight(READING, s) => {
                let gs = self.gs();
                g.set(&gs.returned, gs.returned.load(Ordering::Relaxed) + 1);
                if gs.head.load(Ordering::Relaxed) > pos {
                    g.set(&gs.head, pos);
                }
                g.slot_pos(slot, NO_POS);
                g.set_rec(pos, READY);
                g.commit();
                g.signal(ITEMS);
            }
            _ if kind(state) == WRITING || kind(state) == READING => return Repair::OtherSide,
            _ => {
                // Not in flight any more (cannot happen while the protocol holds): forget it.
                g.slot_pos(slot, NO_POS);
                g.commit();
            }
        }
        Repair::Repaired
    }

    /// Looks for in-flight operations of `side` whose process died, and settles them; says
    /// whether it found any. The caller holds no lock.
    ///
    /// A live copier keeps its slot locked while the slot's `pos` is set, so the look is a load
    /// per slot and a failed `try_lock` per operation in flight, and the side's lock is taken
    /// only when a slot is found abandoned. That makes it cheap enough for every `try_get` or
    /// `try_put` that comes back empty-handed. (Lock order: a slot, then its side's lock, as a
    /// copier finishing its operation takes them.)
    fn reap_dead(&self, side: Side) -> bool {
        let busy = match side {
            Side::Put => &self.ps().inflight,
            Side::Get => &self.gs().inflight,
        };
        if busy.load(Ordering::Acquire) == 0 {
            return false;
        }
        let mut held = [0usize; NSLOTS / 2];
        let mut n = 0;
        for s in slot_range(side) {
            let slot = &self.hdr().slots[s].0;
            if slot.pos.load(Ordering::Acquire) == NO_POS {
                continue;
            }
            if let Ok(Some(_)) = slot.mutex.try_lock() {
                // Its holder died (or finished since `pos` was read: the repair then finds
                // nothing to do).
                let _ = slot.mutex.make_consistent();
                held[n] = s;
                n += 1;
            }
        }
        if n == 0 {
            return false;
        }
        let mut repaired = false;
        if let Ok(g) = self.lock(side, None) {
            for &s in &held[..n] {
                repaired |= self.repair_slot(&g, s) == Repair::Repaired;
            }
            drop(g);
        }
        for &s in &held[..n] {
            let _ = self.hdr().slots[s].0.mutex.unlock();
        }
        if repaired && side == Side::Put {
            // A dropped record may be what holds `free` back.
            self.reclaim_now();
        }
        repaired
    }

    /// Settles dead peers' operations on both sides; says whether it found any (the caller
    /// holds no lock).
    fn reap_all(&self) -> bool {
        self.any_in_flight() && (self.reap_dead(Side::Put) | self.reap_dead(Side::Get))
    }

    /// For a try about to fail: settles dead copiers, at most once per call (`reaped`), and
    /// says whether that found any (then the caller looks again). A caller that only ever tries
    /// must get back what a dead reader held, and find the room a dead writer's record held.
    fn reap_once(&self, reaped: &mut bool) -> bool {
        if *reaped {
            return false;
        }
        *reaped = true;
        self.reap_all()
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
                // Look at the peer's cache line rarely: every look pulls it over, and the peer
                // then pays to pull it back for its next write.
                for _ in 0..SPIN_PAUSES {
                    std::hint::spin_loop();
                }
            }
            i = i.wrapping_add(1);
            if yielding || i % 8 == 0 {
                let now = Instant::now();
                let spent = now - start;
                if spent >= SPIN_FOR || deadline.is_some_and(|d| now >= d) {
                    return;
                }
                yielding = spent >= SPIN_ONLY_FOR;
            }
        }
    }

    /// Announces a sleeper on `w`; returns the futex value to sleep on. The caller then checks
    /// (for real, under its lock) whether it can proceed, and sleeps only if not.
    fn arm(w: &Line<AtomicU32>) -> u32 {
        let armed = w.0.fetch_or(1, Ordering::SeqCst) | 1;
        std::sync::atomic::fence(Ordering::SeqCst);
        armed
    }

    /// Sleeps on `w` while it still holds `armed`, at most one slice (dead peers are looked for
    /// between slices). Returns false once the deadline passed.
    fn sleep(w: &Line<AtomicU32>, armed: u32, deadline: Option<Instant>) -> bool {
        let slice = match deadline {
            None => WAIT_SLICE,
            Some(d) => d.saturating_duration_since(Instant::now()).min(WAIT_SLICE),
        };
        if slice.is_zero() {
            return false;
        }
        platform::futex_wait(&w.0, armed, Some(slice));
        true
    }

    fn closed(&self) -> bool {
        self.hdr().fixed.0.closed.load(Ordering::Acquire) != 0
    }

    /// A lock-free guess whether a record of `rec` bytes would fit now.
    fn space_hint(&self, rec: u64) -> bool {
        let maxsize = self.maxsize();
        if maxsize != 0 && self.queued() >= maxsize {
            return false;
        }
        let used = self
            .ps()
            .tail
            .load(Ordering::Relaxed)
            .saturating_sub(self.gs().free.load(Ordering::Relaxed));
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
        let mut phase = Phase::Fresh;
        // Whether this call already looked for dead copiers (see `reap_once`).
        let mut reaped = false;
        loop {
            if self.closed() {
                return Err(Error::Closed);
            }
            let g = self
                .lock(Side::Put, deadline)
                .map_err(timeout_to(Error::Full))?;
            // Checked under the put lock, which `close` takes: no put lands after a close.
            if self.closed() {
                return Err(Error::Closed);
            }
            let armed = (phase == Phase::Sleep).then(|| Shared::arm(&self.hdr().space));
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
            drop(g);
            if matches!(wait, Wait::Try) {
                if self.reap_once(&mut reaped) {
                    continue;
                }
                return Err(Error::Full);
            }
            match armed {
                None => self.spin(deadline, || self.closed() || self.space_hint(rec)),
                Some(armed) => {
                    // Records dropped by failed or dead writers may hold the space.
                    self.reap_all();
                    self.reclaim_now();
                    if !Shared::sleep(&self.hdr().space, armed, deadline) {
                        return Err(Error::Full);
                    }
                }
            }
            phase = phase.next();
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
        let ps = self.ps();
        g.set(&ps.reserved, ps.reserved.load(Ordering::Relaxed) + 1);
        g.set(&ps.published, ps.published.load(Ordering::Relaxed) + 1);
        test_point(TestPoint::PutLocked);
        g.publish(&ps.tail, pos + rec_size(len as u64));
        test_point(TestPoint::PutPublished);
        g.commit();
        g.signal(ITEMS);
        drop(g);
        Ok(())
    }

    fn put_outside<F>(&self, g: Guard<'_>, pos: u64, len: usize, s: usize, write: F) -> Result<()>
    where
        F: FnOnce(&mut [u8]) -> Result<usize>,
    {
        let ps = self.ps();
        let slot = &self.hdr().slots[s].0;
        self.rec_len(pos).store(len as u32, Ordering::Relaxed);
        self.rec_state(pos)
            .store(in_flight(WRITING, s), Ordering::Release);
        g.slot_pos(slot, pos);
        g.set(&ps.reserved, ps.reserved.load(Ordering::Relaxed) + 1);
        g.publish(&ps.tail, pos + rec_size(len as u64));
        g.commit();
        drop(g);
        let op = SlotOp {
            s: self,
            side: Side::Put,
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
        g.set(&ps.published, ps.published.load(Ordering::Relaxed) + 1);
        g.slot_pos(slot, NO_POS);
        test_point(TestPoint::PutFinishing);
        g.publish_rec(pos, READY);
        g.commit();
        g.signal(ITEMS);
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
        let mut read = Some(read);
        let mut phase = Phase::Fresh;
        // Whether this call already looked for dead copiers (see `reap_once`).
        let mut reaped = false;
        loop {
            let deadline = wait.deadline();
            if phase != Phase::Sleep && !self.maybe_ready() {
                // Nothing to take by the counters: no need for the lock yet.
                if self.drained() {
                    return Err(Error::Closed);
                }
                if matches!(wait, Wait::Try) {
                    if self.reap_once(&mut reaped) {
                        continue;
                    }
                    return Err(Error::Empty);
                }
                if phase == Phase::Fresh {
                    self.spin(deadline, || self.ready_hint() > 0 || self.closed());
                    phase = Phase::Spun;
                    continue;
                }
                phase = Phase::Sleep;
            }
            if phase == Phase::Sleep {
                // Dead peers' operations may be what holds the messages back.
                self.reap_all();
            }
            let g = self
                .lock(Side::Get, deadline)
                .map_err(timeout_to(Error::Empty))?;
            let armed = (phase == Phase::Sleep).then(|| Shared::arm(&self.hdr().items));
            if let Some((mut pos, mut head)) = self.find_ready() {
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
            drop(g);
            if self.ready_hint() > 0 {
                // The counters promise a message the ring does not hold: a putter may have
                // died before publishing it (or is publishing it right now).
                self.heal(Side::Put);
            }
            if self.drained() {
                return Err(Error::Closed);
            }
            if matches!(wait, Wait::Try) {
                if self.reap_once(&mut reaped) {
                    continue;
                }
                return Err(Error::Empty);
            }
            match armed {
                None => {
                    self.spin(deadline, || self.ready_hint() > 0 || self.closed());
                    phase = phase.next();
                }
                Some(armed) => {
                    if !Shared::sleep(&self.hdr().items, armed, deadline) {
                        // Out of time: one last look without waiting.
                        wait = Wait::Try;
                        phase = Phase::Spun;
                    }
                }
            }
        }
    }

    /// Closed, and nothing left nor being written, nor held by a get that may still give its
    /// message back. The caller holds no lock.
    ///
    /// Decided under the get lock, never from lock-free counts: a get section counts its
    /// message as taken before its commit point, and a large get's message comes back if its
    /// reader dies copying it. Read without the lock, either looked drained while the message
    /// could still return (the section undone, the reader repaired), and a consumer told
    /// `Closed` then would never come back for it. While the get lock is busy the answer is
    /// "not yet" (the caller waits, or reports `Empty`).
    fn drained(&self) -> bool {
        if !self.closed() {
            return false;
        }
        // A large put or get whose process died copying holds its message (to drop, or to give
        // back) until someone repairs it: blocked callers do every slice, but a caller that
        // only ever tries would wait for them forever. Takes each side's lock in turn.
        self.reap_all();
        // A section left half done by a dead putter: settle it (lock order: put, then get;
        // both are only tried here).
        self.heal(Side::Put);
        let Ok(Some(r)) = self.mutex(Side::Get).try_lock() else {
            return false;
        };
        let Ok(g) = self.held(Side::Get, r) else {
            return false;
        };
        // After `close` no put reserves any more, so `reserved` is final; a WRITING record still
        // counts in `queued` until its put finishes or is dropped.
        let drained = self.queued() == 0 && self.gs().inflight.load(Ordering::Relaxed) == 0;
        drop(g);
        drained
    }

    fn claim(&self, g: &Guard<'_>, pos: u64, head: u64, state: u32) {
        let gs = self.gs();
        g.set_rec(pos, state);
        g.set(&gs.head, head);
        g.set(&gs.taken, gs.taken.load(Ordering::Relaxed) + 1);
    }

    fn get_inline<R, F>(&self, g: Guard<'_>, pos: u64, head: u64, len: usize, read: F) -> Result<R>
    where
        F: FnOnce(&[u8]) -> Result<R>,
    {
        // SAFETY: the record is READY and we hold the get lock: no other getter claims it, and
        // putters never touch records below `tail`.
        let buf = unsafe { std::slice::from_raw_parts(self.payload(pos, len), len) };
        let r = read(buf);
        let gs = self.gs();
        if pos == gs.free.load(Ordering::Relaxed) {
            // The oldest record: reclaimed at once (`free` moves past it), so its state word
            // need not be written. Not writing it keeps the record's cache line clean for the
            // putter, which is writing the next records into that same line.
            g.set(&gs.head, head);
            g.set(&gs.taken, gs.taken.load(Ordering::Relaxed) + 1);
            test_point(TestPoint::GetLocked);
            self.reclaim_from(&g, self.next(pos));
            test_point(TestPoint::GetPublished);
        } else {
            self.claim(&g, pos, head, DONE);
            test_point(TestPoint::GetLocked);
            self.reclaim(&g);
        }
        g.commit();
        g.signal(SPACE);
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
        g.signal(SPACE);
        drop(g);
        let op = SlotOp {
            s: self,
            side: Side::Get,
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
        g.slot_pos(slot, NO_POS);
        g.set_rec(pos, DONE);
        self.reclaim(&g);
        g.commit();
        g.signal(SPACE);
        if self.closed() {
            // Getters of a closed queue wait for in-flight reads before they say drained.
            g.signal(ITEMS);
        }
        drop(g);
        op.release();
        r
    }

    /// Refuses further puts; wakes every blocked caller (see the queue docs for what each
    /// then gets). Taken under the put lock, so every put either landed before it or fails.
    pub(crate) fn close(&self) -> Result<()> {
        let g = self.lock(Side::Put, None)?;
        self.hdr().fixed.0.closed.store(1, Ordering::SeqCst);
        g.signal_all();
        drop(g);
        Ok(())
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed()
    }

    /// READY records: messages that a `get` would find now.
    pub(crate) fn qsize(&self) -> usize {
        self.heal(Side::Put);
        self.heal(Side::Get);
        self.ready_hint() as usize
    }

    /// Whether a put would have to wait now (count limit reached, or the ring has no room for
    /// even an empty message).
    pub(crate) fn full(&self) -> bool {
        !self.space_hint(rec_size(0))
    }

    /// Items put and not yet marked done.
    ///
    /// `done` is read first: both counters only grow (a put rolled back only takes back an
    /// increment that never counted) and `done <= published`, so the difference can be zero
    /// only if it was zero when `done` was read. Read the other way
    /// round, a put and a `task_done` between the two loads made it look zero while an item was
    /// unfinished all along, and `join` returned early (`tests/queue_order.rs`).
    pub(crate) fn unfinished(&self) -> u64 {
        let done = self.gs().done.load(Ordering::Acquire);
        test_point(TestPoint::Counting);
        self.ps()
            .published
            .load(Ordering::Acquire)
            .saturating_sub(done)
    }

    /// One `task_done`: fails if there is no unfinished item.
    pub(crate) fn task_done(&self) -> Result<()> {
        debug_assert!(self.joinable());
        let g = self.lock(Side::Get, None)?;
        let gs = self.gs();
        let done = gs.done.load(Ordering::Relaxed);
        let put = self.ps().published.load(Ordering::Acquire);
        if done >= put {
            return Err(Error::state(
                "task_done() called more times than there were items put",
            ));
        }
        g.publish(&gs.done, done + 1);
        g.commit();
        if done + 1 == put {
            g.signal(JOINED);
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
            let armed = Shared::arm(&self.hdr().joined);
            if self.unfinished() == 0 {
                return Ok(());
            }
            if !Shared::sleep(&self.hdr().joined, armed, deadline) {
                return if self.unfinished() == 0 {
                    Ok(())
                } else {
                    Err(Error::Timeout)
                };
            }
        }
    }
}

/// What [`Shared::repair_slot`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Repair {
    /// The slot had no operation in flight.
    Nothing,
    /// The dead holder's record was settled (and the slot's `pos` cleared).
    Repaired,
    /// The record belongs to the other side: left for it.
    OtherSide,
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

/// One side's lock, held. Every change to shared state made while holding it goes through
/// [`Guard::set`] / [`Guard::set_rec`] (logged: undone if the section does not finish) and at
/// most one final [`Guard::publish`] / [`Guard::publish_rec`] (the section's commit point: once
/// it is stored the other side may act on it, so a section that got that far is kept, never
/// undone). [`Guard::commit`] forgets the log. Dropping the guard without committing (an error
/// or a panic) undoes the changes, and so does the next locker if the holder died.
struct Guard<'a> {
    s: &'a Shared,
    side: Side,
    /// Futexes to wake once the lock is released (`ITEMS`, `SPACE`, `JOINED` bits).
    wake: Cell<u8>,
}

const ITEMS: u8 = 1;
const SPACE: u8 = 2;
const JOINED: u8 = 4;

impl Guard<'_> {
    /// After a published change others may wait for: asks to wake `w`'s sleepers, if any,
    /// once the lock is released (see [`Guard::drop`]).
    fn signal(&self, bit: u8) {
        self.wake.set(self.wake.get() | bit);
    }

    /// Wakes everyone, armed or not (for `close`).
    fn signal_all(&self) {
        let h = self.s.hdr();
        for w in [&h.items, &h.space, &h.joined] {
            let _ = w.0.fetch_update(Ordering::SeqCst, Ordering::Relaxed, |v| {
                Some((v & !1).wrapping_add(2))
            });
            platform::futex_wake(&w.0, u32::MAX);
        }
    }

    /// Sets a slot's in-flight position, keeping this side's `inflight` count.
    fn slot_pos(&self, slot: &Slot, pos: u64) {
        let count = match self.side {
            Side::Put => &self.s.ps().inflight,
            Side::Get => &self.s.gs().inflight,
        };
        let was = slot.pos.load(Ordering::Relaxed) != NO_POS;
        let now = pos != NO_POS;
        self.set(&slot.pos, pos);
        if was != now {
            let n = count.load(Ordering::Relaxed);
            self.set(count, if now { n + 1 } else { n.saturating_sub(1) });
        }
    }

    fn key_of(&self, p: *const u8, wide32: bool) -> u64 {
        let off = p as usize - self.s.map.as_ptr() as usize;
        off as u64 | if wide32 { KEY_U32 } else { 0 }
    }

    fn log(&self, key: u64, old: u64) {
        let l = self.s.undo_log(self.side);
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

    /// The section's last store, visible to the other side (see [`Guard`]).
    fn publish(&self, field: &AtomicU64, v: u64) {
        let old = field.load(Ordering::Relaxed);
        debug_assert_ne!(old, v, "a publishing store must change its field");
        self.log(
            self.key_of(field as *const AtomicU64 as *const u8, false) | KEY_PUBLISH,
            old,
        );
        field.store(v, Ordering::Release);
    }

    /// [`Guard::publish`] for a record's state word.
    fn publish_rec(&self, pos: u64, v: u32) {
        let w = self.s.rec_state(pos);
        let old = w.load(Ordering::Relaxed);
        debug_assert_ne!(old, v, "a publishing store must change its field");
        self.log(
            self.key_of(w as *const AtomicU32 as *const u8, true) | KEY_PUBLISH,
            old as u64,
        );
        w.store(v, Ordering::Release);
    }

    fn commit(&self) {
        self.s.undo_log(self.side).len.store(0, Ordering::Release);
    }

    /// The word an undo-log key names, if it lies inside the mapping and is aligned.
    fn entry_word(&self, key: u64) -> Option<Word<'_>> {
        let base = self.s.map.as_ptr();
        let size = self.s.map.len();
        let off = (key & !(KEY_U32 | KEY_PUBLISH)) as usize;
        if key & KEY_U32 != 0 {
            // SAFETY: in bounds and aligned (checked); shared words are atomics.
            (off % 4 == 0 && off + 4 <= size)
                .then(|| Word::W32(unsafe { &*(base.add(off) as *const AtomicU32) }))
        } else {
            // SAFETY: in bounds and aligned (checked); shared words are atomics.
            (off % 8 == 0 && off + 8 <= size)
                .then(|| Word::W64(unsafe { &*(base.add(off) as *const AtomicU64) }))
        }
    }

    /// After the holder died: if the section got as far as its publishing store, keeps it
    /// (the other side may already have acted on it); otherwise undoes it.
    fn recover(&self) {
        let l = self.s.undo_log(self.side);
        let n = (l.len.load(Ordering::Acquire) as usize).min(LOG_CAP);
        let published = l.entries[..n].iter().any(|e| {
            let key = e[0].load(Ordering::Relaxed);
            let old = e[1].load(Ordering::Relaxed);
            key & KEY_PUBLISH != 0 && self.entry_word(key).is_some_and(|w| w.get() != old)
        });
        if published {
            self.commit();
        } else {
            self.rollback();
        }
    }

    fn rollback(&self) {
        let l = self.s.undo_log(self.side);
        let n = (l.len.load(Ordering::Acquire) as usize).min(LOG_CAP);
        for e in l.entries[..n].iter().rev() {
            let key = e[0].load(Ordering::Relaxed);
            let old = e[1].load(Ordering::Relaxed);
            if let Some(w) = self.entry_word(key) {
                w.set(old);
            }
        }
        l.len.store(0, Ordering::Release);
    }
}

/// A shared word named by an undo-log entry.
enum Word<'a> {
    W32(&'a AtomicU32),
    W64(&'a AtomicU64),
}

impl Word<'_> {
    fn get(&self) -> u64 {
        match self {
            Word::W32(w) => w.load(Ordering::Acquire) as u64,
            Word::W64(w) => w.load(Ordering::Acquire),
        }
    }
    fn set(&self, v: u64) {
        match self {
            Word::W32(w) => w.store(v as u32, Ordering::Release),
            Word::W64(w) => w.store(v, Ordering::Release),
        }
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        // Committed sections left an empty log: nothing to undo.
        self.rollback();
        let _ = self.s.mutex(self.side).unlock();
        let wake = self.wake.get();
        if wake == 0 {
            return;
        }
        // Dekker with the sleepers (`Shared::arm`, then their check): the published store is
        // before this fence, their arming before their check, so either they see the change or
        // this sees them armed. The unlock above already drained the store buffer, which makes
        // the fence cheap.
        std::sync::atomic::fence(Ordering::SeqCst);
        let h = self.s.hdr();
        for (bit, w) in [(ITEMS, &h.items), (SPACE, &h.space), (JOINED, &h.joined)] {
            if wake & bit == 0 {
                continue;
            }
            let w = &w.0;
            let mut v = w.load(Ordering::Relaxed);
            while v & 1 != 0 {
                match w.compare_exchange_weak(
                    v,
                    (v & !1).wrapping_add(2),
                    Ordering::SeqCst,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        platform::futex_wake(w, u32::MAX);
                        break;
                    }
                    Err(now) => v = now,
                }
            }
        }
    }
}

/// An operation copying outside the locks while holding slot `slot`. Dropped without
/// [`SlotOp::release`] (an error or a panic while copying), it settles the record: a put's
/// record is dropped, a get's record is consumed.
struct SlotOp<'a> {
    s: &'a Shared,
    side: Side,
    slot: usize,
    pos: u64,
    done: bool,
}

impl<'a> SlotOp<'a> {
    /// Takes this side's lock to finish the operation. Waits without a deadline: the lock is
    /// only ever held briefly, and a dead holder hands it over at once. Fails only if the lock
    /// is unusable (then the whole queue is).
    fn finish_lock(&self) -> Result<Guard<'a>> {
        self.s.lock(self.side, None)
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
        let slot = &s.hdr().slots[self.slot].0;
        let Ok(g) = self.finish_lock() else {
            let _ = slot.mutex.unlock();
            return;
        };
        g.slot_pos(slot, NO_POS);
        match self.side {
            Side::Put => {
                // The message was never complete: drop it (its put fails).
                let ps = s.ps();
                g.set(&ps.dropped, ps.dropped.load(Ordering::Relaxed) + 1);
                g.publish_rec(self.pos, DONE);
                g.commit();
            }
            Side::Get => {
                // Its reader failed: consumed all the same.
                g.set_rec(self.pos, DONE);
                s.reclaim(&g);
                g.commit();
            }
        }
        g.signal(SPACE);
        drop(g);
        let _ = slot.mutex.unlock();
        if self.side == Side::Put {
            s.reclaim_now();
        }
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
        assert_eq!(placement(cap, 0, 0, 64, 512, true), Some(0));
        // A full ring refuses.
        assert_eq!(placement(cap, 0, 1024, 8, 512, true), None);
        // Does not fit before the end: pad to the end if the start is free.
        assert_eq!(placement(cap, 900, 1000, 64, 4096, true), Some(24));
        assert_eq!(placement(cap, 10, 1000, 64, 4096, true), None);
        // Past the soft limit with an empty ring: wrap early.
        assert_eq!(placement(cap, 640, 640, 64, 512, false), Some(384));
        // ... and behind a small backlog that getters are consuming,
        assert_eq!(placement(cap, 600, 640, 64, 512, true), Some(384));
        // ... but not behind one nobody consumes (the padding would hold its room),
        assert_eq!(placement(cap, 600, 640, 64, 512, false), Some(0));
        // ... nor behind a large one.
        assert_eq!(placement(cap, 100, 640, 64, 512, true), Some(0));
        // Records never overlap live data.
        for free in (0..2048).step_by(8) {
            for used in (0..=1024u64).step_by(8) {
                let tail = free + used;
                for rec in [16u64, 64, 256, 1024] {
                    if let Some(pad) = placement(cap, free, tail, rec, 512, true) {
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
            // Drained: every record reclaimed.
            assert_eq!(
                s.gs().free.load(Ordering::Relaxed),
                s.ps().tail.load(Ordering::Relaxed)
            );
        }
        // Positions only grow, but records wrap early once past the soft limit with a small
        // backlog: the ring keeps reusing its first half.
        assert!(s.ps().tail.load(Ordering::Relaxed) > s.cap);
    }

    #[test]
    fn a_queue_that_keeps_up_reuses_the_start_of_its_ring() {
        let s = Shared::create(1 << 20, 0, false).unwrap();
        let mut high = 0;
        for i in 0..200_000u32 {
            s.put(
                4,
                |b| {
                    b.copy_from_slice(&i.to_le_bytes());
                    Ok(4)
                },
                Wait::Try,
            )
            .unwrap();
            high = high.max(s.offset(s.ps().tail.load(Ordering::Relaxed)));
            let v = s.get(|b| Ok(b.to_vec()), Wait::Try).unwrap();
            assert_eq!(v, i.to_le_bytes());
        }
        // Memory touched stays near the soft limit, not the whole ring.
        assert!(s.ps().tail.load(Ordering::Relaxed) > 2 * s.cap);
        assert!(high <= s.soft + 64, "touched up to {high} of {}", s.cap);
    }

    #[test]
    fn a_producer_alone_can_fill_the_whole_ring_after_an_early_wrap() {
        let s = Shared::create(1 << 16, 0, false).unwrap();
        let put = |i: u32| {
            s.put(
                4,
                |b| {
                    b.copy_from_slice(&i.to_le_bytes());
                    Ok(4)
                },
                Wait::Try,
            )
        };
        for i in 0..10_000u32 {
            put(i).unwrap();
            s.get(|b| Ok(b.to_vec()), Wait::Try).unwrap();
        }
        let mut n = 0;
        while put(n).is_ok() {
            n += 1;
        }
        // 16 bytes a record: every byte of the ring is usable, whatever the wraps did.
        assert!(n as u64 >= s.cap / 16 - 1, "only {n} records fit");
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
        assert_eq!(s.queued(), 0);
        assert!(!s.any_in_flight());
        assert_eq!(
            s.gs().free.load(Ordering::Relaxed),
            s.ps().tail.load(Ordering::Relaxed),
            "the dropped record was reclaimed"
        );
    }

    #[test]
    fn rollback_undoes_uncommitted_changes() {
        let s = Shared::create(4096, 0, false).unwrap();
        {
            let g = s.lock(Side::Get, None).unwrap();
            g.set(&s.gs().taken, 42);
            g.set_rec(0, READY);
            // dropped without commit
        }
        assert_eq!(s.gs().taken.load(Ordering::Relaxed), 0);
        assert_eq!(s.rec_state(0).load(Ordering::Relaxed), 0);
    }

    #[test]
    fn recovery_keeps_a_published_section_and_undoes_an_unpublished_one() {
        let s = Shared::create(4096, 0, false).unwrap();
        // A section cut short before its publishing store: undone.
        let g = s.lock(Side::Put, None).unwrap();
        g.set(&s.ps().reserved, 7);
        g.recover();
        assert_eq!(s.ps().reserved.load(Ordering::Relaxed), 0);
        // A section cut short after it: kept (the other side may have seen it).
        g.set(&s.ps().reserved, 7);
        g.publish(&s.ps().tail, 64);
        g.recover();
        assert_eq!(s.ps().reserved.load(Ordering::Relaxed), 7);
        assert_eq!(s.ps().tail.load(Ordering::Relaxed), 64);
        assert_eq!(s.undo_log(Side::Put).len.load(Ordering::Relaxed), 0);
        std::mem::forget(g);
        let _ = s.mutex(Side::Put).unlock();
    }
}
