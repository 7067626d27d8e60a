//! Queues between processes, as Python's `multiprocessing.queues`: [`Queue`], [`SimpleQueue`]
//! and [`JoinableQueue`].
//!
//! A queue is a ring of bytes in anonymous shared memory (a memfd), shared by every process
//! holding a handle. Handles are cheap to [`Clone`] and travel to other processes as arguments
//! of a [`Process`](crate::Process) or a pool task, under every start method (the descriptor
//! rides along with the message). Any number of producers and consumers, in any number of
//! processes and threads, may use one queue.
//!
//! ```
//! use multiproc::{Process, Queue};
//!
//! fn worker((jobs, results): (Queue<Option<u64>>, Queue<u64>)) {
//!     while let Some(n) = jobs.get().unwrap() {
//!         results.put(n * n).unwrap();
//!     }
//! }
//!
//! let jobs = Queue::new().unwrap();
//! let results = Queue::new().unwrap();
//! let mut p = Process::new(worker, (jobs.clone(), results.clone()));
//! p.start().unwrap();
//! for n in 1..=3 {
//!     jobs.put(Some(n)).unwrap();
//! }
//! jobs.put(None).unwrap(); // a sentinel: "no more work"
//! let mut got: Vec<u64> = (0..3).map(|_| results.get().unwrap()).collect();
//! got.sort();
//! assert_eq!(got, [1, 4, 9]);
//! p.join().unwrap();
//! ```
//!
//! # What differs from Python, on purpose
//! * **No feeder thread.** `put` serializes the value straight into shared memory before it
//!   returns. A value that cannot be serialized fails at `put`, in the caller
//!   ([`Error::Encode`]); once `put` returned `Ok`, the message is in the queue even if the
//!   producer dies the next instant (Python can lose what its feeder thread had not flushed).
//! * **"Unbounded" means unbounded in count, bounded in bytes.** [`Queue::new`] puts no limit
//!   on the number of messages, but they live in a ring of fixed byte capacity
//!   ([`DEFAULT_BYTE_CAPACITY`], 64 MiB, or what [`Queue::with_limits`] says). When the ring is
//!   full, `put` waits for room (back-pressure) instead of buffering in the producer's memory
//!   as Python does. The memory is reserved, not used: pages are only touched as the backlog
//!   needs them, and once past 4 MiB (or half the ring) a message goes back to the ring's
//!   start whenever the queue is empty, so a queue that keeps up touches a few MiB. A single message
//!   larger than the ring fails at `put` with [`Error::InvalidArgument`].
//! * **`close` closes the queue for everyone**, not only for the calling process: see
//!   [`Queue::close`].
//! * **Messages are plain data.** A value holding a handle (a connection, a lock, another
//!   queue) cannot go through a queue: `put` fails with [`Error::Encode`]. Pass handles as
//!   process arguments instead. For byte payloads use `serde_bytes::ByteBuf` (a `Vec<u8>`
//!   serializes byte by byte, which is much slower for large buffers).
//!
//! # Processes that die
//! A producer or consumer killed in the middle of an operation (even by `SIGKILL`) never
//! wedges the queue for the others, and no message is ever delivered twice:
//! * killed inside `put`: the message is either entirely in the queue or not at all (a put
//!   killed before its commit point is rolled back, one killed after it counts even though it
//!   never returned, and a half-copied large message is dropped);
//! * killed inside `get`: the message is either still in the queue, for another consumer, or
//!   gone with the process that took it (only if the process died after its `get` had
//!   committed, i.e. in the last instructions before returning);
//! * messages put by live processes are never lost.
//!
//! Producers and consumers have a lock each (one producer and one consumer never wait for
//! each other). The next process to take the dead one's lock repairs what it left (the kernel
//! tells it, through a robust mutex). Blocked callers look for dead peers at least every
//! 50 ms, and a `try_get` or `try_put` that would fail looks first, so a program that never
//! blocks recovers too. See `src/queues/README.md` for the mechanism.

mod ring;

use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::codec;
use crate::context::Context;
use crate::error::{Error, Result};
use ring::{Shared, Wait};
#[doc(hidden)]
pub use ring::{TestPoint, set_test_hook};

/// Byte capacity of a queue's ring unless [`Queue::with_limits`] says otherwise: 64 MiB of
/// address space, touched only as the backlog needs it.
pub const DEFAULT_BYTE_CAPACITY: usize = 64 << 20;

/// A first-in, first-out queue shared between processes, as Python's
/// `multiprocessing.Queue`.
///
/// Messages from one producer arrive in the order it put them; messages from several producers
/// interleave. Every message is received by exactly one consumer.
///
/// ```
/// use multiproc::{Error, Queue};
/// let q = Queue::bounded(2).unwrap();
/// q.put("a".to_string()).unwrap();
/// q.put("b".to_string()).unwrap();
/// assert!(q.full());
/// assert!(matches!(q.try_put("c".to_string()), Err(Error::Full)));
/// assert_eq!(q.qsize(), 2);
/// assert_eq!(q.get().unwrap(), "a");
/// assert_eq!(q.get().unwrap(), "b");
/// assert!(matches!(q.try_get(), Err(Error::Empty)));
/// ```
pub struct Queue<T> {
    ring: Arc<Shared>,
    _t: PhantomData<fn(T) -> T>,
}

impl<T> Clone for Queue<T> {
    fn clone(&self) -> Self {
        Queue {
            ring: Arc::clone(&self.ring),
            _t: PhantomData,
        }
    }
}

impl<T> fmt::Debug for Queue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("qsize", &self.ring.qsize())
            .field("maxsize", &self.ring.maxsize())
            .field("byte_capacity", &self.ring.capacity())
            .field("closed", &self.ring.is_closed())
            .finish()
    }
}

impl<T: Serialize + DeserializeOwned> Queue<T> {
    /// A queue with no limit on the number of messages (their bytes are limited by
    /// [`DEFAULT_BYTE_CAPACITY`]; see the [module docs](self) for what "unbounded" means here).
    pub fn new() -> Result<Queue<T>> {
        Queue::with_limits(0, DEFAULT_BYTE_CAPACITY)
    }

    /// A queue holding at most `maxsize` messages (`0`: no limit, as Python's `maxsize <= 0`).
    pub fn bounded(maxsize: usize) -> Result<Queue<T>> {
        Queue::with_limits(maxsize, DEFAULT_BYTE_CAPACITY)
    }

    /// The same as [`Queue::bounded`].
    pub fn with_capacity(maxsize: usize) -> Result<Queue<T>> {
        Queue::bounded(maxsize)
    }

    /// A queue holding at most `maxsize` messages (`0`: no limit) in a ring of `bytes` bytes,
    /// rounded up to a power of two (at least 256, at most 2 GiB). Each message takes its
    /// serialized size plus 8, rounded up to 8; the largest message the queue accepts is
    /// [`byte_capacity`](Queue::byte_capacity)` - 8`.
    ///
    /// ```
    /// let q = multiproc::Queue::<u8>::with_limits(0, 4096).unwrap();
    /// assert_eq!(q.byte_capacity(), 4096);
    /// let q = multiproc::Queue::<u8>::with_limits(0, 3000).unwrap();
    /// assert_eq!(q.byte_capacity(), 4096);
    /// ```
    pub fn with_limits(maxsize: usize, bytes: usize) -> Result<Queue<T>> {
        Queue::create(maxsize, bytes, false)
    }

    fn create(maxsize: usize, bytes: usize, joinable: bool) -> Result<Queue<T>> {
        Ok(Queue {
            ring: Arc::new(Shared::create(bytes, maxsize as u64, joinable)?),
            _t: PhantomData,
        })
    }

    fn put_with(&self, item: &T, wait: Wait) -> Result<()> {
        let len = codec::encoded_size_plain(item).map_err(not_plain)?;
        self.ring.put(
            len,
            |buf| codec::encode_plain_to_slice(item, buf).map_err(not_plain),
            wait,
        )
    }

    fn get_with(&self, wait: Wait) -> Result<T> {
        self.ring.get(codec::decode_plain_only::<T>, wait)
    }

    /// Puts `item`, waiting as long as the queue is full. Fails with [`Error::Closed`] if the
    /// queue is (or gets) closed, [`Error::Encode`] if the value does not serialize (nothing
    /// is put then), [`Error::InvalidArgument`] if it is larger than the whole ring.
    pub fn put(&self, item: T) -> Result<()> {
        self.put_with(&item, Wait::Until(None))
    }

    /// As [`put`](Queue::put), but serializes from a reference (no clone of a large value,
    /// and the caller keeps it whatever happens).
    pub fn put_ref(&self, item: &T) -> Result<()> {
        self.put_with(item, Wait::Until(None))
    }

    /// As [`put`](Queue::put), but gives up with [`Error::Full`] after `timeout`.
    pub fn put_timeout(&self, item: T, timeout: Duration) -> Result<()> {
        self.put_with(&item, Wait::timeout(timeout))
    }

    /// As [`put`](Queue::put), but fails with [`Error::Full`] at once instead of waiting.
    pub fn try_put(&self, item: T) -> Result<()> {
        self.put_with(&item, Wait::Try)
    }

    /// As [`try_put`](Queue::try_put), from a reference (the caller keeps the value when the
    /// queue is full).
    pub fn try_put_ref(&self, item: &T) -> Result<()> {
        self.put_with(item, Wait::Try)
    }

    /// Python's name for [`try_put`](Queue::try_put).
    pub fn put_nowait(&self, item: T) -> Result<()> {
        self.try_put(item)
    }

    /// Takes the oldest message, waiting as long as the queue is empty. Once the queue is
    /// closed and drained, fails with [`Error::Closed`] instead of waiting. A message that does
    /// not deserialize as `T` is consumed and reported as [`Error::Decode`].
    pub fn get(&self) -> Result<T> {
        self.get_with(Wait::Until(None))
    }

    /// As [`get`](Queue::get), but gives up with [`Error::Empty`] after `timeout`.
    pub fn get_timeout(&self, timeout: Duration) -> Result<T> {
        self.get_with(Wait::timeout(timeout))
    }

    /// As [`get`](Queue::get), but fails with [`Error::Empty`] at once instead of waiting.
    pub fn try_get(&self) -> Result<T> {
        self.get_with(Wait::Try)
    }

    /// Python's name for [`try_get`](Queue::try_get).
    pub fn get_nowait(&self) -> Result<T> {
        self.try_get()
    }
}

impl<T> Queue<T> {
    /// Number of messages ready to be taken. As in Python, a snapshot: other processes may
    /// change it the next instant.
    pub fn qsize(&self) -> usize {
        self.ring.qsize()
    }

    /// Whether no message is ready to be taken (a snapshot).
    pub fn empty(&self) -> bool {
        self.qsize() == 0
    }

    /// Whether a `put` would have to wait now: `maxsize` messages are queued, or the ring has
    /// no room left (a snapshot).
    pub fn full(&self) -> bool {
        self.ring.full()
    }

    /// The message limit given at creation (`0`: none).
    pub fn maxsize(&self) -> usize {
        self.ring.maxsize() as usize
    }

    /// Size of the ring in bytes.
    pub fn byte_capacity(&self) -> usize {
        self.ring.capacity()
    }

    /// Closes the queue for every process that holds it. Unlike Python's `close` (which only
    /// stops the calling process's feeder thread), this is a shared state, like a closed
    /// channel:
    /// * every later `put` fails with [`Error::Closed`], and so do `put`s blocked on a full
    ///   queue (they wake up);
    /// * `get` keeps returning the messages already in the queue (and those whose `put` was
    ///   in progress when `close` was called); once none is left it fails with
    ///   [`Error::Closed`] instead of waiting or reporting [`Error::Empty`], and blocked `get`s
    ///   wake up to do so.
    ///
    /// Closing twice is harmless. The shared memory itself is freed when the last handle in
    /// the last process goes away.
    ///
    /// ```
    /// use multiproc::{Error, Queue};
    /// let q = Queue::new().unwrap();
    /// q.put(1).unwrap();
    /// q.close().unwrap();
    /// assert!(matches!(q.put(2), Err(Error::Closed)));
    /// assert_eq!(q.get().unwrap(), 1);
    /// assert!(matches!(q.get(), Err(Error::Closed)));
    /// ```
    pub fn close(&self) -> Result<()> {
        self.ring.close()
    }

    /// Whether [`close`](Queue::close) was called (by any process).
    pub fn is_closed(&self) -> bool {
        self.ring.is_closed()
    }
}

fn not_plain(e: Error) -> Error {
    match e {
        Error::Encode(m) => Error::Encode(format!(
            "{m} (queue messages are plain data: pass handles as process arguments instead)"
        )),
        other => other,
    }
}

impl<T> Serialize for Queue<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        codec::serialize_fd(self.ring.fd(), s)
    }
}

impl<'de, T> Deserialize<'de> for Queue<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let fd = codec::deserialize_fd(d)?;
        let ring = Shared::open(fd).map_err(serde::de::Error::custom)?;
        Ok(Queue {
            ring: Arc::new(ring),
            _t: PhantomData,
        })
    }
}

/// A simplified queue, as Python's `multiprocessing.SimpleQueue`: unbounded, with `put`,
/// `get`, `empty` and `close`. (Here it is the same shared ring as [`Queue`]: the simplicity is
/// in the interface.)
///
/// ```
/// let q = multiproc::SimpleQueue::new().unwrap();
/// q.put((1, "one".to_string())).unwrap();
/// assert!(!q.empty());
/// assert_eq!(q.get().unwrap(), (1, "one".to_string()));
/// assert!(q.empty());
/// ```
pub struct SimpleQueue<T>(Queue<T>);

impl<T> Clone for SimpleQueue<T> {
    fn clone(&self) -> Self {
        SimpleQueue(self.0.clone())
    }
}

impl<T> fmt::Debug for SimpleQueue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SimpleQueue").field(&self.0).finish()
    }
}

impl<T: Serialize + DeserializeOwned> SimpleQueue<T> {
    /// A new, empty queue.
    pub fn new() -> Result<SimpleQueue<T>> {
        Ok(SimpleQueue(Queue::new()?))
    }

    /// Puts `item` (see [`Queue::put`]).
    pub fn put(&self, item: T) -> Result<()> {
        self.0.put(item)
    }

    /// Takes the oldest message, waiting while there is none (see [`Queue::get`]).
    pub fn get(&self) -> Result<T> {
        self.0.get()
    }

    /// As [`get`](SimpleQueue::get), giving up with [`Error::Empty`] after `timeout`.
    pub fn get_timeout(&self, timeout: Duration) -> Result<T> {
        self.0.get_timeout(timeout)
    }
}

impl<T> SimpleQueue<T> {
    /// Whether no message is ready (a snapshot).
    pub fn empty(&self) -> bool {
        self.0.empty()
    }

    /// Closes the queue for everyone (see [`Queue::close`]).
    pub fn close(&self) -> Result<()> {
        self.0.close()
    }
}

impl<T> Serialize for SimpleQueue<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de, T> Deserialize<'de> for SimpleQueue<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Queue::deserialize(d).map(SimpleQueue)
    }
}

/// A [`Queue`] that also counts unfinished tasks, as Python's `multiprocessing.JoinableQueue`:
/// every `put` adds one, every [`task_done`](JoinableQueue::task_done) removes one, and
/// [`join`](JoinableQueue::join) waits until the count is zero. All of [`Queue`]'s methods are
/// available through `Deref`.
///
/// A consumer that dies between its `get` and its `task_done` leaves its task unfinished
/// forever (as in Python): use [`join_timeout`](JoinableQueue::join_timeout) where that can
/// happen.
///
/// ```
/// use multiproc::JoinableQueue;
/// let q = JoinableQueue::new().unwrap();
/// q.put(7).unwrap();
/// assert!(q.join_timeout(std::time::Duration::from_millis(1)).is_err());
/// assert_eq!(q.get().unwrap(), 7);
/// q.task_done().unwrap();
/// q.join().unwrap();
/// assert!(q.task_done().is_err()); // more task_done() calls than items put
/// ```
pub struct JoinableQueue<T>(Queue<T>);

impl<T> Clone for JoinableQueue<T> {
    fn clone(&self) -> Self {
        JoinableQueue(self.0.clone())
    }
}

impl<T> fmt::Debug for JoinableQueue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinableQueue")
            .field("queue", &self.0)
            .field("unfinished_tasks", &self.unfinished_tasks())
            .finish()
    }
}

impl<T: Serialize + DeserializeOwned> JoinableQueue<T> {
    /// An unbounded joinable queue (see [`Queue::new`]).
    pub fn new() -> Result<JoinableQueue<T>> {
        JoinableQueue::with_limits(0, DEFAULT_BYTE_CAPACITY)
    }

    /// A joinable queue of at most `maxsize` messages (see [`Queue::bounded`]).
    pub fn bounded(maxsize: usize) -> Result<JoinableQueue<T>> {
        JoinableQueue::with_limits(maxsize, DEFAULT_BYTE_CAPACITY)
    }

    /// A joinable queue with explicit limits (see [`Queue::with_limits`]).
    pub fn with_limits(maxsize: usize, bytes: usize) -> Result<JoinableQueue<T>> {
        Ok(JoinableQueue(Queue::create(maxsize, bytes, true)?))
    }
}

impl<T> JoinableQueue<T> {
    /// Marks one task taken from the queue as done. Fails with [`Error::InvalidState`] when
    /// called more times than items were put (Python's `ValueError`).
    pub fn task_done(&self) -> Result<()> {
        self.0.ring.task_done()
    }

    /// Waits until every item put has been marked done.
    pub fn join(&self) -> Result<()> {
        self.0.ring.join(Wait::Until(None))
    }

    /// As [`join`](JoinableQueue::join), giving up with [`Error::Timeout`] after `timeout`.
    pub fn join_timeout(&self, timeout: Duration) -> Result<()> {
        self.0.ring.join(Wait::timeout(timeout))
    }

    /// Items put and not yet marked done (a snapshot).
    pub fn unfinished_tasks(&self) -> u64 {
        self.0.ring.unfinished()
    }
}

impl<T> Deref for JoinableQueue<T> {
    type Target = Queue<T>;
    fn deref(&self) -> &Queue<T> {
        &self.0
    }
}

impl<T> Serialize for JoinableQueue<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de, T> Deserialize<'de> for JoinableQueue<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Queue::deserialize(d).map(JoinableQueue)
    }
}

impl Context {
    /// A [`Queue`] (queues work the same under every start method; this is for parity with
    /// Python's `ctx.Queue()`).
    pub fn queue<T: Serialize + DeserializeOwned>(&self) -> Result<Queue<T>> {
        Queue::new()
    }

    /// A [`SimpleQueue`] (Python's `ctx.SimpleQueue()`).
    pub fn simple_queue<T: Serialize + DeserializeOwned>(&self) -> Result<SimpleQueue<T>> {
        SimpleQueue::new()
    }

    /// A [`JoinableQueue`] (Python's `ctx.JoinableQueue()`).
    pub fn joinable_queue<T: Serialize + DeserializeOwned>(&self) -> Result<JoinableQueue<T>> {
        JoinableQueue::new()
    }
}
