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
            return Err(Error::MalformedFrame("stream ended inside a frame header".into()));
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
