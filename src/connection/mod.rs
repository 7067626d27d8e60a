//! Connections between processes (Python's `multiprocessing.connection`).
//!
//! - [`Pipe`] makes a pair of connected [`Connection`]s (a Unix `SOCK_STREAM` socket pair), for
//!   a parent and its children. A `Connection` is itself a handle: pass it to
//!   [`Process::new`](crate::Process::new) or [`spawn`](crate::spawn) as an argument, or send it
//!   over another connection, and the receiver gets a working end (the descriptor travels with
//!   the message).
//! - [`Listener`] and [`Client`] connect unrelated programs over TCP or Unix sockets, after a
//!   mutual HMAC-SHA256 challenge with a shared key (see [`Listener`]).
//! - [`wait`] waits for any of several connections, listeners or process sentinels.
//!
//! Every message is one *frame* (see `src/frame.rs`): a length-prefixed payload of `serde`
//! data ([`Connection::send`]) or raw bytes ([`Connection::send_bytes`]). A receiver checks the
//! announced length against its limit ([`Connection::set_max_frame`]) before it allocates, so a
//! malformed or oversized frame is an error ([`Error::MalformedFrame`],
//! [`Error::FrameTooLarge`]), never a panic or a huge allocation; after such an error the
//! connection is out of step with its peer and refuses further receives. A peer that closed its
//! end or died gives [`Error::Eof`], never a hang. Decoding a message never runs code: values are
//! plain `serde` data (unlike Python's pickle).
//!
//! ```
//! use multiproc::Pipe;
//! let (mut a, mut b) = Pipe::<String>::new(true).unwrap();
//! a.send(&"hello".to_string()).unwrap();
//! assert_eq!(b.recv().unwrap(), "hello");
//! drop(a);
//! assert!(matches!(b.recv(), Err(multiproc::Error::Eof)));
//! ```

pub(crate) mod auth;
mod listener;

pub(crate) use listener::connect_raw;
pub use listener::{Address, Client, DEFAULT_HANDSHAKE_TIMEOUT, Listener, ToAddress};

#[doc(hidden)]
pub use auth::fuzz_handshake_parsers;

use std::fmt;
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::codec;
use crate::error::{Error, Result};
use crate::frame::{self, Frame, FrameReader, HEADER, SockSource};
use crate::platform;

/// Send buffers above this capacity are released after the send instead of kept for reuse.
const KEEP_WBUF: usize = 4 << 20;

/// Payloads up to this size are copied behind the header and sent with one system call; larger
/// ones go as header then payload, without the copy.
const COPY_MAX: usize = 64 * 1024;

/// Send buffer asked for on each end of a [`Pipe`] (the kernel doubles it and caps it at
/// `net.core.wmem_max`; the default is about 208 KiB).
const PIPE_SNDBUF: usize = 1 << 20;

/// Receives that skip spinning after a spin that ran out (see `RawConn::read`).
const SPIN_BACKOFF: u32 = 64;

/// The untyped core of a connection: a stream socket, a receive buffer and a reusable send
/// buffer.
pub(crate) struct RawConn {
    fd: Option<OwnedFd>,
    readable: bool,
    writable: bool,
    /// A Unix socket (can carry descriptors), not TCP.
    unix: bool,
    max_frame: u64,
    reader: FrameReader,
    wbuf: Vec<u8>,
    /// Set after a framing error: the stream is out of step and cannot be read any more.
    broken: Option<String>,
    /// How long a receive busy-waits before it sleeps (zero: never).
    spin: Duration,
    /// Receives left that skip the spin, after one whose spin ran out.
    spin_skip: u32,
}

impl RawConn {
    pub(crate) fn new(fd: OwnedFd, readable: bool, writable: bool, unix: bool) -> RawConn {
        RawConn {
            fd: Some(fd),
            readable,
            writable,
            unix,
            max_frame: frame::DEFAULT_MAX_FRAME,
            reader: FrameReader::default(),
            wbuf: Vec::new(),
            broken: None,
            spin: Duration::ZERO,
            spin_skip: 0,
        }
    }

    pub(crate) fn fileno(&self) -> Result<BorrowedFd<'_>> {
        self.fd()
    }

    fn fd(&self) -> Result<BorrowedFd<'_>> {
        self.fd.as_ref().map(|f| f.as_fd()).ok_or(Error::Closed)
    }

    fn check_write(&self) -> Result<()> {
        self.fd()?;
        if !self.writable {
            return Err(Error::state(
                "this connection is read-only (a simplex pipe's receiving end)",
            ));
        }
        Ok(())
    }

    fn check_read(&self) -> Result<()> {
        self.fd()?;
        if !self.readable {
            return Err(Error::state(
                "this connection is write-only (a simplex pipe's sending end)",
            ));
        }
        if let Some(why) = &self.broken {
            return Err(Error::MalformedFrame(format!(
                "connection unusable after an earlier framing error: {why}"
            )));
        }
        Ok(())
    }

    /// Sends one frame whose payload `fill` appends to the (reused) buffer it is given; `fill`
    /// returns the descriptors to attach.
    pub(crate) fn send_with(
        &mut self,
        fill: impl FnOnce(&mut Vec<u8>) -> Result<Vec<RawFd>>,
    ) -> Result<()> {
        self.check_write()?;
        let mut buf = std::mem::take(&mut self.wbuf);
        buf.clear();
        buf.resize(HEADER, 0);
        let r = fill(&mut buf).and_then(|fds| {
            if !fds.is_empty() && !self.unix {
                return Err(Error::Encode(
                    "handles (connections, locks, queues...) can only travel over Unix sockets, \
                     not TCP"
                        .into(),
                ));
            }
            frame::send_prepared(self.fd()?, &mut buf, &fds)
        });
        if buf.capacity() <= KEEP_WBUF {
            self.wbuf = buf;
        }
        r
    }

    pub(crate) fn send_bytes(&mut self, b: &[u8]) -> Result<()> {
        if b.len() <= COPY_MAX {
            return self.send_with(|buf| {
                buf.extend_from_slice(b);
                Ok(Vec::new())
            });
        }
        self.check_write()?;
        frame::send_frame(self.fd()?, b, &[])
    }

    /// Receives one frame and hands its payload and descriptors to `f`. With a deadline,
    /// [`Error::Timeout`] if no frame began arriving in time (nothing is lost: a later call
    /// carries on).
    pub(crate) fn recv_with<R>(
        &mut self,
        deadline: Option<Instant>,
        f: impl FnOnce(&[u8], Vec<OwnedFd>) -> Result<R>,
    ) -> Result<R> {
        self.read(deadline, |r, src, max| {
            Ok(match r.next(src, max)? {
                Frame::Buffered(b, fds) => f(b, fds),
                Frame::Owned(b, fds) => f(&b, fds),
            })
        })?
    }

    /// Runs `f` on the reader and a source for this socket. Spinning adapts: when a spin runs
    /// out with nothing to read (the peer is slow, or shares our CPU, where spinning only
    /// delays it), the next [`SPIN_BACKOFF`] receives sleep at once.
    fn read<R>(
        &mut self,
        deadline: Option<Instant>,
        f: impl FnOnce(&mut FrameReader, &mut SockSource<'_>, u64) -> Result<R>,
    ) -> Result<R> {
        self.check_read()?;
        let spin = if self.spin_skip > 0 {
            self.spin_skip -= 1;
            Duration::ZERO
        } else {
            self.spin
        };
        let fd = self.fd.as_ref().ok_or(Error::Closed)?.as_fd();
        let mut src = SockSource {
            fd,
            deadline,
            spin,
            spun_out: false,
        };
        let r = f(&mut self.reader, &mut src, self.max_frame);
        if src.spun_out {
            self.spin_skip = SPIN_BACKOFF;
        }
        r.map_err(|e| self.note_error(e))
    }

    /// Receives one frame as an owned vector (moved, not copied, when it is large).
    fn recv_vec(&mut self) -> Result<Vec<u8>> {
        self.read(None, |r, src, max| {
            Ok(match r.next(src, max)? {
                Frame::Buffered(b, _) => b.to_vec(),
                Frame::Owned(b, _) => b,
            })
        })
    }

    /// Marks the stream out of step after a framing or I/O error.
    fn note_error(&mut self, e: Error) -> Error {
        if matches!(
            e,
            Error::MalformedFrame(_) | Error::FrameTooLarge { .. } | Error::Io(_)
        ) {
            self.broken = Some(e.to_string());
        }
        e
    }

    fn recv_bytes_into(&mut self, out: &mut [u8]) -> Result<usize> {
        self.read(None, |r, src, max| {
            let (len, _) = r.peek_header(src, max)?;
            if len > out.len() {
                return Err(Error::arg(format!(
                    "buffer of {} bytes is too small for the next message ({len} bytes); \
                     the message was left in place",
                    out.len()
                )));
            }
            r.next_into(src, max, out)
        })
    }

    pub(crate) fn poll(&self, timeout: Option<Duration>) -> Result<bool> {
        self.check_read()?;
        if !self.reader.is_empty() {
            return Ok(true);
        }
        platform::poll_read(self.fd()?, timeout)
    }

    pub(crate) fn set_spin(&mut self, spin: Duration) {
        self.spin = spin;
    }

    /// The descriptor's number, if the connection is open.
    pub(crate) fn raw_fd(&self) -> Option<RawFd> {
        self.fd.as_ref().map(|fd| fd.as_raw_fd())
    }

    pub(crate) fn set_max_frame(&mut self, max: u64) {
        self.max_frame = max;
    }

    fn close(&mut self) {
        self.fd = None;
        self.reader = FrameReader::default();
        self.wbuf = Vec::new();
    }
}

/// One end of a connection carrying values of type `T` (Python's `Connection`).
///
/// Made by [`Pipe::new`], [`Listener::accept`] or [`Client::connect`]. `T` is the type of
/// the messages ([`send`](Self::send) / [`recv`](Self::recv)); raw byte messages
/// ([`send_bytes`](Self::send_bytes) / [`recv_bytes`](Self::recv_bytes)) can be used on any
/// connection. Both ends must agree on `T`: a message of another type is an
/// [`Error::Decode`] (or, for types with the same encoding, a wrong value), never undefined
/// behaviour.
///
/// A `Connection` is a handle: it serializes as its descriptor, which travels with the message
/// that carries it ([`Process::new`](crate::Process::new) arguments, another connection, a
/// queue). Both processes then hold an end of the same stream, as in Python. Sending a
/// connection that has received but not yet consumed data is an error (the buffered data could
/// not follow).
///
/// ```
/// use multiproc::{Pipe, Process};
/// fn child(mut conn: multiproc::Connection<Vec<u32>>) {
///     let v = conn.recv().unwrap();
///     conn.send(&v.iter().map(|x| x * 2).collect()).unwrap();
/// }
/// let (mut here, there) = Pipe::<Vec<u32>>::new(true).unwrap();
/// let mut p = Process::new(child, there);
/// p.start().unwrap();
/// here.send(&vec![1, 2, 3]).unwrap();
/// assert_eq!(here.recv().unwrap(), vec![2, 4, 6]);
/// p.join().unwrap();
/// ```
pub struct Connection<T> {
    raw: RawConn,
    _t: PhantomData<fn(T) -> T>,
}

impl<T> fmt::Debug for Connection<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("fd", &self.raw.fd)
            .field("readable", &self.raw.readable)
            .field("writable", &self.raw.writable)
            .finish()
    }
}

impl<T> Connection<T> {
    pub(crate) fn from_raw(raw: RawConn) -> Connection<T> {
        Connection {
            raw,
            _t: PhantomData,
        }
    }

    /// Sends `v` as one message.
    ///
    /// For bulk bytes prefer [`send_bytes`](Self::send_bytes) (or a `serde_bytes` field):
    /// `serde` encodes a `Vec<u8>` item by item, about ten times slower than the copy
    /// `send_bytes` does.
    ///
    /// Errors: [`Error::Eof`] if the peer closed its end or died, [`Error::Encode`] if `v`
    /// cannot be serialized (nothing is sent then), [`Error::Closed`] after [`close`](Self::close).
    pub fn send(&mut self, v: &T) -> Result<()>
    where
        T: Serialize,
    {
        self.raw.send_with(|buf| codec::encode_into(v, buf))
    }

    /// Receives the next message, blocking until it arrives. [`Error::Eof`] when the peer has
    /// closed its end (or died) and nothing is left to read.
    pub fn recv(&mut self) -> Result<T>
    where
        T: DeserializeOwned,
    {
        self.raw.recv_with(None, codec::decode)
    }

    /// [`recv`](Self::recv) giving up with [`Error::Timeout`] if no message began to arrive
    /// within `timeout`. A message that has begun is read to its end (small messages are
    /// bounded by the timeout as a whole; nothing is lost on a timeout).
    ///
    /// ```
    /// use std::time::Duration;
    /// let (mut a, _b) = multiproc::Pipe::<u8>::new(true).unwrap();
    /// let r = a.recv_timeout(Duration::from_millis(10));
    /// assert!(matches!(r, Err(multiproc::Error::Timeout)));
    /// ```
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<T>
    where
        T: DeserializeOwned,
    {
        self.raw
            .recv_with(Some(Instant::now() + timeout), codec::decode)
    }

    /// True when something can be received without blocking: a message, or the end of the
    /// stream (then [`recv`](Self::recv) gives [`Error::Eof`]). Waits up to `timeout`
    /// (`None`: forever, `Some(Duration::ZERO)`: just look).
    pub fn poll(&self, timeout: Option<Duration>) -> Result<bool> {
        self.raw.poll(timeout)
    }

    /// Sends `bytes` as one message, as they are (Python's `send_bytes`).
    ///
    /// ```
    /// let (mut a, mut b) = multiproc::Pipe::<()>::new(true).unwrap();
    /// a.send_bytes(b"raw").unwrap();
    /// assert_eq!(b.recv_bytes().unwrap(), b"raw");
    /// ```
    pub fn send_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.raw.send_bytes(bytes)
    }

    /// Receives the next message as bytes (Python's `recv_bytes`). Descriptors that came with
    /// it are closed.
    pub fn recv_bytes(&mut self) -> Result<Vec<u8>> {
        self.raw.recv_vec()
    }

    /// Receives the next message into `buf` and returns its length (Python's
    /// `recv_bytes_into`). If `buf` is too small the message stays in place (receive it with a
    /// larger buffer or [`recv_bytes`](Self::recv_bytes)) and the error is
    /// [`Error::InvalidArgument`].
    ///
    /// ```
    /// let (mut a, mut b) = multiproc::Pipe::<()>::new(true).unwrap();
    /// a.send_bytes(b"hello").unwrap();
    /// let mut small = [0u8; 2];
    /// assert!(b.recv_bytes_into(&mut small).is_err());
    /// let mut buf = [0u8; 16];
    /// let n = b.recv_bytes_into(&mut buf).unwrap();
    /// assert_eq!(&buf[..n], b"hello");
    /// ```
    pub fn recv_bytes_into(&mut self, buf: &mut [u8]) -> Result<usize> {
        self.raw.recv_bytes_into(buf)
    }

    /// Closes this end. Further operations give [`Error::Closed`]; the peer sees
    /// [`Error::Eof`] once no other process holds this end. Dropping does the same.
    pub fn close(&mut self) {
        self.raw.close();
    }

    /// True after [`close`](Self::close).
    pub fn closed(&self) -> bool {
        self.raw.fd.is_none()
    }

    /// True if this end can receive (false for a simplex pipe's sending end).
    pub fn readable(&self) -> bool {
        self.raw.readable
    }

    /// True if this end can send (false for a simplex pipe's receiving end).
    pub fn writable(&self) -> bool {
        self.raw.writable
    }

    /// Sets the largest message this end accepts (default 1 GiB). A longer message is
    /// [`Error::FrameTooLarge`], detected from its header before anything is allocated.
    pub fn set_max_frame(&mut self, max_bytes: u64) {
        self.raw.set_max_frame(max_bytes);
    }

    /// The largest message this end accepts.
    pub fn max_frame(&self) -> u64 {
        self.raw.max_frame
    }

    /// Makes receives busy-wait up to `spin` for a message before sleeping in the kernel.
    /// Worth it for request-reply traffic between processes on different CPUs (it saves the
    /// wake-up of an idle CPU); the default is zero.
    pub fn set_spin(&mut self, spin: Duration) {
        self.raw.set_spin(spin);
    }

    pub(crate) fn raw_mut(&mut self) -> &mut RawConn {
        &mut self.raw
    }

    /// The same connection carrying messages of another type.
    pub fn cast<U>(self) -> Connection<U> {
        Connection::from_raw(self.raw)
    }

    /// The underlying descriptor ([`Error::Closed`] after [`close`](Self::close)).
    pub fn fileno(&self) -> Result<BorrowedFd<'_>> {
        self.raw.fd()
    }
}

/// What a `Connection` looks like on the wire: flags, then its descriptor.
#[derive(Serialize)]
struct WireOut<'a> {
    readable: bool,
    writable: bool,
    unix: bool,
    max_frame: u64,
    #[serde(serialize_with = "ser_fd")]
    fd: BorrowedFd<'a>,
}

#[derive(Deserialize)]
struct WireIn {
    readable: bool,
    writable: bool,
    unix: bool,
    max_frame: u64,
    #[serde(deserialize_with = "codec::deserialize_fd")]
    fd: OwnedFd,
}

fn ser_fd<S: Serializer>(fd: &BorrowedFd<'_>, s: S) -> Result<S::Ok, S::Error> {
    codec::serialize_fd(*fd, s)
}

impl<T> Serialize for Connection<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error as _;
        let fd = self
            .raw
            .fd()
            .map_err(|_| S::Error::custom("cannot send a closed connection"))?;
        if !self.raw.reader.is_empty() {
            return Err(S::Error::custom(
                "cannot send a connection that holds received, unread data",
            ));
        }
        WireOut {
            readable: self.raw.readable,
            writable: self.raw.writable,
            unix: self.raw.unix,
            max_frame: self.raw.max_frame,
            fd,
        }
        .serialize(s)
    }
}

impl<'de, T> Deserialize<'de> for Connection<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = WireIn::deserialize(d)?;
        let mut raw = RawConn::new(w.fd, w.readable, w.writable, w.unix);
        raw.max_frame = w.max_frame;
        Ok(Connection::from_raw(raw))
    }
}

/// Makes pairs of connected [`Connection`]s (Python's `Pipe()`).
///
/// ```
/// use multiproc::Pipe;
/// // Simplex: the first end only receives, the second only sends.
/// let (mut rx, mut tx) = Pipe::<u64>::new(false).unwrap();
/// tx.send(&7).unwrap();
/// assert_eq!(rx.recv().unwrap(), 7);
/// assert!(rx.send(&1).is_err());
/// ```
pub struct Pipe<T>(PhantomData<fn(T) -> T>);

impl<T> Pipe<T> {
    /// Two connected ends. With `duplex` both can send and receive; without, the first only
    /// receives and the second only sends (Python's `(r, w) = Pipe(duplex=False)`).
    #[allow(clippy::new_ret_no_self)] // the name is Python's `Pipe()`; it makes two ends
    pub fn new(duplex: bool) -> Result<(Connection<T>, Connection<T>)> {
        let (a, b) = platform::socketpair(libc::SOCK_STREAM)?;
        for fd in [&a, &b] {
            // Best effort: fewer round trips through the scheduler for large messages.
            let _ = platform::set_send_buffer(fd.as_fd(), PIPE_SNDBUF);
        }
        Ok((
            Connection::from_raw(RawConn::new(a, true, duplex, true)),
            Connection::from_raw(RawConn::new(b, duplex, true, true)),
        ))
    }
}

/// Something [`wait`] can wait on: a [`Connection`] (ready when a message or the end of the
/// stream can be received), a [`Listener`] (a client is waiting), a
/// [`Process`](crate::Process) (it ended: its sentinel), or a bare descriptor (readable).
pub trait Waitable {
    /// The descriptor to poll for reading.
    fn wait_fd(&self) -> Result<BorrowedFd<'_>>;
    /// True when the object is ready without polling (data already buffered).
    fn ready_now(&self) -> bool {
        false
    }
}

impl<T> Waitable for Connection<T> {
    fn wait_fd(&self) -> Result<BorrowedFd<'_>> {
        self.raw.fd()
    }
    fn ready_now(&self) -> bool {
        !self.raw.reader.is_empty()
    }
}

impl Waitable for crate::Process {
    fn wait_fd(&self) -> Result<BorrowedFd<'_>> {
        self.sentinel()
    }
}

impl Waitable for BorrowedFd<'_> {
    fn wait_fd(&self) -> Result<BorrowedFd<'_>> {
        Ok(self.as_fd())
    }
}

impl Waitable for OwnedFd {
    fn wait_fd(&self) -> Result<BorrowedFd<'_>> {
        Ok(self.as_fd())
    }
}

/// Waits until at least one of `objects` is ready, or `timeout` passes (`None`: no limit), and
/// returns the indices of the ready ones (empty on timeout). Python's
/// `multiprocessing.connection.wait`.
///
/// ```
/// use std::time::Duration;
/// use multiproc::connection::{wait, Waitable};
/// let (mut a, b) = multiproc::Pipe::<u8>::new(true).unwrap();
/// let (c, d) = multiproc::Pipe::<u8>::new(true).unwrap();
/// a.send(&1).unwrap();
/// let ready = wait(&[&b as &dyn Waitable, &d], Some(Duration::from_secs(5))).unwrap();
/// assert_eq!(ready, vec![0]);
/// assert!(wait(&[&d as &dyn Waitable], Some(Duration::ZERO)).unwrap().is_empty());
/// # drop(c);
/// ```
pub fn wait(objects: &[&dyn Waitable], timeout: Option<Duration>) -> Result<Vec<usize>> {
    let now: Vec<usize> = (0..objects.len())
        .filter(|&i| objects[i].ready_now())
        .collect();
    if !now.is_empty() {
        return Ok(now);
    }
    let fds = objects
        .iter()
        .map(|o| o.wait_fd().map(|fd| (fd, platform::Interest::Read)))
        .collect::<Result<Vec<_>>>()?;
    let ready = platform::poll(&fds, timeout)?;
    Ok((0..ready.len()).filter(|&i| ready[i]).collect())
}

/// Feeds arbitrary bytes to the frame decoder, delivered `chunk` bytes per read, with a frame
/// limit of `max` (for the fuzz target and property tests). Returns the payloads decoded before
/// the first error or the end. Must never panic nor allocate much more than `max` bytes.
#[doc(hidden)]
pub fn fuzz_frame_decoder(data: &[u8], chunk: usize, max: u64) -> Vec<Vec<u8>> {
    let mut src = frame::SliceSource { data, chunk };
    let mut r = FrameReader::default();
    let mut out = Vec::new();
    while let Ok(f) = r.next(&mut src, max) {
        out.push(match f {
            Frame::Buffered(b, _) => b.to_vec(),
            Frame::Owned(b, _) => b,
        });
    }
    out
}

impl crate::context::Context {
    /// [`Pipe::new`] (Python's `ctx.Pipe()`; a pipe does not depend on the start method).
    pub fn pipe<T>(&self, duplex: bool) -> Result<(Connection<T>, Connection<T>)> {
        Pipe::new(duplex)
    }
}
