//! Length-prefixed frames on a stream socket, with file descriptors riding along.
//!
//! Wire format of one frame: an 8-byte header, little-endian `u32 len` then `u32 nfds`, followed
//! by `len` payload bytes. When `nfds > 0` the descriptors travel as `SCM_RIGHTS` attached to the
//! header's bytes, so the receiver collects them with its first read of the frame.
//!
//! A receiver checks the header before it allocates: a length above its limit is
//! [`Error::FrameTooLarge`], a descriptor count that does not match what arrived is
//! [`Error::MalformedFrame`], and a stream that ends inside a frame is [`Error::MalformedFrame`]
//! too (a clean end between frames is [`Error::Eof`]).

use std::os::fd::{BorrowedFd, OwnedFd, RawFd};

use crate::error::{Error, Result};
use crate::platform;

/// Size of a frame header.
pub(crate) const HEADER: usize = 8;

/// Default largest payload a receiver accepts (Python's `Connection` has none; 1 GiB here).
pub(crate) const DEFAULT_MAX_FRAME: u64 = 1 << 30;

/// Builds a header.
pub(crate) fn header(len: usize, nfds: usize) -> Result<[u8; HEADER]> {
    let len = u32::try_from(len).map_err(|_| Error::FrameTooLarge {
        len: len as u64,
        max: u32::MAX as u64,
    })?;
    let mut h = [0u8; HEADER];
    h[..4].copy_from_slice(&len.to_le_bytes());
    h[4..].copy_from_slice(&(nfds as u32).to_le_bytes());
    Ok(h)
}

/// Parses a header into `(len, nfds)`, checking both against the limits.
pub(crate) fn parse_header(h: &[u8; HEADER], max: u64) -> Result<(usize, usize)> {
    let len = u32::from_le_bytes(h[..4].try_into().expect("4 bytes")) as u64;
    let nfds = u32::from_le_bytes(h[4..].try_into().expect("4 bytes")) as usize;
    if len > max {
        return Err(Error::FrameTooLarge { len, max });
    }
    if nfds > platform::MAX_FDS_PER_MSG {
        return Err(Error::MalformedFrame(format!(
            "header announces {nfds} descriptors (at most {} allowed)",
            platform::MAX_FDS_PER_MSG
        )));
    }
    Ok((len as usize, nfds))
}

/// Sends one frame: `payload` with `fds` attached.
pub(crate) fn send_frame(sock: BorrowedFd<'_>, payload: &[u8], fds: &[RawFd]) -> Result<()> {
    let h = header(payload.len(), fds.len())?;
    if fds.is_empty() && payload.len() <= 4096 {
        // One syscall for small frames.
        let mut buf = Vec::with_capacity(HEADER + payload.len());
        buf.extend_from_slice(&h);
        buf.extend_from_slice(payload);
        platform::write_all(sock, &buf).map_err(map_write_err)?;
        return Ok(());
    }
    let mut sent = 0;
    while sent < HEADER {
        let n = if sent == 0 {
            platform::send_with_fds(sock, &h, fds)
        } else {
            platform::send(sock, &h[sent..])
        }
        .map_err(map_write_err)?;
        sent += n;
    }
    platform::write_all(sock, payload).map_err(map_write_err)?;
    Ok(())
}

fn map_write_err(e: std::io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::EPIPE) | Some(libc::ECONNRESET) => Error::Eof,
        _ => Error::Io(e),
    }
}

/// Receives one frame into a fresh buffer. [`Error::Eof`] if the stream ended cleanly before it.
pub(crate) fn recv_frame(sock: BorrowedFd<'_>, max: u64) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut fds = Vec::new();
    let mut h = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        let n = platform::recv_with_fds(sock, &mut h[got..], &mut fds).map_err(map_read_err)?;
        if n == 0 {
            if got == 0 {
                return Err(Error::Eof);
            }
            return Err(Error::MalformedFrame(
                "stream ended inside a frame header".into(),
            ));
        }
        got += n;
    }
    let (len, nfds) = parse_header(&h, max)?;
    if fds.len() != nfds {
        return Err(Error::MalformedFrame(format!(
            "header announces {nfds} descriptors but {} arrived",
            fds.len()
        )));
    }
    let mut payload = vec![0u8; len];
    match platform::read_exact(sock, &mut payload) {
        Ok(true) => {}
        Ok(false) if len == 0 => {}
        Ok(false) | Err(_) => {
            return Err(Error::MalformedFrame(
                "stream ended inside a frame payload".into(),
            ));
        }
    }
    Ok((payload, fds))
}

fn map_read_err(e: std::io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::ECONNRESET) => Error::Eof,
        _ => Error::Io(e),
    }
}

// ---------------------------------------------------------------------------------------------
// Buffered frames, for connections
// ---------------------------------------------------------------------------------------------

/// Size of a [`FrameReader`]'s buffer: frames up to this size (header included) are received
/// with as few `recvmsg` calls as the stream allows, several frames per call when they queue up.
pub(crate) const READ_BUF: usize = 64 * 1024;

/// Largest step by which a large payload's buffer grows while its bytes arrive: a peer that
/// announces a big frame and sends little makes us allocate little.
const GROW_STEP: usize = 8 << 20;

/// Where a [`FrameReader`] gets bytes and descriptors from.
pub(crate) trait Source {
    /// Reads some bytes into `buf` (0 at end of stream), appending any descriptors that came
    /// with them to `fds`. `deadline_ok` says whether the read may give up at the source's
    /// deadline (with [`Error::Timeout`]); when false it blocks until bytes come.
    fn recv(&mut self, buf: &mut [u8], fds: &mut Vec<OwnedFd>, deadline_ok: bool) -> Result<usize>;

    /// Reads up to `max` bytes of a frame's body, appending them to `out` (0 at end of
    /// stream). Blocks until bytes come (no deadline: the frame has begun).
    fn recv_append(&mut self, out: &mut Vec<u8>, max: usize) -> Result<usize>;
}

/// A socket as a [`Source`], with an optional deadline and an optional spin before blocking.
pub(crate) struct SockSource<'a> {
    pub(crate) fd: BorrowedFd<'a>,
    pub(crate) deadline: Option<std::time::Instant>,
    pub(crate) spin: std::time::Duration,
    /// Set when a spin ran out without data (the caller backs off spinning).
    pub(crate) spun_out: bool,
}

impl Source for SockSource<'_> {
    fn recv(&mut self, buf: &mut [u8], fds: &mut Vec<OwnedFd>, deadline_ok: bool) -> Result<usize> {
        if !self.spin.is_zero() {
            // Busy-wait a little before sleeping in the kernel: waking an idle CPU costs tens of
            // microseconds, more than a request-reply round trip between two busy ones.
            let t0 = std::time::Instant::now();
            while !platform::poll_read(self.fd, Some(std::time::Duration::ZERO))? {
                if t0.elapsed() >= self.spin {
                    self.spun_out = true;
                    break;
                }
                std::hint::spin_loop();
            }
        }
        if let (Some(d), true) = (self.deadline, deadline_ok) {
            let left = d.saturating_duration_since(std::time::Instant::now());
            if !platform::poll_read(self.fd, Some(left))? {
                return Err(Error::Timeout);
            }
        }
        platform::recv_with_fds(self.fd, buf, fds).map_err(map_read_err)
    }

    fn recv_append(&mut self, out: &mut Vec<u8>, max: usize) -> Result<usize> {
        platform::recv_append(self.fd, out, max).map_err(map_read_err)
    }
}

/// A byte slice as a [`Source`] (for tests and the fuzz target): it delivers at most `chunk`
/// bytes per read and then ends.
pub(crate) struct SliceSource<'a> {
    pub(crate) data: &'a [u8],
    pub(crate) chunk: usize,
}

impl Source for SliceSource<'_> {
    fn recv(&mut self, buf: &mut [u8], _fds: &mut Vec<OwnedFd>, _: bool) -> Result<usize> {
        let n = buf.len().min(self.data.len()).min(self.chunk.max(1));
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }

    fn recv_append(&mut self, out: &mut Vec<u8>, max: usize) -> Result<usize> {
        let n = max.min(self.data.len()).min(self.chunk.max(1));
        out.extend_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Receives frames from a stream through a buffer, so that small frames cost one system call
/// (or less than one, when several are queued) and no allocation.
///
/// Invariants: `buf[start..end]` holds received bytes not yet consumed, always beginning at a
/// frame boundary or inside the frame being read; `fds` holds descriptors received and not yet
/// claimed, in arrival order. Descriptors travel with the first byte of their frame's header, so
/// once a header is complete its descriptors are at the front of `fds`.
#[derive(Debug, Default)]
pub(crate) struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    fds: Vec<OwnedFd>,
}

/// A frame found by [`FrameReader::next`].
pub(crate) enum Frame<'a> {
    /// The whole frame was in the buffer: its payload, borrowed.
    Buffered(&'a [u8], Vec<OwnedFd>),
    /// A large frame, read into its own vector.
    Owned(Vec<u8>, Vec<OwnedFd>),
}

impl FrameReader {
    /// Bytes received and not yet consumed.
    pub(crate) fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// True when nothing is buffered (no bytes, no descriptors).
    pub(crate) fn is_empty(&self) -> bool {
        self.start == self.end && self.fds.is_empty()
    }

    /// Reads once more from `src` into the free end of the buffer. Returns the byte count.
    fn fill(&mut self, src: &mut dyn Source, deadline_ok: bool) -> Result<usize> {
        if self.buf.is_empty() {
            self.buf = vec![0u8; READ_BUF];
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = src.recv(&mut self.buf[self.end..], &mut self.fds, deadline_ok)?;
        self.end += n;
        Ok(n)
    }

    /// Makes sure at least `want` bytes (at most [`READ_BUF`]) are buffered. `Ok(false)` if the
    /// stream ended first.
    fn want(&mut self, want: usize, src: &mut dyn Source, deadline_ok: bool) -> Result<bool> {
        debug_assert!(want <= READ_BUF);
        if self.buffered() < want && self.start + want > READ_BUF {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.buffered() < want {
            if self.fill(src, deadline_ok)? == 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Waits for the next header and returns `(len, nfds)` without consuming anything.
    /// [`Error::Eof`] at a clean end of stream.
    pub(crate) fn peek_header(&mut self, src: &mut dyn Source, max: u64) -> Result<(usize, usize)> {
        if !self.want(HEADER, src, true)? {
            if self.buffered() == 0 {
                return Err(Error::Eof);
            }
            return Err(Error::MalformedFrame(
                "stream ended inside a frame header".into(),
            ));
        }
        let h: &[u8; HEADER] = self.buf[self.start..self.start + HEADER]
            .try_into()
            .expect("HEADER bytes");
        parse_header(h, max)
    }

    /// Receives the next frame. A frame that fits in the buffer is returned borrowed from it.
    pub(crate) fn next(&mut self, src: &mut dyn Source, max: u64) -> Result<Frame<'_>> {
        let (len, nfds) = self.peek_header(src, max)?;
        if self.fds.len() < nfds {
            return Err(Error::MalformedFrame(format!(
                "header announces {nfds} descriptors but {} arrived",
                self.fds.len()
            )));
        }
        if HEADER + len <= READ_BUF {
            // A timeout here leaves the partial frame buffered (and its descriptors queued): the
            // next call carries on where this one stopped.
            if !self.want(HEADER + len, src, true)? {
                return Err(Error::MalformedFrame(
                    "stream ended inside a frame payload".into(),
                ));
            }
            let fds: Vec<OwnedFd> = self.fds.drain(..nfds).collect();
            let at = self.start + HEADER;
            self.start = at + len;
            return Ok(Frame::Buffered(&self.buf[at..at + len], fds));
        }
        // A large frame: take what is buffered, then read the rest straight into its vector.
        // The header is consumed from here on, so the rest is read without a deadline.
        let fds: Vec<OwnedFd> = self.fds.drain(..nfds).collect();
        self.start += HEADER;
        let have = self.buffered().min(len);
        let mut out = Vec::with_capacity(len.min(GROW_STEP));
        out.extend_from_slice(&self.buf[self.start..self.start + have]);
        self.start += have;
        while out.len() < len {
            // Grow by at most GROW_STEP (or doubling) at a time: memory follows the bytes that
            // really arrive, not the length announced.
            let old = out.len();
            let step = (len - old).min(GROW_STEP.max(old));
            out.reserve_exact(step);
            let n = src.recv_append(&mut out, step)?;
            if n == 0 {
                return Err(Error::MalformedFrame(
                    "stream ended inside a frame payload".into(),
                ));
            }
        }
        Ok(Frame::Owned(out, fds))
    }

    /// Consumes the frame whose header [`peek_header`](Self::peek_header) just returned, when
    /// its payload is at most `room` bytes, copying the payload into `out`. Used for
    /// `recv_bytes_into`.
    pub(crate) fn next_into(
        &mut self,
        src: &mut dyn Source,
        max: u64,
        out: &mut [u8],
    ) -> Result<usize> {
        match self.next(src, max)? {
            Frame::Buffered(b, _) => {
                out[..b.len()].copy_from_slice(b);
                Ok(b.len())
            }
            Frame::Owned(b, _) => {
                out[..b.len()].copy_from_slice(&b);
                Ok(b.len())
            }
        }
    }
}

/// Sends a frame prepared in `buf`, whose first [`HEADER`] bytes are reserved for the header
/// (filled in here) and the rest is the payload: one system call in the common case, the
/// descriptors attached to its first byte.
pub(crate) fn send_prepared(sock: BorrowedFd<'_>, buf: &mut [u8], fds: &[RawFd]) -> Result<()> {
    let h = header(buf.len() - HEADER, fds.len())?;
    buf[..HEADER].copy_from_slice(&h);
    let mut sent = 0;
    if !fds.is_empty() {
        sent = platform::send_with_fds(sock, buf, fds).map_err(map_write_err)?;
    }
    platform::write_all(sock, &buf[sent..]).map_err(map_write_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(payloads: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        for p in payloads {
            v.extend_from_slice(&header(p.len(), 0).unwrap());
            v.extend_from_slice(p);
        }
        v
    }

    #[test]
    fn reads_frames_whatever_the_chunking() {
        let big = vec![7u8; READ_BUF * 2 + 3];
        let data = frames(&[b"a", b"", b"hello", &big, b"z"]);
        for chunk in [1, 3, 8, 100, 70_000, usize::MAX] {
            let mut src = SliceSource { data: &data, chunk };
            let mut r = FrameReader::default();
            let mut got = Vec::new();
            loop {
                match r.next(&mut src, u64::MAX) {
                    Ok(Frame::Buffered(b, _)) => got.push(b.to_vec()),
                    Ok(Frame::Owned(b, _)) => got.push(b),
                    Err(Error::Eof) => break,
                    Err(e) => panic!("chunk {chunk}: {e}"),
                }
            }
            assert_eq!(got.len(), 5, "chunk {chunk}");
            assert_eq!(got[2], b"hello");
            assert_eq!(got[3], big);
            assert_eq!(got[4], b"z");
        }
    }

    #[test]
    fn oversized_and_truncated_are_errors() {
        let mut data = frames(&[b"hello"]);
        let mut r = FrameReader::default();
        let e = r.next(
            &mut SliceSource {
                data: &data,
                chunk: 99,
            },
            4,
        );
        assert!(matches!(e, Err(Error::FrameTooLarge { len: 5, max: 4 })));
        data.pop();
        let mut r = FrameReader::default();
        let e = r.next(
            &mut SliceSource {
                data: &data,
                chunk: 99,
            },
            99,
        );
        assert!(matches!(e, Err(Error::MalformedFrame(_))));
        let mut r = FrameReader::default();
        let e = r.next(
            &mut SliceSource {
                data: &data[..3],
                chunk: 99,
            },
            99,
        );
        assert!(matches!(e, Err(Error::MalformedFrame(_))));
        // A 4 GiB announcement with the default limit.
        let h = [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];
        let mut r = FrameReader::default();
        let e = r.next(
            &mut SliceSource {
                data: &h,
                chunk: 99,
            },
            DEFAULT_MAX_FRAME,
        );
        assert!(matches!(e, Err(Error::FrameTooLarge { .. })));
        // Descriptors announced but absent.
        let h = [1, 0, 0, 0, 1, 0, 0, 0, 9];
        let mut r = FrameReader::default();
        let e = r.next(
            &mut SliceSource {
                data: &h,
                chunk: 99,
            },
            99,
        );
        assert!(matches!(e, Err(Error::MalformedFrame(_))));
    }

    #[test]
    fn lying_length_does_not_allocate_it() {
        // Announces 1 GiB, sends 10 bytes: fails without having allocated a gigabyte (the
        // vector grows by GROW_STEP at most).
        let mut data = header(1 << 30, 0).unwrap().to_vec();
        data.extend_from_slice(&[0; 10]);
        let mut r = FrameReader::default();
        let e = r.next(
            &mut SliceSource {
                data: &data,
                chunk: 99,
            },
            DEFAULT_MAX_FRAME,
        );
        assert!(matches!(e, Err(Error::MalformedFrame(_))));
    }
}
