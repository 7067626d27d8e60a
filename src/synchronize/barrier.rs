//! `Barrier`: a small state machine ([`State`], pure, tested on its own) under a robust mutex,
//! plus a futex sequence number the waiters sleep on.
//!
//! Payload: the mutex at 0, the [`State`] at 64 (only touched with the mutex held), `seq` at 128
//! (the futex word, bumped with the mutex held whenever a generation ends or the barrier
//! breaks), the default timeout in nanoseconds at 136 (`u64::MAX`: none).
//!
//! A waiter reads `seq` with the mutex held before it sleeps, so any later trip, abort or reset
//! changes `seq` before the kernel's check: no lost wake-up. A process that dies inside the
//! (tiny) critical section leaves the state suspect: the next locker sees `OwnerDied` and
//! breaks the barrier. A participant that dies while *waiting* is invisible, which is why a
//! timeout breaks the barrier (as in Python) and every wait can be bounded.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Deadline;
use crate::error::{Error, Result};
use crate::heap::{self, Segment, kind};
use crate::platform::{self, RawRobustMutex, RobustLock};

const STATE_OFFSET: usize = 64;
const SEQ_OFFSET: usize = 128;
const TIMEOUT_OFFSET: usize = 136;
const LEN: usize = 192;
const _: () = assert!(std::mem::size_of::<RawRobustMutex>() <= STATE_OFFSET);
const _: () = assert!(std::mem::size_of::<State>() <= SEQ_OFFSET - STATE_OFFSET);

// ---------------------------------------------------------------------------------------------
// The pure state machine
// ---------------------------------------------------------------------------------------------

/// The barrier's state. Generations count the cycles; `reset_mask` remembers, for the last 64
/// generations, which ones ended by a reset (their waiters get `BrokenBarrier`) rather than by
/// filling up, so a slow waiter learns its own generation's outcome even after later cycles.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct State {
    parties: u32,
    count: u32,
    generation: u32,
    broken: u32,
    reset_mask: u64,
}

/// What happens to a process arriving at the barrier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// It was the last one: the barrier trips, everybody passes.
    Trip { index: u32 },
    /// It must wait for `generation` to end.
    Wait { generation: u32, index: u32 },
    /// The barrier is broken.
    Broken,
}

/// Where a waiter of some generation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Check {
    Pending,
    Passed,
    Broken,
}

impl State {
    pub(crate) fn new(parties: u32) -> State {
        State {
            parties,
            ..State::default()
        }
    }

    fn end_generation(&mut self, by_reset: bool) {
        let bit = 1u64 << (self.generation % 64);
        if by_reset {
            self.reset_mask |= bit;
        } else {
            self.reset_mask &= !bit;
        }
        self.generation = self.generation.wrapping_add(1);
        self.count = 0;
    }

    pub(crate) fn arrive(&mut self) -> Arrival {
        if self.broken != 0 {
            return Arrival::Broken;
        }
        let index = self.count;
        self.count += 1;
        if self.count >= self.parties {
            self.end_generation(false);
            Arrival::Trip { index }
        } else {
            Arrival::Wait {
                generation: self.generation,
                index,
            }
        }
    }

    pub(crate) fn check(&self, generation: u32) -> Check {
        if self.generation == generation {
            if self.broken != 0 {
                Check::Broken
            } else {
                Check::Pending
            }
        } else if self.reset_mask & (1u64 << (generation % 64)) != 0 {
            Check::Broken
        } else {
            Check::Passed
        }
    }

    /// A waiter of `generation` leaves because the barrier broke.
    pub(crate) fn leave_broken(&mut self, generation: u32) {
        if self.generation == generation {
            self.count = self.count.saturating_sub(1);
        }
    }

    /// A waiter of `generation` timed out: unless its generation ended meanwhile, it breaks the
    /// barrier (as Python does). Returns the waiter's outcome.
    pub(crate) fn time_out(&mut self, generation: u32) -> Check {
        if self.check(generation) == Check::Pending {
            self.broken = 1;
        }
        let c = self.check(generation);
        if c == Check::Broken {
            self.leave_broken(generation);
        }
        c
    }

    pub(crate) fn abort(&mut self) {
        self.broken = 1;
    }

    pub(crate) fn reset(&mut self) {
        self.end_generation(true);
        self.broken = 0;
    }

    pub(crate) fn n_waiting(&self) -> u32 {
        if self.broken != 0 { 0 } else { self.count }
    }

    pub(crate) fn broken(&self) -> bool {
        self.broken != 0
    }

    pub(crate) fn parties(&self) -> u32 {
        self.parties
    }
}

// ---------------------------------------------------------------------------------------------
// The process-shared barrier
// ---------------------------------------------------------------------------------------------

/// A process-shared barrier for a fixed number of parties (Python's
/// `multiprocessing.Barrier`).
///
/// [`wait`](Barrier::wait) blocks until `parties` processes (or threads) have called it, then
/// all return, each with a distinct index in `0..parties`. [`abort`](Barrier::abort) breaks it:
/// current and future waiters get [`Error::BrokenBarrier`] until [`reset`](Barrier::reset). A
/// wait that times out breaks it too (as in Python), so one dead participant cannot hang the
/// others forever: give waits a timeout ([`wait_timeout`](Barrier::wait_timeout), or a default
/// with [`Barrier::with_timeout`]). Python's `action` callable is not supported: run it on the
/// process whose index is 0.
///
/// ```
/// use std::time::Duration;
/// let b = multiproc::Barrier::new(2).unwrap();
/// let b2 = b.clone();
/// let t = std::thread::spawn(move || b2.wait().unwrap());
/// let mine = b.wait().unwrap();
/// let theirs = t.join().unwrap();
/// assert_eq!(mine + theirs, 1);
///
/// // Nobody else comes: the wait times out and the barrier is broken.
/// assert!(matches!(b.wait_timeout(Duration::from_millis(1)), Err(multiproc::Error::BrokenBarrier)));
/// assert!(b.broken());
/// b.reset();
/// assert!(!b.broken());
/// ```
#[derive(Clone)]
pub struct Barrier {
    seg: Arc<Segment>,
}

impl fmt::Debug for Barrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.with_state(|s| *s);
        f.debug_struct("Barrier")
            .field("parties", &s.parties())
            .field("n_waiting", &s.n_waiting())
            .field("broken", &s.broken())
            .finish()
    }
}

impl Barrier {
    /// A barrier for `parties` participants (at least 1), without a default timeout.
    pub fn new(parties: u32) -> Result<Barrier> {
        Barrier::create(parties, None)
    }

    /// A barrier whose waits time out after `timeout` unless told otherwise (Python's
    /// `Barrier(parties, timeout=...)`).
    pub fn with_timeout(parties: u32, timeout: Duration) -> Result<Barrier> {
        Barrier::create(parties, Some(timeout))
    }

    fn create(parties: u32, timeout: Option<Duration>) -> Result<Barrier> {
        if parties == 0 {
            return Err(Error::arg("a barrier needs at least one party"));
        }
        let seg = Segment::create(kind::BARRIER, LEN)?;
        // SAFETY: 64-aligned payload with room for the mutex; nobody else has the segment yet.
        unsafe { RawRobustMutex::init_at(seg.payload().cast(), false)? };
        let b = Barrier { seg: Arc::new(seg) };
        // SAFETY: nobody else has the segment yet; the state slot is aligned and in bounds.
        unsafe { b.state_ptr().write(State::new(parties)) };
        let ns = timeout.map_or(u64::MAX, |t| t.as_nanos().min(u64::MAX as u128 - 1) as u64);
        b.timeout_word().store(ns, Ordering::Release);
        Ok(b)
    }

    fn mutex(&self) -> &RawRobustMutex {
        // SAFETY: initialised by `create` (the segment's kind is checked on open).
        unsafe { &*(self.seg.payload() as *const RawRobustMutex) }
    }

    fn state_ptr(&self) -> *mut State {
        // SAFETY: in bounds (LEN) and 8-aligned.
        unsafe { self.seg.payload().add(STATE_OFFSET).cast() }
    }

    fn seq(&self) -> &AtomicU32 {
        // SAFETY: in bounds and aligned; only accessed atomically.
        unsafe { &*(self.seg.payload().add(SEQ_OFFSET) as *const AtomicU32) }
    }

    fn timeout_word(&self) -> &AtomicU64 {
        // SAFETY: in bounds and aligned; only accessed atomically.
        unsafe { &*(self.seg.payload().add(TIMEOUT_OFFSET) as *const AtomicU64) }
    }

    fn wake_all(&self) {
        self.seq().fetch_add(1, Ordering::SeqCst);
        platform::futex_wake(self.seq(), u32::MAX);
    }

    /// Runs `f` on the state with the mutex held. A process that died holding the mutex breaks
    /// the barrier (the state may be half-updated).
    fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let m = self.mutex();
        let r = m.lock(None);
        // SAFETY: the mutex is held (or the lock failed, see below), so no other process
        // touches the state; the pointer is valid for the segment's life.
        let state = unsafe { &mut *self.state_ptr() };
        match r {
            Ok(RobustLock::Acquired) => {}
            Ok(RobustLock::OwnerDied) => {
                let _ = m.make_consistent();
                state.abort();
                self.wake_all();
            }
            Err(e) => {
                // Cannot happen with a robust errorcheck mutex used only here; fail loudly
                // rather than touch the state unlocked.
                panic!("multiproc: barrier mutex failed: {e}");
            }
        }
        let out = f(state);
        let _ = m.unlock();
        out
    }

    /// Waits for the others, with the barrier's default timeout (if any). Returns this
    /// participant's index; `Err(Error::BrokenBarrier)` if the barrier is or gets broken.
    pub fn wait(&self) -> Result<u32> {
        self.wait_opt(self.default_timeout())
    }

    /// Waits at most `timeout`; a timeout breaks the barrier and gives
    /// `Err(Error::BrokenBarrier)` (as Python's `BrokenBarrierError`).
    pub fn wait_timeout(&self, timeout: Duration) -> Result<u32> {
        self.wait_opt(Some(timeout))
    }

    fn wait_opt(&self, timeout: Option<Duration>) -> Result<u32> {
        let deadline = Deadline::after(timeout);
        let (generation, index, mut seq) = self.with_state(|s| match s.arrive() {
            Arrival::Trip { index } => {
                self.wake_all();
                Ok((None, index, 0))
            }
            Arrival::Broken => Err(Error::BrokenBarrier),
            Arrival::Wait { generation, index } => {
                Ok((Some(generation), index, self.seq().load(Ordering::SeqCst)))
            }
        })?;
        let Some(generation) = generation else {
            return Ok(index);
        };
        loop {
            let expired = match deadline.left() {
                Some(left) => !platform::futex_wait(self.seq(), seq, left),
                None => true,
            };
            let outcome = self.with_state(|s| {
                let c = if expired {
                    let before = s.broken();
                    let c = s.time_out(generation);
                    if !before && s.broken() {
                        self.wake_all();
                    }
                    c
                } else {
                    let c = s.check(generation);
                    if c == Check::Broken {
                        s.leave_broken(generation);
                    }
                    c
                };
                seq = self.seq().load(Ordering::SeqCst);
                c
            });
            match outcome {
                Check::Passed => return Ok(index),
                Check::Broken => return Err(Error::BrokenBarrier),
                Check::Pending => {}
            }
        }
    }

    /// Breaks the barrier: every waiter, now and until [`reset`](Barrier::reset), gets
    /// `Err(Error::BrokenBarrier)`.
    pub fn abort(&self) {
        self.with_state(|s| s.abort());
        self.wake_all();
    }

    /// Returns the barrier to its empty, unbroken state; processes waiting on it now get
    /// `Err(Error::BrokenBarrier)`.
    pub fn reset(&self) {
        self.with_state(|s| s.reset());
        self.wake_all();
    }

    /// The number of participants needed to trip it.
    pub fn parties(&self) -> u32 {
        self.with_state(|s| s.parties())
    }

    /// How many are waiting now.
    pub fn n_waiting(&self) -> u32 {
        self.with_state(|s| s.n_waiting())
    }

    /// Whether it is broken.
    pub fn broken(&self) -> bool {
        self.with_state(|s| s.broken())
    }

    /// The default timeout of [`wait`](Barrier::wait), if any.
    pub fn default_timeout(&self) -> Option<Duration> {
        match self.timeout_word().load(Ordering::Acquire) {
            u64::MAX => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }
}

impl Serialize for Barrier {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.seg.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Barrier {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let seg = heap::deserialize_segment(d, kind::BARRIER, Some(LEN))?;
        Ok(Barrier { seg: Arc::new(seg) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_and_trips_with_distinct_indices() {
        let mut s = State::new(3);
        let a = s.arrive();
        let b = s.arrive();
        assert_eq!(
            a,
            Arrival::Wait {
                generation: 0,
                index: 0
            }
        );
        assert_eq!(
            b,
            Arrival::Wait {
                generation: 0,
                index: 1
            }
        );
        assert_eq!(s.n_waiting(), 2);
        assert_eq!(s.check(0), Check::Pending);
        assert_eq!(s.arrive(), Arrival::Trip { index: 2 });
        assert_eq!(s.check(0), Check::Passed);
        assert_eq!(s.n_waiting(), 0);
        // Next generation.
        assert_eq!(
            s.arrive(),
            Arrival::Wait {
                generation: 1,
                index: 0
            }
        );
    }

    #[test]
    fn single_party_trips_at_once() {
        let mut s = State::new(1);
        assert_eq!(s.arrive(), Arrival::Trip { index: 0 });
        assert_eq!(s.arrive(), Arrival::Trip { index: 0 });
    }

    #[test]
    fn abort_breaks_waiters_and_newcomers_until_reset() {
        let mut s = State::new(3);
        s.arrive();
        s.abort();
        assert_eq!(s.check(0), Check::Broken);
        assert_eq!(s.arrive(), Arrival::Broken);
        s.leave_broken(0);
        s.reset();
        assert!(!s.broken());
        // A waiter of the aborted generation that wakes only now still sees it broken.
        assert_eq!(s.check(0), Check::Broken);
        assert_eq!(
            s.arrive(),
            Arrival::Wait {
                generation: 1,
                index: 0
            }
        );
    }

    #[test]
    fn reset_breaks_current_waiters_only() {
        let mut s = State::new(2);
        assert_eq!(
            s.arrive(),
            Arrival::Wait {
                generation: 0,
                index: 0
            }
        );
        s.reset();
        assert_eq!(s.check(0), Check::Broken);
        // A later normal generation passes and overwrites the bit 64 generations on.
        for g in 1..70u32 {
            assert!(matches!(s.arrive(), Arrival::Wait { .. }));
            assert_eq!(s.arrive(), Arrival::Trip { index: 1 });
            assert_eq!(s.check(g), Check::Passed);
        }
    }

    #[test]
    fn timeout_breaks_unless_already_passed() {
        let mut s = State::new(2);
        s.arrive();
        assert_eq!(s.time_out(0), Check::Broken);
        assert!(s.broken());
        assert_eq!(s.n_waiting(), 0);

        let mut s = State::new(2);
        s.arrive();
        s.arrive();
        assert_eq!(s.time_out(0), Check::Passed);
        assert!(!s.broken());
    }

    mod model {
        use super::*;
        use proptest::prelude::*;
        use std::collections::HashMap;

        #[derive(Clone, Debug)]
        enum Op {
            Arrive,
            Abort,
            Reset,
            /// The k-th waiter still waiting (modulo their number) times out.
            TimeOut(usize),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                6 => Just(Op::Arrive),
                1 => Just(Op::Abort),
                1 => Just(Op::Reset),
                1 => any::<usize>().prop_map(Op::TimeOut),
            ]
        }

        proptest! {
            /// Against a direct model: every waiter's outcome is its generation's (tripped
            /// means passed; reset, abort or a timeout in it means broken), indices within a
            /// generation are 0, 1, 2, ..., and the count never reaches `parties`.
            #[test]
            fn matches_the_model(parties in 1u32..5, ops in prop::collection::vec(op(), 0..400)) {
                let mut s = State::new(parties);
                // generation -> Some(true) tripped, Some(false) broken/reset, None running.
                let mut ended: HashMap<u32, bool> = HashMap::new();
                let mut broken = false;
                let mut cur = 0u32;
                let mut next_index = 0u32;
                let mut waiting: Vec<u32> = Vec::new(); // generations of live waiters
                for o in ops {
                    match o {
                        Op::Arrive => match s.arrive() {
                            Arrival::Broken => prop_assert!(broken),
                            Arrival::Trip { index } => {
                                prop_assert!(!broken);
                                prop_assert_eq!(index, next_index);
                                prop_assert_eq!(index + 1, parties);
                                ended.insert(cur, true);
                                cur += 1;
                                next_index = 0;
                            }
                            Arrival::Wait { generation, index } => {
                                prop_assert!(!broken);
                                prop_assert_eq!(generation, cur);
                                prop_assert_eq!(index, next_index);
                                next_index += 1;
                                waiting.push(generation);
                            }
                        },
                        Op::Abort => {
                            s.abort();
                            broken = true;
                        }
                        Op::Reset => {
                            s.reset();
                            ended.insert(cur, false);
                            cur += 1;
                            next_index = 0;
                            broken = false;
                        }
                        Op::TimeOut(k) => {
                            if !waiting.is_empty() {
                                let g = waiting.remove(k % waiting.len());
                                let c = s.time_out(g);
                                match ended.get(&g) {
                                    Some(true) => prop_assert_eq!(c, Check::Passed),
                                    Some(false) => prop_assert_eq!(c, Check::Broken),
                                    None => {
                                        prop_assert_eq!(c, Check::Broken);
                                        broken = true;
                                    }
                                }
                            }
                        }
                    }
                    // The outcome is remembered for the last 64 generations only.
                    waiting.retain(|&g| cur - g < 64);
                    prop_assert!(s.broken() || s.n_waiting() < parties);
                    prop_assert_eq!(s.broken(), broken);
                    for &g in &waiting {
                        let want = match ended.get(&g) {
                            Some(true) => Check::Passed,
                            Some(false) => Check::Broken,
                            None if broken => Check::Broken,
                            None => Check::Pending,
                        };
                        prop_assert_eq!(s.check(g), want);
                    }
                }
            }
        }
    }
}
