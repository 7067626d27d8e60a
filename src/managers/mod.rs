//! Managers (Python's `multiprocessing.managers`): a server process that holds shared objects,
//! and proxies that call their methods from any process.
//!
//! [`Manager::start`] starts the server as a child process and returns a handle whose
//! constructors ([`dict`](Manager::dict), [`list`](Manager::list),
//! [`namespace`](Manager::namespace), [`queue`](Manager::queue), [`lock`](Manager::lock),
//! [`value`](Manager::value), [`event`](Manager::event), [`barrier`](Manager::barrier), and
//! [`create`](Manager::create) for registered user types) make objects in the server and return
//! proxies. A proxy is plain data (the server's address, the key, the object's id): it can be
//! cloned, passed to a [`Process`] or a pool task as an argument, and used from
//! any thread; each process keeps a small pool of authenticated connections per manager. On a
//! Unix socket (the default for [`Manager::start`]) a connection's requests and replies cross
//! shared memory (its socket stays for waking a sleeping peer and noticing a dead one), so a
//! call costs about 2 µs when both ends are busy, no system call at all.
//!
//! [`Manager::serve`] runs a server in the calling process for other programs, which reach it
//! with [`Manager::connect`] (the address and key are all they need), and share objects by
//! name with [`Manager::named`].
//!
//! Failure: if the manager process dies, every proxy call fails ([`Error::Eof`] or
//! [`Error::Io`] for a refused connection), never hangs. A client that dies while holding a
//! manager [`LockProxy`] does not deadlock the others: the server releases locks held by a
//! connection that closes. Values live in the server as their `serde` bytes: the server never
//! needs the user's types, and dictionary keys compare by their serialized form (equal values
//! serialize equally for all usual key types: integers, strings, tuples, derived structs).
//! Objects live until [`Manager::release`] or the manager's shutdown (proxies do not count
//! references, unlike Python's).
//!
//! ```
//! use multiproc::managers::{DictProxy, Manager};
//! fn fill((d, i): (DictProxy<u32, String>, u32)) {
//!     d.set(&i, &format!("from child {i}")).unwrap();
//! }
//! let m = Manager::start().unwrap();
//! let d = m.dict::<u32, String>().unwrap();
//! let kids: Vec<_> = (0..3).map(|i| multiproc::spawn(fill, (d.clone(), i)).unwrap()).collect();
//! for k in kids {
//!     k.join().unwrap();
//! }
//! assert_eq!(d.len().unwrap(), 3);
//! assert_eq!(d.get(&2).unwrap().unwrap(), "from child 2");
//! ```

mod lane;
mod proxies;
mod server;

pub use proxies::{
    BarrierProxy, DictProxy, EventProxy, ListProxy, LockGuard, LockProxy, NamespaceProxy, Proxy,
    QueueProxy, ValueProxy,
};

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, RawFd};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::connection::{self, Address, Connection, Listener, ToAddress, Waitable};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::platform;
use crate::process::Process;

/// Identifies an object in a manager (0 is the manager itself).
pub(crate) type ObjectId = u64;

/// On connections without a fast lane (TCP), how long a manager's connection thread
/// busy-waits for the next request before sleeping, and a proxy for its reply (see
/// `RawConn::read`, which backs off by itself when spinning does not pay). Unix connections
/// use the lane's own spin (`lane.rs`).
pub(crate) const SERVER_SPIN: Duration = Duration::from_micros(30);
const CLIENT_SPIN: Duration = Duration::from_micros(30);

/// Dead-peer detection on TCP manager connections (both ends): keepalive probes after
/// `TCP_IDLE` of silence, every `TCP_INTERVAL`, the connection failing after `TCP_PROBES`
/// unanswered ones (and data unacknowledged for as long fails it too): a peer whose machine
/// vanished without closing gives an error within about 30 s instead of a wait forever.
pub(crate) const TCP_IDLE: Duration = Duration::from_secs(10);
pub(crate) const TCP_INTERVAL: Duration = Duration::from_secs(5);
pub(crate) const TCP_PROBES: u32 = 4;

/// Sets [`TCP_IDLE`] and co. on a manager's TCP connection.
pub(crate) fn tcp_keepalive(raw: &crate::connection::RawConn) -> Result<()> {
    platform::set_tcp_keepalive(raw.fileno()?, TCP_IDLE, TCP_INTERVAL, TCP_PROBES)
}

/// Idle connections kept per manager per process.
const POOL_KEEP: usize = 16;
/// Forgotten managers remembered per process (see `ConnPool::forgotten`); older ones are
/// still caught by the hang-up check.
const FORGOTTEN_KEEP: usize = 64;

/// One method call.
#[derive(Serialize, Deserialize)]
pub(crate) struct Request<'a> {
    pub(crate) obj: ObjectId,
    pub(crate) method: &'a str,
    pub(crate) args: &'a [u8],
}

/// A method's failure as it crosses the wire.
#[derive(Serialize, Deserialize, Debug)]
pub(crate) enum RemoteError {
    Timeout,
    Empty,
    Full,
    BrokenBarrier,
    Index(String),
    Other(String),
}

impl From<Error> for RemoteError {
    fn from(e: Error) -> Self {
        match e {
            Error::Timeout => RemoteError::Timeout,
            Error::Empty => RemoteError::Empty,
            Error::Full => RemoteError::Full,
            Error::BrokenBarrier => RemoteError::BrokenBarrier,
            Error::Remote(m) => RemoteError::Other(m),
            other => RemoteError::Other(other.to_string()),
        }
    }
}

impl From<RemoteError> for Error {
    fn from(e: RemoteError) -> Self {
        match e {
            RemoteError::Timeout => Error::Timeout,
            RemoteError::Empty => Error::Empty,
            RemoteError::Full => Error::Full,
            RemoteError::BrokenBarrier => Error::BrokenBarrier,
            RemoteError::Index(m) => Error::InvalidArgument(m),
            RemoteError::Other(m) => Error::Remote(m),
        }
    }
}

pub(crate) type Reply = std::result::Result<Vec<u8>, RemoteError>;

/// A type whose values a manager can hold for its clients (Python's `BaseManager.register`).
///
/// The server calls [`call`](Self::call) with the method name and the `serde`-encoded
/// arguments the client sent; decode them with [`args`] and encode the result with [`reply`].
/// Calls on one object are serialized (the object sits behind a mutex). Register the type with
/// [`Registry::register`], make objects with [`Manager::create`] and call them through
/// [`Proxy::call`] (or a typed wrapper of your own around a [`Proxy`]).
///
/// ```
/// use multiproc::managers::{Manager, Registry, SharedObject, args, reply};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Counter {
///     n: i64,
/// }
/// impl SharedObject for Counter {
///     fn call(&mut self, method: &str, a: &[u8]) -> multiproc::Result<Vec<u8>> {
///         match method {
///             "add" => {
///                 self.n += args::<i64>(a)?;
///                 reply(&self.n)
///             }
///             _ => Err(multiproc::Error::Remote(format!("no method {method}"))),
///         }
///     }
/// }
/// fn types(r: &mut Registry) {
///     r.register::<Counter>("Counter");
/// }
/// let m = Manager::start_with(types).unwrap();
/// let c = m.create("Counter", &Counter { n: 10 }).unwrap();
/// assert_eq!(c.call::<_, i64>("add", &5).unwrap(), 15);
/// ```
pub trait SharedObject: Send + 'static {
    /// Runs `method` with the encoded arguments `args`; returns the encoded result.
    fn call(&mut self, method: &str, args: &[u8]) -> Result<Vec<u8>>;
}

/// Decodes a [`SharedObject`] method's arguments.
pub fn args<A: DeserializeOwned>(bytes: &[u8]) -> Result<A> {
    postcard::from_bytes(bytes).map_err(|e| Error::Decode(e.to_string()))
}

/// Encodes a [`SharedObject`] method's result.
pub fn reply<R: Serialize + ?Sized>(r: &R) -> Result<Vec<u8>> {
    postcard::to_stdvec(r).map_err(|e| Error::Encode(e.to_string()))
}

type Factory = fn(&[u8]) -> Result<Box<dyn SharedObject>>;

/// The user types a manager's server can make (see [`SharedObject`]).
#[derive(Default)]
pub struct Registry {
    types: HashMap<String, Factory>,
}

impl Registry {
    /// Registers `T` under `name`. [`Manager::create`] then sends an initial `T` value, which
    /// becomes the object in the server.
    pub fn register<T: SharedObject + DeserializeOwned>(&mut self, name: &str) -> &mut Self {
        fn make<T: SharedObject + DeserializeOwned>(b: &[u8]) -> Result<Box<dyn SharedObject>> {
            Ok(Box::new(args::<T>(b)?))
        }
        self.types.insert(name.to_string(), make::<T>);
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Client side: a per-process pool of authenticated connections, per manager
// ---------------------------------------------------------------------------------------------

/// Where a manager is and how to get in.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct Endpoint {
    pub(crate) address: Address,
    pub(crate) authkey: Vec<u8>,
}

/// A pooled connection to a manager, with its fast lane when it has one (Unix sockets).
pub(crate) struct Conn {
    c: Connection<()>,
    lane: Option<lane::Lane>,
    out: Vec<u8>,
    /// The descriptor number this connection listed in [`LIVE`] (managers never close a
    /// connection's descriptor before dropping it, so the number stays this socket's).
    live: Option<RawFd>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(fd) = self.live {
            let mut l = live();
            if let Some(i) = l.iter().position(|&f| f == fd) {
                l.swap_remove(i);
            }
        }
    }
}

impl Conn {
    /// Connects and authenticates; over a Unix socket, also asks for a fast lane (a server
    /// that cannot make one says so, and the connection carries on over the socket).
    fn open(ep: &Endpoint) -> Result<Conn> {
        let mut c = connection::Client::connect::<()>(&ep.address, &ep.authkey)?;
        c.set_spin(CLIENT_SPIN);
        let fd = c.raw_mut().raw_fd();
        if let Some(fd) = fd {
            live().push(fd);
        }
        let mut conn = Conn {
            c,
            lane: None,
            out: Vec::new(),
            live: fd,
        };
        if matches!(ep.address, Address::Tcp(_)) {
            // Without keepalive the connection still works; it only loses the bound on how
            // long a vanished peer goes unnoticed. Not worth failing the call over.
            if let Err(e) = tcp_keepalive(conn.c.raw_mut()) {
                tracing::warn!(
                    "manager: no keepalive on the TCP connection to {}: {e}",
                    ep.address
                );
            }
        } else {
            conn.send(0, "lane", &[])?;
            let raw = conn.c.raw_mut();
            let lane = raw.recv_with(None, |b, fds| {
                let rep =
                    postcard::from_bytes::<Reply>(b).map_err(|e| Error::Decode(e.to_string()))?;
                match (rep, fds.as_slice()) {
                    (Ok(_), [fd]) => lane::Lane::open(fd.as_fd()).map(Some),
                    (Ok(_), _) => Err(Error::MalformedFrame(
                        "a manager's lane reply without its descriptor".into(),
                    )),
                    (Err(_), _) => Ok(None),
                }
            })?;
            conn.lane = lane;
        }
        Ok(conn)
    }

    /// Whether the server hung up (or broke protocol): an idle connection's socket has
    /// nothing to read until its next request, so a readable one is at its end.
    fn hung_up(&mut self) -> bool {
        match self.c.raw_mut().fileno() {
            Ok(fd) => platform::poll_read(fd, Some(Duration::ZERO)).unwrap_or(true),
            Err(_) => true,
        }
    }

    /// The connection's socket (for tests).
    #[cfg(test)]
    pub(crate) fn fileno(&mut self) -> Result<std::os::fd::BorrowedFd<'_>> {
        self.c.raw_mut().fileno()
    }

    /// Whether the connection has a fast lane.
    #[cfg(test)]
    pub(crate) fn has_lane(&self) -> bool {
        self.lane.is_some()
    }

    fn send(&mut self, obj: ObjectId, method: &str, args: &[u8]) -> Result<()> {
        let req = Request { obj, method, args };
        let raw = self.c.raw_mut();
        match &mut self.lane {
            Some(l) => {
                self.out.clear();
                postcard::to_io(&req, &mut self.out).map_err(|e| Error::Encode(e.to_string()))?;
                l.send(raw, &self.out)
            }
            None => raw.send_with(|buf| {
                postcard::to_io(&req, &mut *buf).map_err(|e| Error::Encode(e.to_string()))?;
                Ok(Vec::new())
            }),
        }
    }

    /// Calls `method` on object `obj`: the method's encoded result, or its error. An `Err`
    /// of the outer result is a transport failure: drop the connection then.
    pub(crate) fn call(
        &mut self,
        obj: ObjectId,
        method: &str,
        args: &[u8],
    ) -> Result<std::result::Result<Vec<u8>, RemoteError>> {
        self.send(obj, method, args)?;
        let decode =
            |b: &[u8]| postcard::from_bytes::<Reply>(b).map_err(|e| Error::Decode(e.to_string()));
        let raw = self.c.raw_mut();
        match &mut self.lane {
            Some(l) => l.recv(raw, decode),
            None => raw.recv_with(None, |b, _| decode(b)),
        }
    }
}

struct ConnPool {
    /// The process the pooled connections belong to: a forked child must not share its
    /// parent's sockets, so it starts an empty pool.
    pid: u32,
    idle: HashMap<Endpoint, Vec<Conn>>,
    /// Managers this process saw go away ([`forget_endpoint`]), most recent last: connections
    /// to them that other threads still hold are dropped when they come back, not pooled.
    forgotten: VecDeque<Endpoint>,
}

impl ConnPool {
    /// Drops (returns, to drop outside the lock) every idle connection whose server hung up:
    /// shut down, or killed from outside without anyone forgetting its endpoint.
    fn sweep(&mut self) -> Vec<Conn> {
        let n = self.idle.values().map(Vec::len).sum::<usize>();
        let dead: Vec<bool> = {
            let fds: Vec<_> = self
                .idle
                .values_mut()
                .flat_map(|v| v.iter_mut())
                .filter_map(|c| c.c.raw_mut().fileno().ok())
                .map(|fd| (fd, platform::Interest::Read))
                .collect();
            if fds.len() != n {
                // A connection without a descriptor: cannot happen for a pooled one; give up
                // on sweeping rather than misattribute the flags.
                return Vec::new();
            }
            match platform::poll(&fds, Some(Duration::ZERO)) {
                Ok(f) => f,
                Err(_) => return Vec::new(),
            }
        };
        let mut out = Vec::new();
        let mut i = 0;
        for v in self.idle.values_mut() {
            let mut keep = Vec::with_capacity(v.len());
            for c in v.drain(..) {
                if dead[i] {
                    out.push(c);
                } else {
                    keep.push(c);
                }
                i += 1;
            }
            *v = keep;
        }
        self.idle.retain(|_, v| !v.is_empty());
        out
    }
}

static POOL: Mutex<Option<ConnPool>> = Mutex::new(None);

/// Descriptors of this process's open manager connections, wherever they are (pooled, cached
/// by a thread, held by a lock guard or a call in progress): see [`after_fork_in_child`].
static LIVE: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

fn live() -> MutexGuard<'static, Vec<RawFd>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The connection pool's and the live list's locks, held across a `fork` (after the process
/// registry's): the child then finds both consistent even if another thread was using them.
pub(crate) struct ForkLock(
    MutexGuard<'static, Option<ConnPool>>,
    MutexGuard<'static, Vec<RawFd>>,
);

pub(crate) fn lock_for_fork() -> ForkLock {
    let pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    ForkLock(pool, live())
}

/// In a freshly forked child: its copies of the parent's manager connections are put out of
/// use at once, instead of at its first manager call. While a copy of a socket stays open its
/// server cannot see the parent's end of the stream, so a manager lock the parent held (its
/// connection sits in the parent's guard, which the child never drops) would outlive the
/// parent for as long as the child lives. Each such descriptor is replaced in place by
/// `/dev/null` (the server sees the socket closed once the parent's copy goes too), so the
/// `Conn` values the child inherited still own a valid descriptor and drop cleanly.
pub(crate) fn after_fork_in_child(g: ForkLock) {
    let ForkLock(mut pool, live) = g;
    platform::cover_with_dev_null(&live);
    drop(live);
    let inherited = pool.take();
    drop(pool);
    drop(inherited);
    let recent = RECENT.try_with(|r| r.borrow_mut().take()).ok().flatten();
    drop(recent);
}

/// Runs `f` on this process's pool (made empty if it is missing or inherited through fork).
fn with_pool<R>(pid: u32, f: impl FnOnce(&mut ConnPool) -> R) -> R {
    let mut g = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let p = g.get_or_insert_with(|| ConnPool {
        pid,
        idle: HashMap::new(),
        forgotten: VecDeque::new(),
    });
    if p.pid != pid {
        // Inherited through fork: these sockets are the parent's too, so using them would
        // mix two processes' requests. Closing our copies (below, after the lock) is harmless
        // to the parent.
        let old = std::mem::take(&mut p.idle);
        p.forgotten.clear();
        p.pid = pid;
        let r = f(p);
        drop(g);
        drop(old);
        return r;
    }
    f(p)
}

/// Each thread's most recently used connection, kept out of the shared pool: a thread calling
/// one manager in a loop takes and returns it with no lock, no hashing and no allocation.
struct Recent {
    pid: u32,
    ep: Endpoint,
    conn: Option<Conn>,
}

thread_local! {
    static RECENT: RefCell<Option<Recent>> = const { RefCell::new(None) };
}

pub(crate) fn take_conn(ep: &Endpoint) -> Result<Conn> {
    let pid = platform::cached_pid();
    // `try_with`: from a thread-local destructor (a `Manager` or a lock guard kept in a
    // thread-local) this thread's slot may be gone already; use the pool then.
    let recent = RECENT
        .try_with(|r| {
            let mut r = r.borrow_mut();
            match r.as_mut() {
                Some(x) if x.pid == pid && x.ep == *ep => x.conn.take(),
                _ => None,
            }
        })
        .ok()
        .flatten();
    if let Some(c) = recent {
        return Ok(c);
    }
    let pooled = with_pool(pid, |p| {
        let v = p.idle.get_mut(ep)?;
        let c = v.pop();
        if v.is_empty() {
            p.idle.remove(ep);
        }
        c
    });
    if let Some(c) = pooled {
        return Ok(c);
    }
    let c = Conn::open(ep)?;
    // A server answers there (again: a manager served anew at the same address), so
    // connections to it may be pooled once more.
    with_pool(pid, |p| {
        if !p.forgotten.is_empty() {
            p.forgotten.retain(|e| e != ep);
        }
    });
    Ok(c)
}

/// Drops this process's idle connections to `ep` (its server is going away): the pool's and
/// this thread's recent one. Other threads' recent ones fail on their next use, or are
/// dropped when another connection takes their place (`ep` is remembered as forgotten, and a
/// connection whose server hung up is never pooled).
fn forget_endpoint(ep: &Endpoint) {
    let pid = platform::cached_pid();
    let mine = RECENT
        .try_with(|r| {
            let mut r = r.borrow_mut();
            if r.as_ref().is_some_and(|x| x.ep == *ep || x.pid != pid) {
                r.take()
            } else {
                None
            }
        })
        .ok()
        .flatten();
    drop(mine);
    let idle = with_pool(pid, |p| {
        p.forgotten.retain(|e| e != ep);
        if p.forgotten.len() >= FORGOTTEN_KEEP {
            p.forgotten.pop_front();
        }
        p.forgotten.push_back(ep.clone());
        p.idle.remove(ep)
    });
    drop(idle);
}

pub(crate) fn give_back(ep: &Endpoint, c: Conn) {
    let pid = platform::cached_pid();
    // Into this thread's slot if it is free (or holds another manager's or process's
    // connection, which moves to the pool or is dropped), else into the pool. If the slot is
    // gone (called from a thread-local destructor), into the pool.
    let mut c = Some(c);
    let displaced = RECENT
        .try_with(|r| {
            let mut r = r.borrow_mut();
            match r.as_mut() {
                Some(x) if x.pid == pid && x.ep == *ep => {
                    if x.conn.is_none() {
                        x.conn = c.take();
                    }
                    None
                }
                _ => {
                    let old = r.replace(Recent {
                        pid,
                        ep: ep.clone(),
                        conn: c.take(),
                    });
                    match old {
                        Some(Recent {
                            pid: p,
                            ep: e,
                            conn: Some(o),
                        }) if p == pid => Some((e, o)),
                        // Nothing, or another process's (inherited through fork): dropped.
                        _ => None,
                    }
                }
            }
        })
        .ok()
        .flatten();
    if let Some((e, o)) = displaced {
        pool_put(pid, &e, o);
    }
    if let Some(c) = c {
        pool_put(pid, ep, c);
    }
}

/// Puts an idle connection into the pool, unless its manager went away: forgotten by this
/// process, or hung up (the socket of an idle connection is readable only at its end).
fn pool_put(pid: u32, ep: &Endpoint, mut c: Conn) {
    if c.hung_up() {
        // A manager went away: the pool may hold connections to it too (pooled while it was
        // still up: a killed process closes its sockets only once its last thread has
        // exited), or to others that died since. Without this sweep they would stay until a
        // live connection to a manager the pool has none for comes back.
        let swept = with_pool(pid, ConnPool::sweep);
        drop((c, swept));
        return;
    }
    let dropped = with_pool(pid, |p| {
        if p.forgotten.contains(ep) {
            return (Some(c), Vec::new());
        }
        // A manager we have not pooled for yet: a good moment to drop idle connections to
        // managers that died since (killed from outside, never forgotten here).
        let swept = if p.idle.contains_key(ep) {
            Vec::new()
        } else {
            p.sweep()
        };
        let v = p.idle.entry(ep.clone()).or_default();
        if v.len() < POOL_KEEP {
            v.push(c);
            (None, swept)
        } else {
            (Some(c), swept)
        }
    });
    drop(dropped);
}

/// Calls `method` on object `obj` of the manager at `ep`.
pub(crate) fn call_raw(ep: &Endpoint, obj: ObjectId, method: &str, args: &[u8]) -> Result<Vec<u8>> {
    let mut c = take_conn(ep)?;
    // A transport failure drops the connection instead of pooling it.
    let rep = c.call(obj, method, args)?;
    give_back(ep, c);
    rep.map_err(Error::from)
}

/// Typed [`call_raw`].
pub(crate) fn call<A: Serialize + ?Sized, R: DeserializeOwned>(
    ep: &Endpoint,
    obj: ObjectId,
    method: &str,
    a: &A,
) -> Result<R> {
    let bytes = call_raw(ep, obj, method, &reply(a)?)?;
    args(&bytes)
}

// ---------------------------------------------------------------------------------------------
// Manager
// ---------------------------------------------------------------------------------------------

/// A manager: a server holding shared objects, and the constructors of their proxies
/// (Python's `multiprocessing.Manager()` / `BaseManager`). See the [module docs](self).
///
/// Dropping a manager made by [`start`](Self::start) shuts its server down (as Python's
/// `with Manager() as m:` does); one made by [`connect`](Self::connect) only disconnects.
pub struct Manager {
    ep: Endpoint,
    server: Mutex<Option<Process>>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("address", &self.ep.address)
            .field("server_pid", &self.server_pid())
            .finish()
    }
}

fn no_types(_: &mut Registry) {}

/// The manager server process's entry.
fn server_main<F: Fn(&mut Registry) + Copy + Send + 'static>(
    (address, authkey, mut ready): (Address, Vec<u8>, Connection<String>),
) {
    let mut reg = Registry::default();
    crate::function::conjure::<F>()(&mut reg);
    let listener = match Listener::bind(&address, &authkey) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(&format!("cannot listen on {address}: {e}"));
            return;
        }
    };
    let _ = ready.send(&String::new());
    drop(ready);
    let s = server::Server::new(reg, address);
    let _ = s.serve(listener, true);
}

impl Manager {
    /// Starts a manager server process (default start method) on a private address with a
    /// random key, and connects to it.
    pub fn start() -> Result<Manager> {
        Self::start_in(Context::default(), no_types)
    }

    /// [`start`](Self::start) with user types: `types` (a `fn` item or a closure that captures
    /// nothing) registers them in the server process.
    pub fn start_with<F: Fn(&mut Registry) + Copy + Send + Sync + 'static>(
        types: F,
    ) -> Result<Manager> {
        Self::start_in(Context::default(), types)
    }

    /// [`start_with`](Self::start_with) using a given context (start method).
    pub fn start_in<F: Fn(&mut Registry) + Copy + Send + Sync + 'static>(
        ctx: Context,
        types: F,
    ) -> Result<Manager> {
        let _ = types;
        let address = Address::unique_abstract()?;
        let mut authkey = vec![0u8; 32];
        getrandom::fill(&mut authkey)
            .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?;
        let (mut ready, child_end) = crate::Pipe::<String>::new(true)?;
        let mut p = Process::new(
            server_main::<F>,
            (address.clone(), authkey.clone(), child_end),
        )
        .name("multiproc-manager")
        .daemon(true)
        .context(ctx);
        p.start()?;
        let objs: [&dyn Waitable; 2] = [&ready, &p];
        let up = connection::wait(&objs, Some(Duration::from_secs(60)))?;
        if !up.contains(&0) {
            let _ = p.kill();
            let _ = p.join_timeout(Duration::from_secs(5));
            return Err(Error::state("the manager process did not start"));
        }
        let msg = ready.recv()?;
        if !msg.is_empty() {
            let _ = p.join_timeout(Duration::from_secs(5));
            return Err(Error::state(msg));
        }
        Ok(Manager {
            ep: Endpoint { address, authkey },
            server: Mutex::new(Some(p)),
        })
    }

    /// Connects to a manager served elsewhere ([`serve`](Self::serve)), checking the key.
    ///
    /// Errors: [`Error::AuthenticationError`] for a wrong key, [`Error::Io`] if nothing
    /// listens there.
    pub fn connect(addr: impl ToAddress, authkey: &[u8]) -> Result<Manager> {
        let ep = Endpoint {
            address: addr.to_address()?,
            authkey: authkey.to_vec(),
        };
        call::<_, ()>(&ep, 0, "ping", &())?;
        Ok(Manager {
            ep,
            server: Mutex::new(None),
        })
    }

    /// Serves a manager in the calling thread until a client calls
    /// [`shutdown`](Self::shutdown) (Python's `get_server().serve_forever()`).
    pub fn serve(addr: impl ToAddress, authkey: &[u8]) -> Result<()> {
        Self::serve_with(addr, authkey, no_types)
    }

    /// [`serve`](Self::serve) with user types.
    pub fn serve_with(
        addr: impl ToAddress,
        authkey: &[u8],
        types: impl FnOnce(&mut Registry),
    ) -> Result<()> {
        Self::serve_listener(Listener::bind(addr, authkey)?, types)
    }

    /// Serves on a listener already bound (for instance to learn a TCP port picked by the
    /// system before serving).
    pub fn serve_listener(listener: Listener, types: impl FnOnce(&mut Registry)) -> Result<()> {
        let mut reg = Registry::default();
        types(&mut reg);
        let s = server::Server::new(reg, listener.address().clone());
        s.serve(listener, false)
    }

    /// The server's address.
    pub fn address(&self) -> &Address {
        &self.ep.address
    }

    /// The key clients authenticate with (random for [`start`](Self::start)).
    pub fn authkey(&self) -> &[u8] {
        &self.ep.authkey
    }

    fn make(&self, typename: &str, args: Vec<u8>, name: Option<&str>) -> Result<Proxy> {
        let c = server::Create {
            typename: typename.to_string(),
            args,
            name: name.map(str::to_string),
        };
        let id: ObjectId = call(&self.ep, 0, "create", &c)?;
        Ok(Proxy::new(self.ep.clone(), id))
    }

    /// A shared dictionary (Python's `Manager().dict()`).
    pub fn dict<K, V>(&self) -> Result<DictProxy<K, V>> {
        self.named_or_not(None).dict()
    }

    /// A shared list (Python's `Manager().list()`).
    pub fn list<T>(&self) -> Result<ListProxy<T>> {
        self.named_or_not(None).list()
    }

    /// A shared namespace of named attributes (Python's `Manager().Namespace()`).
    pub fn namespace(&self) -> Result<NamespaceProxy> {
        self.named_or_not(None).namespace()
    }

    /// A shared FIFO queue, bounded to `maxsize` items (0: unbounded), with `task_done`/`join`
    /// (Python's `Manager().Queue()`, which is a `JoinableQueue`).
    pub fn queue<T>(&self, maxsize: usize) -> Result<QueueProxy<T>> {
        self.named_or_not(None).queue(maxsize)
    }

    /// A shared lock (Python's `Manager().Lock()`).
    pub fn lock(&self) -> Result<LockProxy> {
        self.named_or_not(None).lock()
    }

    /// A shared value (Python's `Manager().Value()`).
    pub fn value<T: Serialize>(&self, initial: &T) -> Result<ValueProxy<T>> {
        self.named_or_not(None).value(initial)
    }

    /// A shared event (Python's `Manager().Event()`).
    pub fn event(&self) -> Result<EventProxy> {
        self.named_or_not(None).event()
    }

    /// A shared barrier for `parties` participants (Python's `Manager().Barrier()`).
    pub fn barrier(&self, parties: usize) -> Result<BarrierProxy> {
        self.named_or_not(None).barrier(parties)
    }

    /// An object of a registered user type, starting as `initial` (see [`SharedObject`]).
    pub fn create<T: Serialize>(&self, typename: &str, initial: &T) -> Result<Proxy> {
        self.make(typename, reply(initial)?, None)
    }

    /// Constructors that get or create the object registered under `name`, so that programs
    /// that only share an address and a key find the same objects (Python's remote-manager
    /// pattern, `register('get_queue', ...)`).
    ///
    /// ```
    /// use multiproc::managers::Manager;
    /// let m = Manager::start().unwrap();
    /// let q = m.named("jobs").queue::<String>(0).unwrap();
    /// q.put(&"a".to_string()).unwrap();
    /// let same = m.named("jobs").queue::<String>(0).unwrap();
    /// assert_eq!(same.get().unwrap(), "a");
    /// ```
    pub fn named<'a>(&'a self, name: &'a str) -> Named<'a> {
        self.named_or_not(Some(name))
    }

    fn named_or_not<'a>(&'a self, name: Option<&'a str>) -> Named<'a> {
        Named { m: self, name }
    }

    /// Frees an object in the server. Its proxies fail afterwards.
    pub fn release(&self, proxy: &Proxy) -> Result<()> {
        call(&self.ep, 0, "release", &proxy.id())
    }

    /// Stops the server. Proxies fail afterwards ([`Error::Eof`] or [`Error::Io`]); clients
    /// blocked in a call get an error at once.
    pub fn shutdown(&mut self) -> Result<()> {
        let r = call::<_, ()>(&self.ep, 0, "shutdown", &());
        forget_endpoint(&self.ep);
        let server = self
            .server
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(p) = server {
            if p.join_timeout(Duration::from_secs(5))?.is_none() {
                let _ = p.kill();
                p.join()?;
            }
            return Ok(());
        }
        match r {
            // The server may close our connection before the reply goes out.
            Err(Error::Eof) => Ok(()),
            r => r,
        }
    }

    /// The pid of the manager's server process, if this handle started it.
    pub fn server_pid(&self) -> Option<u32> {
        self.server
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(Process::pid)
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        if self.server.get_mut().map(|s| s.is_some()).unwrap_or(false) {
            let _ = self.shutdown();
        }
    }
}

/// Get-or-create constructors for objects shared under a name (see [`Manager::named`]).
pub struct Named<'a> {
    m: &'a Manager,
    name: Option<&'a str>,
}

impl Named<'_> {
    fn make(&self, typename: &str, args: Vec<u8>) -> Result<Proxy> {
        self.m.make(typename, args, self.name)
    }

    /// See [`Manager::dict`].
    pub fn dict<K, V>(&self) -> Result<DictProxy<K, V>> {
        Ok(DictProxy::from_proxy(self.make("dict", Vec::new())?))
    }

    /// See [`Manager::list`].
    pub fn list<T>(&self) -> Result<ListProxy<T>> {
        Ok(ListProxy::from_proxy(
            self.make("list", reply(&Vec::<Vec<u8>>::new())?)?,
        ))
    }

    /// See [`Manager::namespace`].
    pub fn namespace(&self) -> Result<NamespaceProxy> {
        Ok(NamespaceProxy::from_proxy(
            self.make("namespace", Vec::new())?,
        ))
    }

    /// See [`Manager::queue`].
    pub fn queue<T>(&self, maxsize: usize) -> Result<QueueProxy<T>> {
        Ok(QueueProxy::from_proxy(
            self.make("queue", reply(&maxsize)?)?,
        ))
    }

    /// See [`Manager::lock`].
    pub fn lock(&self) -> Result<LockProxy> {
        Ok(LockProxy::from_proxy(self.make("lock", Vec::new())?))
    }

    /// See [`Manager::value`].
    pub fn value<T: Serialize>(&self, initial: &T) -> Result<ValueProxy<T>> {
        Ok(ValueProxy::from_proxy(
            self.make("value", reply(&reply(initial)?)?)?,
        ))
    }

    /// See [`Manager::event`].
    pub fn event(&self) -> Result<EventProxy> {
        Ok(EventProxy::from_proxy(self.make("event", Vec::new())?))
    }

    /// See [`Manager::barrier`].
    pub fn barrier(&self, parties: usize) -> Result<BarrierProxy> {
        Ok(BarrierProxy::from_proxy(
            self.make("barrier", reply(&parties)?)?,
        ))
    }

    /// See [`Manager::create`].
    pub fn create<T: Serialize>(&self, typename: &str, initial: &T) -> Result<Proxy> {
        self.make(typename, reply(initial)?)
    }
}

#[allow(unused)]
fn _assert_send_sync() {
    fn ok<T: Send + Sync>() {}
    ok::<Manager>();
    ok::<DictProxy<String, String>>();
}

impl Context {
    /// A [`Manager`] whose server process is started with this context's method (Python's
    /// `ctx.Manager()`).
    ///
    /// ```
    /// use multiproc::{StartMethod, get_context};
    /// let m = get_context(StartMethod::Spawn).manager().unwrap();
    /// let v = m.value(&7u8).unwrap();
    /// assert_eq!(v.get().unwrap(), 7);
    /// ```
    pub fn manager(&self) -> Result<Manager> {
        Manager::start_in(*self, no_types)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(addr: &str) -> (Endpoint, std::thread::JoinHandle<Result<()>>) {
        let l = Listener::bind(addr, b"key").unwrap();
        let ep = Endpoint {
            address: l.address().clone(),
            authkey: b"key".to_vec(),
        };
        (
            ep,
            std::thread::spawn(move || Manager::serve_listener(l, |_| {})),
        )
    }

    fn stop(ep: &Endpoint, t: std::thread::JoinHandle<Result<()>>) {
        let _ = call::<_, ()>(ep, 0, "shutdown", &());
        forget_endpoint(ep);
        t.join().unwrap().unwrap();
    }

    #[test]
    fn tcp_connections_have_keepalive_and_no_lane() {
        let (ep, t) = serve("127.0.0.1:0");
        let mut c = Conn::open(&ep).unwrap();
        assert!(!c.has_lane());
        let (on, idle, intvl, cnt, user_ms) = platform::tcp_keepalive(c.fileno().unwrap()).unwrap();
        assert!(on);
        assert_eq!(
            (idle as u64, intvl as u64, cnt as u32),
            (TCP_IDLE.as_secs(), TCP_INTERVAL.as_secs(), TCP_PROBES)
        );
        assert_eq!(
            user_ms as u128,
            (TCP_IDLE + TCP_INTERVAL * TCP_PROBES).as_millis()
        );
        assert_eq!(
            c.call(0, "ping", &reply(&()).unwrap()).unwrap().unwrap(),
            reply(&()).unwrap()
        );
        drop(c);
        stop(&ep, t);
    }

    #[test]
    fn a_hung_up_connection_coming_back_sweeps_the_pool() {
        // A connection pooled while its manager was up, and the manager gone since without
        // this process forgetting it (as one killed from outside): the next connection found
        // hung up on its way back drops it, even though no live connection comes back after.
        let a = Address::unique_abstract().unwrap().to_string();
        let (ep, t) = serve(&a);
        let pid = platform::cached_pid();
        let pooled = |ep: &Endpoint| with_pool(pid, |p| p.idle.get(ep).map_or(0, Vec::len));
        let mut back_later = Conn::open(&ep).unwrap();
        pool_put(pid, &ep, Conn::open(&ep).unwrap());
        assert_eq!(pooled(&ep), 1);
        // `serve` shuts every connection's socket down before it returns.
        let mut c = Conn::open(&ep).unwrap();
        let _ = c.call(0, "shutdown", &reply(&()).unwrap());
        t.join().unwrap().unwrap();
        assert!(back_later.hung_up());
        pool_put(pid, &ep, back_later);
        assert_eq!(pooled(&ep), 0);
    }

    #[test]
    fn unix_connections_get_a_lane() {
        let a = Address::unique_abstract().unwrap().to_string();
        let (ep, t) = serve(&a);
        let mut c = Conn::open(&ep).unwrap();
        assert!(c.has_lane());
        for _ in 0..100 {
            assert!(c.call(0, "ping", &reply(&()).unwrap()).unwrap().is_ok());
        }
        drop(c);
        stop(&ep, t);
    }
}
