//! The fast lane of a manager connection over a Unix socket: requests and replies cross a
//! shared-memory slot instead of the socket, so a call in a busy loop costs no system call and
//! no wake-up of a sleeping thread. The socket stays for what shared memory cannot do: waking a
//! peer that went to sleep (a one-byte doorbell), noticing a peer that hung up or died (the end
//! of the stream), and carrying messages larger than the slot (as ordinary frames). The
//! protocol and its invariants are in `README.md` beside this file ("The fast lane").

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::connection::RawConn;
use crate::error::{Error, Result};
use crate::platform::{self, Mapping};

/// Payload bytes of a message in the slot, per direction; larger messages go as a frame on the
/// socket.
pub(crate) const CAP: usize = 64 * 1024;
/// Bytes of the header (control words) before the two message areas.
const HDR: usize = 4096;
/// Size of the shared file.
const SIZE: usize = HDR + 2 * CAP;
const MAGIC: u32 = u32::from_le_bytes(*b"mpl1");
/// The `len` of a message that follows on the socket as a frame.
const ON_SOCKET: u32 = u32::MAX;

// Control words (byte offsets into the header), each writer's on its own cache line.
const MAGIC_AT: usize = 0;
const REQ_SEQ: usize = 64;
const REQ_LEN: usize = 68;
const REP_SEQ: usize = 128;
const REP_LEN: usize = 132;
const CLIENT_ASLEEP: usize = 192;
const SERVER_ASLEEP: usize = 256;
const CLIENT_CPU: usize = 320;
const SERVER_CPU: usize = 384;
/// A CPU word's value when the CPU is unknown.
const NO_CPU: u32 = u32::MAX;

/// How long a receiver busy-waits for a message before it sleeps on the socket.
const SPIN: Duration = Duration::from_micros(50);
/// The first part of the spin does not yield the CPU (none of it when the peer last ran on
/// our CPU: it needs the CPU to answer); after it, the spinner calls `sched_yield` between
/// looks, so a peer that shares its CPU (2-core machines, busy machines) still runs.
const SPIN_ONLY: Duration = Duration::from_micros(20);
/// A yield that kept the spinner off its CPU longer than this means another thread wanted the
/// CPU for a time slice: the spin stops (sleeping lets the scheduler hand the CPU back at once
/// when the message comes; yielding again would lose another slice).
const SLOW_YIELD: Duration = Duration::from_micros(20);
/// Receives that only spin (no yields, at most [`SPIN_ONLY`]) after a spin that ran out or
/// lost the CPU: the peer is slow, idle or short of CPU, and spinning longer would only take
/// CPU from it or from others.
const BACKOFF: u32 = 32;
/// Looks at the sequence word between two readings of the clock.
const LOOKS_PER_CLOCK: u32 = 16;

/// Which end of the connection a lane serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    /// Sends requests, receives replies.
    Client,
    /// Receives requests, sends replies.
    Server,
}

/// Where one side writes and reads.
struct Words {
    out_seq: usize,
    out_len: usize,
    out_data: usize,
    in_seq: usize,
    in_len: usize,
    in_data: usize,
    /// Set by this side while it sleeps on the socket.
    me_asleep: usize,
    /// Set by the peer while it sleeps on the socket.
    peer_asleep: usize,
    /// The CPU this side last waited on (a hint for the peer's spin).
    me_cpu: usize,
    peer_cpu: usize,
}

const CLIENT_WORDS: Words = Words {
    out_seq: REQ_SEQ,
    out_len: REQ_LEN,
    out_data: HDR,
    in_seq: REP_SEQ,
    in_len: REP_LEN,
    in_data: HDR + CAP,
    me_asleep: CLIENT_ASLEEP,
    peer_asleep: SERVER_ASLEEP,
    me_cpu: CLIENT_CPU,
    peer_cpu: SERVER_CPU,
};

const SERVER_WORDS: Words = Words {
    out_seq: REP_SEQ,
    out_len: REP_LEN,
    out_data: HDR + CAP,
    in_seq: REQ_SEQ,
    in_len: REQ_LEN,
    in_data: HDR,
    me_asleep: SERVER_ASLEEP,
    peer_asleep: CLIENT_ASLEEP,
    me_cpu: SERVER_CPU,
    peer_cpu: CLIENT_CPU,
};

/// One side of a fast lane. Used with the connection it was set up on: every call takes that
/// connection's [`RawConn`].
pub(crate) struct Lane {
    map: Mapping,
    w: &'static Words,
    /// Sequence number of the last message sent.
    sent: u32,
    /// Sequence number of the last message received.
    got: u32,
    /// Received bytes, copied out of the slot before anyone decodes them.
    buf: Vec<u8>,
    /// Receives left that spin only briefly (see [`BACKOFF`]).
    short: u32,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("sent", &self.sent)
            .field("got", &self.got)
            .finish()
    }
}

impl Lane {
    /// Makes a lane's shared file (the server does, and sends the descriptor to the client).
    pub(crate) fn create() -> Result<(Lane, OwnedFd)> {
        let fd = platform::memfd_fixed_size(c"multiproc-manager-lane", SIZE)?;
        let map = Mapping::new(fd.as_fd(), SIZE)?;
        let lane = Lane::new(map, Side::Server);
        lane.word(CLIENT_CPU).store(NO_CPU, Ordering::Relaxed);
        lane.word(SERVER_CPU).store(NO_CPU, Ordering::Relaxed);
        lane.word(MAGIC_AT).store(MAGIC, Ordering::Release);
        Ok((lane, fd))
    }

    /// Opens the client's side of a lane from the descriptor the server sent. The descriptor
    /// can be closed afterwards (the mapping keeps the file alive).
    pub(crate) fn open(fd: BorrowedFd<'_>) -> Result<Lane> {
        // Seals first, size second: once F_SEAL_SHRINK is set the size can no longer drop, so
        // the size read after it is a floor for as long as we map the file. (The other order
        // lets a peer shrink then seal between the two looks: we would map a file that is now
        // too short and die of SIGBUS on the first access.)
        if !platform::size_sealed(fd) {
            return Err(Error::MalformedFrame(
                "manager lane file not sealed against shrinking".into(),
            ));
        }
        let size = platform::fstat_size(fd)?;
        if size != SIZE {
            return Err(Error::MalformedFrame(format!(
                "manager lane of {size} bytes, expected {SIZE}"
            )));
        }
        let lane = Lane::new(Mapping::new(fd, SIZE)?, Side::Client);
        if lane.word(MAGIC_AT).load(Ordering::Acquire) != MAGIC {
            return Err(Error::MalformedFrame("not a manager lane".into()));
        }
        Ok(lane)
    }

    fn new(map: Mapping, side: Side) -> Lane {
        Lane {
            map,
            w: match side {
                Side::Client => &CLIENT_WORDS,
                Side::Server => &SERVER_WORDS,
            },
            sent: 0,
            got: 0,
            buf: Vec::new(),
            short: 0,
        }
    }

    fn word(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off % 4 == 0 && off + 4 <= HDR);
        // SAFETY: `off` is one of the header constants: 4-aligned (the mapping is page aligned)
        // and inside the mapping, which lives as long as `&self`. Header words are only ever
        // accessed atomically, by both processes.
        unsafe { &*(self.map.as_ptr().add(off) as *const AtomicU32) }
    }

    /// Sends one message. `raw` is the lane's connection (for the doorbell, and for a message
    /// larger than the slot).
    pub(crate) fn send(&mut self, raw: &mut RawConn, msg: &[u8]) -> Result<()> {
        let big = msg.len() > CAP;
        if !big {
            // SAFETY: the area `out_data..out_data + CAP` lies inside the mapping and msg.len()
            // <= CAP. Only this side writes it, and the peer reads it only after the sequence
            // number below announces it (and is done with it before it replies: requests and
            // replies strictly alternate). A misbehaving peer can at worst garble bytes it
            // receives itself.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    msg.as_ptr(),
                    self.map.as_ptr().add(self.w.out_data),
                    msg.len(),
                );
            }
        }
        let cpu = platform::current_cpu().unwrap_or(NO_CPU);
        let mine = self.word(self.w.me_cpu);
        if mine.load(Ordering::Relaxed) != cpu {
            mine.store(cpu, Ordering::Relaxed);
        }
        let len = if big { ON_SOCKET } else { msg.len() as u32 };
        self.word(self.w.out_len).store(len, Ordering::Relaxed);
        self.sent = self.sent.wrapping_add(1);
        // SeqCst store, then SeqCst load of the peer's sleep flag: with the peer's store of its
        // flag followed by its load of our sequence number, at least one of us sees the other.
        self.word(self.w.out_seq).store(self.sent, Ordering::SeqCst);
        let asleep = self.word(self.w.peer_asleep);
        if asleep.load(Ordering::SeqCst) != 0 && asleep.swap(0, Ordering::SeqCst) != 0 {
            // We took the peer's flag: it is (or is about to be) asleep on the socket and
            // expects exactly one doorbell byte.
            ring(raw.fileno()?)?;
        }
        if big {
            raw.send_bytes(msg)?;
        }
        Ok(())
    }

    /// Receives one message and hands its bytes to `f`. Blocks until it comes; [`Error::Eof`]
    /// if the peer hangs up or dies first.
    pub(crate) fn recv<R>(
        &mut self,
        raw: &mut RawConn,
        f: impl FnOnce(&[u8]) -> Result<R>,
    ) -> Result<R> {
        let want = self.got.wrapping_add(1);
        self.wait(raw.fileno()?, want)?;
        self.got = want;
        let len = self.word(self.w.in_len).load(Ordering::Relaxed);
        if len == ON_SOCKET {
            // Lane frames never carry descriptors; any that came are closed here.
            return raw.recv_with(None, |b, _fds| f(b));
        }
        let len = len as usize;
        if len > CAP {
            return Err(Error::MalformedFrame(format!(
                "manager lane message of {len} bytes (at most {CAP})"
            )));
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.reserve(len);
        // SAFETY: `in_data..in_data + len` lies inside the mapping (len <= CAP, checked above)
        // and `buf` has room for `len` bytes, which the copy initialises before `set_len`. An
        // honest peer wrote these bytes before publishing the sequence number we loaded with
        // acquire ordering (in `wait`) and does not touch them until we reply. A hostile peer
        // (another process) may write them while we copy: we cannot stop that, and it is
        // harmless because the area is only ever read with this raw byte copy (no reference
        // into it exists, and every byte value is a valid `u8`) into our private `buf`, and
        // decoding starts only after the copy, on `buf`: changing bytes can give a garbled
        // message (a decode error, or a wrong value for that peer's own call), never a
        // decoder that sees the input change under it or a read outside the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.as_ptr().add(self.w.in_data),
                buf.as_mut_ptr(),
                len,
            );
            buf.set_len(len);
        }
        let r = f(&buf);
        self.buf = buf;
        r
    }

    /// Waits until the peer publishes message `want`: a bounded spin, then sleep on the socket.
    fn wait(&mut self, fd: BorrowedFd<'_>, want: u32) -> Result<()> {
        if self.word(self.w.in_seq).load(Ordering::Acquire) == want {
            self.short = 0;
            return Ok(());
        }
        // Where we run, for the peer's next spin.
        let cpu = platform::current_cpu().unwrap_or(NO_CPU);
        let mine = self.word(self.w.me_cpu);
        if mine.load(Ordering::Relaxed) != cpu {
            mine.store(cpu, Ordering::Relaxed);
        }
        // Spinning without yielding only helps a peer that runs on another CPU: one that
        // shares ours needs the CPU to answer.
        let same = cpu != NO_CPU && self.word(self.w.peer_cpu).load(Ordering::Relaxed) == cpu;
        let pure = if same { Duration::ZERO } else { SPIN_ONLY };
        // Normally: spin, then yield between looks, up to SPIN. Backing off (after a spin
        // that ran out or a yield that lost the CPU): only the pure spin, no yields.
        let (budget, may_yield) = if self.short > 0 {
            self.short -= 1;
            (pure, false)
        } else {
            (SPIN, true)
        };
        let seq = self.word(self.w.in_seq);
        match spin_until(
            || seq.load(Ordering::Acquire) == want,
            budget,
            pure,
            may_yield,
        ) {
            Spin::Ready => return Ok(()),
            Spin::RanOut => self.short = BACKOFF,
        }
        let seq = self.word(self.w.in_seq);
        let me = self.word(self.w.me_asleep);
        loop {
            me.store(1, Ordering::SeqCst);
            if seq.load(Ordering::SeqCst) == want {
                if me.swap(0, Ordering::SeqCst) == 0 {
                    // The peer saw our flag before we took it back: its doorbell is coming.
                    take_doorbell(fd)?;
                }
                return Ok(());
            }
            platform::poll_read(fd, None)?;
            if me.swap(0, Ordering::SeqCst) == 0 {
                // The peer took our flag, so the socket holds its doorbell (the message was
                // published before it): consume it and look again.
                take_doorbell(fd)?;
                continue;
            }
            // Nobody rang, yet the socket is readable: the peer hung up (or broke protocol).
            return Err(hung_up(fd));
        }
    }
}

enum Spin {
    Ready,
    RanOut,
}

/// Busy-waits until `ready()`: looks without yielding for `pure`, then (if `may_yield`) yields
/// the CPU between looks until `budget` has passed. A yield that kept us off the CPU longer
/// than [`SLOW_YIELD`] (another thread ran a time slice) ends the spin.
fn spin_until(ready: impl Fn() -> bool, budget: Duration, pure: Duration, may_yield: bool) -> Spin {
    let t0 = Instant::now();
    loop {
        for _ in 0..LOOKS_PER_CLOCK {
            if ready() {
                return Spin::Ready;
            }
            std::hint::spin_loop();
        }
        let e = t0.elapsed();
        if e >= budget {
            break;
        }
        if e >= pure {
            if !may_yield {
                break;
            }
            std::thread::yield_now();
            if t0.elapsed() - e > SLOW_YIELD {
                break;
            }
        }
    }
    if ready() { Spin::Ready } else { Spin::RanOut }
}

fn io_err(e: std::io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::EPIPE) | Some(libc::ECONNRESET) => Error::Eof,
        _ => Error::Io(e),
    }
}

/// Wakes a peer asleep on the socket.
fn ring(fd: BorrowedFd<'_>) -> Result<()> {
    match platform::send(fd, &[1]).map_err(io_err)? {
        1 => Ok(()),
        _ => Err(Error::Eof),
    }
}

/// Reads the one doorbell byte the peer sent (or is sending) us.
fn take_doorbell(fd: BorrowedFd<'_>) -> Result<()> {
    let mut b = [0u8; 1];
    match platform::read(fd, &mut b).map_err(io_err)? {
        0 => Err(Error::Eof),
        _ if b[0] == 1 => Ok(()),
        _ => Err(Error::MalformedFrame(
            "unexpected bytes on a manager lane's socket".into(),
        )),
    }
}

/// The error for a socket that became readable with no doorbell due.
fn hung_up(fd: BorrowedFd<'_>) -> Error {
    let mut b = [0u8; 1];
    match platform::read(fd, &mut b) {
        Ok(0) => Error::Eof,
        Ok(_) => Error::MalformedFrame("unexpected bytes on a manager lane's socket".into()),
        Err(e) => io_err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::RawConn;

    fn pair() -> (RawConn, RawConn) {
        let (a, b) = platform::socketpair(libc::SOCK_STREAM).unwrap();
        (
            RawConn::new(a, true, true, true),
            RawConn::new(b, true, true, true),
        )
    }

    fn lanes() -> (Lane, Lane) {
        let (s, fd) = Lane::create().unwrap();
        let c = Lane::open(fd.as_fd()).unwrap();
        (c, s)
    }

    #[test]
    fn small_and_large_messages_cross_in_both_directions() {
        let (mut cr, mut sr) = pair();
        let (mut c, mut s) = lanes();
        let t = std::thread::spawn(move || {
            for _ in 0..200 {
                let m = s.recv(&mut sr, |b| Ok(b.to_vec())).unwrap();
                s.send(&mut sr, &m).unwrap();
            }
            sr
        });
        for i in 0..200usize {
            // Every 50th message is larger than the slot and travels as a frame.
            let n = if i % 50 == 7 { CAP + 1 + i } else { i };
            let m: Vec<u8> = (0..n).map(|j| (i + j) as u8).collect();
            c.send(&mut cr, &m).unwrap();
            let back = c.recv(&mut cr, |b| Ok(b.to_vec())).unwrap();
            assert_eq!(back, m);
            if i % 20 == 0 {
                // Let the server fall asleep, so the doorbell path runs too.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let sr = t.join().unwrap();
        // No doorbell byte is left over once both sides are done.
        assert!(!platform::poll_read(cr.fileno().unwrap(), Some(Duration::ZERO)).unwrap());
        assert!(!platform::poll_read(sr.fileno().unwrap(), Some(Duration::ZERO)).unwrap());
    }

    #[test]
    fn a_peer_that_hangs_up_gives_eof_whether_spinning_or_asleep() {
        for delay in [0u64, 5] {
            let (mut cr, sr) = pair();
            let (mut c, s) = lanes();
            let t = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(delay));
                drop((s, sr));
            });
            c.send(&mut cr, b"x").unwrap();
            assert!(matches!(c.recv(&mut cr, |_| Ok(())), Err(Error::Eof)));
            t.join().unwrap();
        }
    }

    #[test]
    fn a_wrong_file_is_refused() {
        // Unsealed (its sender could shrink it under us), wrong size, no magic.
        let fd = platform::memfd(c"not-a-lane", SIZE).unwrap();
        assert!(Lane::open(fd.as_fd()).is_err());
        let fd = platform::memfd_fixed_size(c"not-a-lane", 100).unwrap();
        assert!(Lane::open(fd.as_fd()).is_err());
        let fd = platform::memfd_fixed_size(c"not-a-lane", SIZE).unwrap();
        assert!(Lane::open(fd.as_fd()).is_err());
    }

    /// A hostile server shrinks the file and then seals it while the client checks it: the
    /// client must refuse the file, never map one that is too short (SIGBUS kills the test
    /// binary if it does).
    #[test]
    fn open_never_maps_a_file_shrunk_then_sealed_under_it() {
        use std::fs::File;
        use std::os::unix::fs::FileExt;
        use std::sync::Arc;
        use std::sync::atomic::AtomicUsize;

        // `turn` is the round the racer may play (0: the racer is done with it).
        const ROUNDS: usize = 1000;
        let turn = Arc::new(AtomicUsize::new(0));
        let slot: Arc<std::sync::Mutex<Option<Arc<File>>>> = Default::default();
        let (turn2, slot2) = (turn.clone(), slot.clone());
        // Only a bound against a hang (a racer that died): the rounds are counted, not timed.
        let deadline = Instant::now() + Duration::from_secs(60);
        let wait_for = move |turn: &AtomicUsize, want: &dyn Fn(usize) -> bool| loop {
            let t = turn.load(Ordering::Acquire);
            if want(t) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "the other thread never took its turn"
            );
            std::thread::yield_now();
        };
        let racer = std::thread::spawn(move || {
            let mut x = 1u64;
            for round in 1..=ROUNDS {
                wait_for(&turn2, &|t| t == round);
                let f = slot2.lock().unwrap().take().unwrap();
                // A random delay, so the shrink lands anywhere inside the client's checks.
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                for _ in 0..(x >> 57) {
                    std::hint::spin_loop();
                }
                f.set_len(0).unwrap();
                platform::add_seals(f.as_fd(), libc::F_SEAL_SHRINK).unwrap();
                turn2.store(0, Ordering::Release);
            }
        });
        for round in 1..=ROUNDS {
            let f = File::from(platform::memfd_sealable(c"racy-lane", SIZE).unwrap());
            f.write_all_at(&MAGIC.to_le_bytes(), MAGIC_AT as u64)
                .unwrap();
            let f = Arc::new(f);
            *slot.lock().unwrap() = Some(f.clone());
            turn.store(round, Ordering::Release);
            // Unsealed when looked at, or sealed at size 0: refused either way. Reading the
            // magic word of a mapping past the end of the file would raise SIGBUS.
            let r = Lane::open(f.as_fd());
            assert!(r.is_err(), "round {round}: opened a shrunk file");
            wait_for(&turn, &|t| t == 0);
        }
        racer.join().unwrap();
    }

    #[test]
    fn a_length_beyond_the_slot_is_an_error_not_an_overread() {
        let (mut cr, mut sr) = pair();
        let (mut c, mut s) = lanes();
        c.send(&mut cr, b"hi").unwrap();
        // Corrupt the announced length as a hostile client could.
        s.word(REQ_LEN).store(CAP as u32 + 1, Ordering::Relaxed);
        assert!(matches!(
            s.recv(&mut sr, |_| Ok(())),
            Err(Error::MalformedFrame(_))
        ));
    }
}
