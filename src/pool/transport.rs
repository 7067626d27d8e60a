//! The seam between the scheduler and its workers.
//!
//! The scheduler only talks to a [`Link`] (one per worker) made by a [`Transport`]. A link
//! carries task frames to its worker and result frames back, tells the scheduler which task the
//! worker is running (so a death or a timeout blames exactly that task), and can kill and reap
//! it. [`LocalTransport`] is the only transport today: a child process per worker with its own
//! stream socket (no shared task pipe, CPython gh-96062) and a shared page where the worker
//! writes the sequence number and start time of the task it runs. An MPI transport (ranks
//! instead of children) implements the same two traits.
//!
//! Wire format, both ways: frames as in `frame.rs` (`u32 len`, `u32 nfds`, payload; descriptors
//! ride with the header as `SCM_RIGHTS`). The payload starts with a kind byte and a `u64`
//! sequence number (little endian):
//! * parent to worker: [`TO_TASK`] (then the chunk function's id, postcard, then its arguments)
//!   or [`TO_EXIT`] (finish and exit);
//! * worker to parent: [`FROM_READY`], [`FROM_INIT_FAILED`] (message, backtrace),
//!   [`FROM_OK`] (the chunk's results), [`FROM_PANICKED`] (message, backtrace),
//!   [`FROM_FAILED`] (message: the arguments did not decode, ...).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::codec;
use crate::context::StartMethod;
use crate::error::{Error, ExitStatus, Result};
use crate::frame;
use crate::function::FnId;
use crate::platform::{self, Mapping};
use crate::process::ProcessInfo;
use crate::start::{self, ChildTask};

/// Parent to worker: run a task.
pub(crate) const TO_TASK: u8 = 0;
/// Parent to worker: finish and exit.
pub(crate) const TO_EXIT: u8 = 1;
/// Worker to parent: the initializer ran, ready for tasks.
pub(crate) const FROM_READY: u8 = 0;
/// Worker to parent: the initializer failed (the worker then exits).
pub(crate) const FROM_INIT_FAILED: u8 = 1;
/// Worker to parent: a task's results.
pub(crate) const FROM_OK: u8 = 2;
/// Worker to parent: a task panicked outside its items (encoding its results, ...).
pub(crate) const FROM_PANICKED: u8 = 3;
/// Worker to parent: a task failed (its arguments did not decode, ...).
pub(crate) const FROM_FAILED: u8 = 4;

/// Bytes before a message's body: kind and sequence number.
pub(crate) const MSG_HEAD: usize = 9;
/// Size of the page shared with each worker.
pub(crate) const PAGE: usize = 4096;
/// Index (in `u64`s) of the running task's sequence number in the shared page (0: none).
pub(crate) const PAGE_RUNNING: usize = 0;
/// Index of the running task's start time (`monotonic_ns`) in the shared page.
pub(crate) const PAGE_STARTED: usize = 1;

/// One message from a worker, borrowed from the link's buffer.
#[derive(Debug)]
pub(crate) struct Msg<'a> {
    pub(crate) kind: u8,
    pub(crate) seq: u64,
    pub(crate) body: &'a [u8],
}

/// What [`Link::fill`] found.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(crate) enum Fill {
    /// Read everything there was.
    Drained,
    /// The buffer filled up: there may be more.
    More,
    /// End of stream: the worker is gone.
    Eof,
}

/// The scheduler's handle on one worker.
pub(crate) trait Link: Send {
    /// The worker's process id (or rank).
    fn pid(&self) -> u32;
    /// The descriptor that becomes readable when messages arrive.
    fn sock(&self) -> BorrowedFd<'_>;
    /// The descriptor that becomes readable when the worker dies.
    fn death(&self) -> BorrowedFd<'_>;
    /// Queues a task frame (sent by [`Link::flush`]).
    fn push_task(&mut self, seq: u64, chunk_fn: &[u8], payload: &[u8], fds: &[RawFd]);
    /// Queues the exit request.
    fn push_exit(&mut self);
    /// Sends what is queued without blocking. `Ok(true)` when nothing is left.
    fn flush(&mut self) -> Result<bool>;
    /// Whether frames wait to be sent.
    fn wants_write(&self) -> bool;
    /// Reads what has arrived without blocking.
    fn fill(&mut self) -> Result<Fill>;
    /// The next complete message already read, if any.
    fn next_msg(&mut self) -> Result<Option<Msg<'_>>>;
    /// `(seq, started_ns)` of the task the worker runs now, if any.
    fn running(&self) -> Option<(u64, u64)>;
    /// Kills the worker (it will be reaped by [`Link::reap`]).
    fn kill(&self);
    /// Reaps it; with `block` waits for it to end.
    fn reap(&mut self, block: bool) -> Option<ExitStatus>;
}

/// Makes workers.
pub(crate) trait Transport: Send + Sync {
    /// Starts a worker. `boot` writes the worker's boot payload given the descriptors of its
    /// socket and page (as handles) and returns the descriptors to send along.
    fn launch(&self, boot: &BootEncoder, info: ProcessInfo) -> Result<Box<dyn Link>>;
}

/// Encodes a worker's boot message: `(entry of the worker loop, encoder of the payload)`.
pub(crate) struct BootEncoder {
    /// The worker-loop entry point (monomorphised for the initializer).
    pub(crate) entry: FnId,
    /// Writes the payload given the worker's socket and page.
    #[allow(clippy::type_complexity)]
    pub(crate) encode: Box<
        dyn Fn(BorrowedFd<'_>, BorrowedFd<'_>, &mut Vec<u8>) -> Result<Vec<RawFd>> + Send + Sync,
    >,
}

/// A descriptor inside a serialized value (the worker's socket and page travel this way).
#[derive(Debug)]
pub(crate) struct FdRef<'a>(pub(crate) BorrowedFd<'a>);

impl Serialize for FdRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        codec::serialize_fd(self.0, s)
    }
}

/// The receiving side of [`FdRef`].
#[derive(Debug)]
pub(crate) struct FdOwned(pub(crate) OwnedFd);

impl<'de> Deserialize<'de> for FdOwned {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        codec::deserialize_fd(d).map(FdOwned)
    }
}

/// Workers as local child processes.
pub(crate) struct LocalTransport {
    pub(crate) method: StartMethod,
}

impl Transport for LocalTransport {
    fn launch(&self, boot: &BootEncoder, info: ProcessInfo) -> Result<Box<dyn Link>> {
        let (ours, theirs) = platform::socketpair(libc::SOCK_STREAM)?;
        let page_fd = platform::memfd(c"multiproc-pool-worker", PAGE)?;
        let page = Mapping::new(page_fd.as_fd(), PAGE)?;
        let mut payload = Vec::new();
        let fds = (boot.encode)(theirs.as_fd(), page_fd.as_fd(), &mut payload)?;
        let task = ChildTask {
            build_id: crate::function::build_id().to_vec(),
            entry: boot.entry,
            payload,
            info,
            want_result: false,
        };
        // start::launch_task makes the child from a long-lived thread (see start::launch's
        // docs): workers are daemons and must not die with whichever thread drives the pool.
        let l = start::launch_task(self.method, &task, &fds)?;
        drop(theirs);
        platform::set_nonblocking(ours.as_fd(), true)?;
        Ok(Box::new(LocalLink::new(l.pid, l.pidfd, ours, page)))
    }
}

struct LocalLink {
    pid: u32,
    pidfd: OwnedFd,
    sock: OwnedFd,
    page: Mapping,
    out: Vec<u8>,
    out_pos: usize,
    /// Offsets in `out` where a frame with descriptors starts, and those descriptors.
    marks: VecDeque<(usize, Vec<RawFd>)>,
    inbuf: Vec<u8>,
    in_start: usize,
    in_end: usize,
    reaped: Option<ExitStatus>,
}

impl LocalLink {
    /// A link to worker `pid` on its socket `sock` (non-blocking) and shared `page`.
    fn new(pid: u32, pidfd: OwnedFd, sock: OwnedFd, page: Mapping) -> LocalLink {
        LocalLink {
            pid,
            pidfd,
            sock,
            page,
            out: Vec::new(),
            out_pos: 0,
            marks: VecDeque::new(),
            inbuf: vec![0; 64 * 1024],
            in_start: 0,
            in_end: 0,
            reaped: None,
        }
    }

    fn push_frame(&mut self, kind: u8, seq: u64, parts: &[&[u8]], fds: &[RawFd]) {
        let len: usize = MSG_HEAD + parts.iter().map(|p| p.len()).sum::<usize>();
        if !fds.is_empty() {
            self.marks.push_back((self.out.len(), fds.to_vec()));
        }
        let h = frame::header(len, fds.len()).expect("task frames are below 4 GiB");
        self.out.extend_from_slice(&h);
        self.out.push(kind);
        self.out.extend_from_slice(&seq.to_le_bytes());
        for p in parts {
            self.out.extend_from_slice(p);
        }
    }
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Link for LocalLink {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn sock(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    fn death(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    fn push_task(&mut self, seq: u64, chunk_fn: &[u8], payload: &[u8], fds: &[RawFd]) {
        self.push_frame(TO_TASK, seq, &[chunk_fn, payload], fds);
    }

    fn push_exit(&mut self) {
        self.push_frame(TO_EXIT, 0, &[], &[]);
    }

    fn flush(&mut self) -> Result<bool> {
        while self.out_pos < self.out.len() {
            let mark_here = self.marks.front().is_some_and(|m| m.0 == self.out_pos);
            let end = self
                .marks
                .iter()
                .map(|m| m.0)
                .find(|&o| o > self.out_pos)
                .unwrap_or(self.out.len());
            let chunk = &self.out[self.out_pos..end];
            let r = if mark_here {
                let fds = &self.marks.front().expect("checked").1;
                platform::send_with_fds(self.sock.as_fd(), chunk, fds)
            } else {
                platform::send(self.sock.as_fd(), chunk)
            };
            match r {
                Ok(n) => {
                    if mark_here {
                        self.marks.pop_front();
                    }
                    self.out_pos += n;
                }
                Err(e) if would_block(&e) => return Ok(false),
                Err(e) => {
                    return Err(match e.raw_os_error() {
                        Some(libc::EPIPE) | Some(libc::ECONNRESET) => Error::Eof,
                        _ => Error::Io(e),
                    });
                }
            }
        }
        self.out.clear();
        self.out_pos = 0;
        Ok(true)
    }

    fn wants_write(&self) -> bool {
        self.out_pos < self.out.len()
    }

    fn fill(&mut self) -> Result<Fill> {
        {
            if self.in_start == self.in_end {
                self.in_start = 0;
                self.in_end = 0;
            }
            // Make room: at least the rest of a frame whose header we have, and 16 KiB.
            let mut need = 16 * 1024;
            if self.in_end - self.in_start >= frame::HEADER {
                let h: [u8; frame::HEADER] = self.inbuf[self.in_start..self.in_start + 8]
                    .try_into()
                    .expect("8 bytes");
                let (len, _) = frame::parse_header(&h, frame::DEFAULT_MAX_FRAME)?;
                // Saturating: the buffer may already hold this whole frame (and more).
                need = need.max((frame::HEADER + len).saturating_sub(self.in_end - self.in_start));
            }
            if self.inbuf.len() - self.in_end < need {
                self.inbuf.copy_within(self.in_start..self.in_end, 0);
                self.in_end -= self.in_start;
                self.in_start = 0;
                if self.inbuf.len() - self.in_end < need {
                    self.inbuf.resize(self.in_end + need, 0);
                }
            }
            match platform::read(self.sock.as_fd(), &mut self.inbuf[self.in_end..]) {
                Ok(0) => Ok(Fill::Eof),
                Ok(n) => {
                    self.in_end += n;
                    Ok(if self.in_end < self.inbuf.len() {
                        Fill::Drained
                    } else {
                        Fill::More
                    })
                }
                Err(e) if would_block(&e) => Ok(Fill::Drained),
                Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => Ok(Fill::Eof),
                Err(e) => Err(e.into()),
            }
        }
    }

    fn next_msg(&mut self) -> Result<Option<Msg<'_>>> {
        let avail = self.in_end - self.in_start;
        if avail < frame::HEADER {
            return Ok(None);
        }
        let h: [u8; frame::HEADER] = self.inbuf[self.in_start..self.in_start + 8]
            .try_into()
            .expect("8 bytes");
        let (len, nfds) = frame::parse_header(&h, frame::DEFAULT_MAX_FRAME)?;
        if nfds != 0 || len < MSG_HEAD {
            return Err(Error::MalformedFrame(
                "bad message from a pool worker".into(),
            ));
        }
        if avail < frame::HEADER + len {
            return Ok(None);
        }
        let b = &self.inbuf[self.in_start + frame::HEADER..self.in_start + frame::HEADER + len];
        self.in_start += frame::HEADER + len;
        Ok(Some(Msg {
            kind: b[0],
            seq: u64::from_le_bytes(b[1..9].try_into().expect("8 bytes")),
            body: &b[MSG_HEAD..],
        }))
    }

    fn running(&self) -> Option<(u64, u64)> {
        use std::sync::atomic::Ordering;
        let seq = self.page.atomic_u64(PAGE_RUNNING).load(Ordering::Acquire);
        (seq != 0).then(|| {
            (
                seq,
                self.page.atomic_u64(PAGE_STARTED).load(Ordering::Relaxed),
            )
        })
    }

    fn kill(&self) {
        if self.reaped.is_none() {
            let _ = platform::pidfd_send_signal(self.pidfd.as_fd(), libc::SIGKILL);
        }
    }

    fn reap(&mut self, block: bool) -> Option<ExitStatus> {
        if self.reaped.is_none() {
            self.reaped = platform::pidfd_wait(self.pidfd.as_fd(), block)
                .ok()
                .flatten();
        }
        self.reaped
    }
}

impl Drop for LocalLink {
    fn drop(&mut self) {
        // Never leave a zombie or a stray worker: kill and reap (prompt after SIGKILL).
        if self.reaped.is_none() {
            self.kill();
            self.reap(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link on a socket pair whose worker is a `sleep` process (killed and reaped through its
    /// pidfd when the link drops, so the `Child` handle is deliberately not waited on).
    #[allow(clippy::zombie_processes)]
    fn test_link() -> (LocalLink, OwnedFd) {
        let (ours, theirs) = platform::socketpair(libc::SOCK_STREAM).unwrap();
        platform::set_nonblocking(ours.as_fd(), true).unwrap();
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pidfd = platform::pidfd_open(child.id()).unwrap();
        let page_fd = platform::memfd(c"test-page", PAGE).unwrap();
        let page = Mapping::new(page_fd.as_fd(), PAGE).unwrap();
        let link = LocalLink::new(child.id(), pidfd, ours, page);
        (link, theirs)
    }

    fn msg(seq: u64, body_len: usize) -> Vec<u8> {
        let mut v = frame::header(MSG_HEAD + body_len, 0).unwrap().to_vec();
        v.push(FROM_OK);
        v.extend_from_slice(&seq.to_le_bytes());
        v.extend(std::iter::repeat_n(seq as u8, body_len));
        v
    }

    #[test]
    fn fill_with_complete_frames_already_buffered() {
        let (mut link, peer) = test_link();
        // Four frames of exactly 16 KiB fill the 64 KiB buffer; more follow.
        let body = 16 * 1024 - frame::HEADER - MSG_HEAD;
        let mut bytes = Vec::new();
        for seq in 1..=6 {
            bytes.extend(msg(seq, body));
        }
        platform::write_all(peer.as_fd(), &bytes).unwrap();
        // Fill twice before parsing: the second fill finds whole frames in the buffer.
        assert_ne!(link.fill().unwrap(), Fill::Eof);
        assert_ne!(link.fill().unwrap(), Fill::Eof);
        let mut seen = Vec::new();
        for _ in 0..10 {
            while let Some(m) = link.next_msg().unwrap() {
                assert_eq!(m.body.len(), body);
                assert!(m.body.iter().all(|&b| b == m.seq as u8));
                seen.push(m.seq);
            }
            if seen.len() == 6 {
                break;
            }
            link.fill().unwrap();
        }
        assert_eq!(seen, vec![1, 2, 3, 4, 5, 6]);
        // End of stream whatever other copies of the descriptor exist (a concurrently spawned
        // process may hold one for an instant).
        use std::os::fd::AsRawFd;
        // SAFETY: shutdown(2) on a valid socket descriptor; no memory is passed.
        assert_eq!(
            unsafe { libc::shutdown(peer.as_raw_fd(), libc::SHUT_WR) },
            0
        );
        assert_eq!(link.fill().unwrap(), Fill::Eof);
        drop(peer);
    }

    #[test]
    fn frame_larger_than_the_buffer_arrives_whole() {
        let (mut link, peer) = test_link();
        let big = msg(9, 300 * 1024);
        let writer = std::thread::spawn(move || {
            let p = peer;
            platform::write_all(p.as_fd(), &big).unwrap();
            p
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let got = loop {
            link.fill().unwrap();
            if let Some(m) = link.next_msg().unwrap() {
                break (m.seq, m.body.len());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "frame never completed"
            );
            platform::poll_read(link.sock(), Some(std::time::Duration::from_millis(100))).unwrap();
        };
        assert_eq!(got, (9, 300 * 1024));
        drop(writer.join().unwrap());
    }
}
