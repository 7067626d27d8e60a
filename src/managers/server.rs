//! The manager's server: accepts authenticated connections, one thread each, and runs method
//! calls on the objects it holds. See `README.md` beside this file for the invariants.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::lane::Lane;
use super::{ObjectId, Registry, RemoteError, Reply, Request, SERVER_SPIN, SharedObject, args};
use crate::connection::{Address, Listener, RawConn, auth};
use crate::error::{Error, Result};
use crate::platform;

/// How often a server thread blocked in a waiting call (queue get, lock acquire, event wait...)
/// checks whether its client is still there.
const PEER_CHECK: Duration = Duration::from_millis(50);

/// What a method call can see of the connection it came on.
pub(crate) struct CallCtx<'a> {
    pub(crate) conn_id: u64,
    fd: BorrowedFd<'a>,
}

impl CallCtx<'_> {
    /// True when the client hung up (or broke protocol by sending while waiting for a reply):
    /// a waiting call gives up instead of consuming something nobody will receive.
    fn peer_gone(&self) -> bool {
        platform::poll_read(self.fd, Some(Duration::ZERO)).unwrap_or(true)
    }

    /// Waits on `cv` until `done(state)` or the deadline, checking the peer every
    /// [`PEER_CHECK`]. Returns the guard and whether `done` became true. A deadline already
    /// past checks `done` once without waiting (the non-blocking form of a call).
    fn wait_until<'g, S>(
        &self,
        cv: &Condvar,
        mut g: MutexGuard<'g, S>,
        deadline: Option<Instant>,
        mut done: impl FnMut(&mut S) -> bool,
    ) -> std::result::Result<(MutexGuard<'g, S>, bool), RemoteError> {
        loop {
            if done(&mut g) {
                return Ok((g, true));
            }
            let mut slice = PEER_CHECK;
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok((g, false));
                }
                slice = slice.min(left);
            }
            g = cv
                .wait_timeout(g, slice)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if self.peer_gone() {
                return Err(RemoteError::Other("client went away".into()));
            }
        }
    }
}

/// A server-side object: built-ins implement this directly, user types through
/// [`SharedObject`] behind a mutex.
pub(crate) trait Object: Send + Sync {
    fn call(
        &self,
        method: &str,
        args: &[u8],
        ctx: &CallCtx<'_>,
    ) -> std::result::Result<Vec<u8>, RemoteError>;

    /// The connection `conn_id` closed: release what it held (locks).
    fn disconnected(&self, _conn_id: u64) {}
}

fn reply<R: Serialize>(r: &R) -> std::result::Result<Vec<u8>, RemoteError> {
    super::reply(r).map_err(RemoteError::from)
}

fn a<A: DeserializeOwned>(b: &[u8]) -> std::result::Result<A, RemoteError> {
    args(b).map_err(RemoteError::from)
}

fn no_method(ty: &str, m: &str) -> RemoteError {
    RemoteError::Other(format!("{ty} has no method {m:?}"))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn deadline(t: Option<Duration>) -> Option<Instant> {
    t.map(|t| Instant::now() + t)
}

/// The deadline of a call that may block (`block`, with an optional timeout) or not.
fn wait_deadline(block: bool, t: Option<Duration>) -> Option<Instant> {
    if block {
        deadline(t)
    } else {
        Some(Instant::now())
    }
}

type Bytes = Vec<u8>;

// ---------------------------------------------------------------------------------------------
// Built-in objects. Values are stored as the client's serialized bytes: the server never needs
// the user's types, and dict keys compare by their serialized form.
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
pub(crate) struct Dict(Mutex<HashMap<Bytes, Bytes>>);

impl Object for Dict {
    fn call(&self, m: &str, b: &[u8], _: &CallCtx<'_>) -> std::result::Result<Bytes, RemoteError> {
        let mut d = lock(&self.0);
        match m {
            "set" => {
                let (k, v): (Bytes, Bytes) = a(b)?;
                d.insert(k, v);
                reply(&())
            }
            "get" => reply(&d.get(&a::<Bytes>(b)?)),
            "pop" => reply(&d.remove(&a::<Bytes>(b)?)),
            "contains" => reply(&d.contains_key(&a::<Bytes>(b)?)),
            "setdefault" => {
                let (k, v): (Bytes, Bytes) = a(b)?;
                reply(&d.entry(k).or_insert(v).clone())
            }
            "len" => reply(&d.len()),
            "keys" => reply(&d.keys().collect::<Vec<_>>()),
            "values" => reply(&d.values().collect::<Vec<_>>()),
            "items" => reply(&d.iter().collect::<Vec<_>>()),
            "update" => {
                let kv: Vec<(Bytes, Bytes)> = a(b)?;
                d.extend(kv);
                reply(&())
            }
            "clear" => {
                d.clear();
                reply(&())
            }
            _ => Err(no_method("dict", m)),
        }
    }
}

#[derive(Default)]
pub(crate) struct List(Mutex<Vec<Bytes>>);

fn index(len: usize, i: i64) -> std::result::Result<usize, RemoteError> {
    let j = if i < 0 { len as i64 + i } else { i };
    if j < 0 || j >= len as i64 {
        return Err(RemoteError::Index(format!(
            "list index {i} out of range for length {len}"
        )));
    }
    Ok(j as usize)
}

impl Object for List {
    fn call(&self, m: &str, b: &[u8], _: &CallCtx<'_>) -> std::result::Result<Bytes, RemoteError> {
        let mut l = lock(&self.0);
        match m {
            "append" => {
                l.push(a(b)?);
                reply(&())
            }
            "extend" => {
                l.extend(a::<Vec<Bytes>>(b)?);
                reply(&())
            }
            "get" => {
                let i = index(l.len(), a(b)?)?;
                reply(&l[i])
            }
            "set" => {
                let (i, v): (i64, Bytes) = a(b)?;
                let i = index(l.len(), i)?;
                l[i] = v;
                reply(&())
            }
            "insert" => {
                let (i, v): (i64, Bytes) = a(b)?;
                let n = l.len() as i64;
                let at = if i < 0 { (n + i).max(0) } else { i.min(n) };
                l.insert(at as usize, v);
                reply(&())
            }
            "pop" => {
                let i: Option<i64> = a(b)?;
                let i = index(l.len(), i.unwrap_or(-1))?;
                reply(&l.remove(i))
            }
            "remove" => {
                let v: Bytes = a(b)?;
                match l.iter().position(|x| *x == v) {
                    Some(i) => {
                        l.remove(i);
                        reply(&())
                    }
                    None => Err(RemoteError::Other("list.remove: value not in list".into())),
                }
            }
            "index" => {
                let v: Bytes = a(b)?;
                reply(&l.iter().position(|x| *x == v))
            }
            "count" => {
                let v: Bytes = a(b)?;
                reply(&l.iter().filter(|x| **x == v).count())
            }
            "len" => reply(&l.len()),
            "all" => reply(&*l),
            "clear" => {
                l.clear();
                reply(&())
            }
            _ => Err(no_method("list", m)),
        }
    }
}

#[derive(Default)]
pub(crate) struct Namespace(Mutex<HashMap<String, Bytes>>);

impl Object for Namespace {
    fn call(&self, m: &str, b: &[u8], _: &CallCtx<'_>) -> std::result::Result<Bytes, RemoteError> {
        let mut n = lock(&self.0);
        match m {
            "get" => reply(&n.get(&a::<String>(b)?)),
            "set" => {
                let (k, v): (String, Bytes) = a(b)?;
                n.insert(k, v);
                reply(&())
            }
            "del" => reply(&n.remove(&a::<String>(b)?).is_some()),
            "names" => {
                let mut k: Vec<&String> = n.keys().collect();
                k.sort();
                reply(&k)
            }
            _ => Err(no_method("namespace", m)),
        }
    }
}

pub(crate) struct Queue {
    maxsize: usize,
    state: Mutex<QState>,
    cv: Condvar,
}

#[derive(Default)]
struct QState {
    items: VecDeque<Bytes>,
    unfinished: u64,
}

impl Queue {
    pub(crate) fn new(maxsize: usize) -> Queue {
        Queue {
            maxsize,
            state: Mutex::new(QState::default()),
            cv: Condvar::new(),
        }
    }
}

impl Object for Queue {
    fn call(
        &self,
        m: &str,
        b: &[u8],
        ctx: &CallCtx<'_>,
    ) -> std::result::Result<Bytes, RemoteError> {
        let g = lock(&self.state);
        match m {
            "put" => {
                let (v, block, t): (Bytes, bool, Option<Duration>) = a(b)?;
                let max = self.maxsize;
                let full = |s: &mut QState| max == 0 || s.items.len() < max;
                let (mut g, ok) = ctx.wait_until(&self.cv, g, wait_deadline(block, t), full)?;
                if !ok {
                    return Err(RemoteError::Full);
                }
                g.items.push_back(v);
                g.unfinished += 1;
                self.cv.notify_all();
                reply(&())
            }
            "get" => {
                let (block, t): (bool, Option<Duration>) = a(b)?;
                let ready = |s: &mut QState| !s.items.is_empty();
                let (mut g, ok) = ctx.wait_until(&self.cv, g, wait_deadline(block, t), ready)?;
                if !ok {
                    return Err(RemoteError::Empty);
                }
                let v = g.items.pop_front().expect("not empty");
                self.cv.notify_all();
                reply(&v)
            }
            "qsize" => reply(&g.items.len()),
            "task_done" => {
                let mut g = g;
                if g.unfinished == 0 {
                    return Err(RemoteError::Other(
                        "task_done() called too many times".into(),
                    ));
                }
                g.unfinished -= 1;
                self.cv.notify_all();
                reply(&())
            }
            "join" => {
                let t: Option<Duration> = a(b)?;
                let (_g, ok) = ctx.wait_until(&self.cv, g, deadline(t), |s| s.unfinished == 0)?;
                if !ok {
                    return Err(RemoteError::Timeout);
                }
                reply(&())
            }
            "maxsize" => reply(&self.maxsize),
            _ => Err(no_method("queue", m)),
        }
    }
}

#[derive(Default)]
pub(crate) struct Lock {
    /// The connection that holds it, if locked.
    owner: Mutex<Option<u64>>,
    cv: Condvar,
}

impl Object for Lock {
    fn call(
        &self,
        m: &str,
        b: &[u8],
        ctx: &CallCtx<'_>,
    ) -> std::result::Result<Bytes, RemoteError> {
        let g = lock(&self.owner);
        match m {
            "acquire" => {
                let (block, t): (bool, Option<Duration>) = a(b)?;
                let (mut g, ok) =
                    ctx.wait_until(&self.cv, g, wait_deadline(block, t), |o| o.is_none())?;
                if ok {
                    *g = Some(ctx.conn_id);
                }
                reply(&ok)
            }
            "release" => {
                let mut g = g;
                if g.take().is_none() {
                    return Err(RemoteError::Other("release of an unlocked lock".into()));
                }
                self.cv.notify_one();
                reply(&())
            }
            "locked" => reply(&g.is_some()),
            _ => Err(no_method("lock", m)),
        }
    }

    fn disconnected(&self, conn_id: u64) {
        let mut g = lock(&self.owner);
        if *g == Some(conn_id) {
            // The holder's process died or dropped its connection while holding the lock: free
            // it instead of deadlocking everyone else.
            *g = None;
            self.cv.notify_one();
        }
    }
}

pub(crate) struct Value(Mutex<Bytes>);

impl Value {
    pub(crate) fn new(v: Bytes) -> Value {
        Value(Mutex::new(v))
    }
}

impl Object for Value {
    fn call(&self, m: &str, b: &[u8], _: &CallCtx<'_>) -> std::result::Result<Bytes, RemoteError> {
        let mut v = lock(&self.0);
        match m {
            "get" => reply(&*v),
            "set" => {
                *v = a(b)?;
                reply(&())
            }
            _ => Err(no_method("value", m)),
        }
    }
}

#[derive(Default)]
pub(crate) struct Event {
    flag: Mutex<bool>,
    cv: Condvar,
}

impl Object for Event {
    fn call(
        &self,
        m: &str,
        b: &[u8],
        ctx: &CallCtx<'_>,
    ) -> std::result::Result<Bytes, RemoteError> {
        let mut g = lock(&self.flag);
        match m {
            "set" => {
                *g = true;
                self.cv.notify_all();
                reply(&())
            }
            "clear" => {
                *g = false;
                reply(&())
            }
            "is_set" => reply(&*g),
            "wait" => {
                let t: Option<Duration> = a(b)?;
                let (_g, ok) = ctx.wait_until(&self.cv, g, deadline(t), |f| *f)?;
                reply(&ok)
            }
            _ => Err(no_method("event", m)),
        }
    }
}

pub(crate) struct Barrier {
    parties: usize,
    state: Mutex<BState>,
    cv: Condvar,
}

#[derive(Default)]
struct BState {
    waiting: usize,
    /// Bumped each time the barrier fills: waiters of the old generation pass.
    generation: u64,
    /// Bumped by `reset`: waiters from before it fail with a broken barrier.
    resets: u64,
    broken: bool,
}

impl Barrier {
    pub(crate) fn new(parties: usize) -> Barrier {
        Barrier {
            parties,
            state: Mutex::new(BState::default()),
            cv: Condvar::new(),
        }
    }
}

impl Object for Barrier {
    fn call(
        &self,
        m: &str,
        b: &[u8],
        ctx: &CallCtx<'_>,
    ) -> std::result::Result<Bytes, RemoteError> {
        let mut g = lock(&self.state);
        match m {
            "wait" => {
                let t: Option<Duration> = a(b)?;
                if g.broken {
                    return Err(RemoteError::BrokenBarrier);
                }
                let index = g.waiting;
                g.waiting += 1;
                if g.waiting == self.parties {
                    g.waiting = 0;
                    g.generation += 1;
                    self.cv.notify_all();
                    return reply(&index);
                }
                let gen_ = g.generation;
                let resets = g.resets;
                let r = ctx.wait_until(&self.cv, g, deadline(t), |s| {
                    s.generation != gen_ || s.broken || s.resets != resets
                });
                let (mut g, ok) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Our client left: the barrier can no longer fill.
                        let mut g = lock(&self.state);
                        if g.generation == gen_ && g.resets == resets {
                            g.broken = true;
                            self.cv.notify_all();
                        }
                        return Err(e);
                    }
                };
                if g.resets != resets {
                    return Err(RemoteError::BrokenBarrier);
                }
                if g.generation != gen_ {
                    return reply(&index);
                }
                if !ok {
                    // A timeout breaks the barrier, as in Python.
                    g.broken = true;
                    self.cv.notify_all();
                }
                Err(RemoteError::BrokenBarrier)
            }
            "abort" => {
                g.broken = true;
                self.cv.notify_all();
                reply(&())
            }
            "reset" => {
                g.resets += 1;
                g.waiting = 0;
                g.broken = false;
                self.cv.notify_all();
                reply(&())
            }
            "parties" => reply(&self.parties),
            "n_waiting" => reply(&g.waiting),
            "broken" => reply(&g.broken),
            _ => Err(no_method("barrier", m)),
        }
    }
}

/// A user type from the [`Registry`], behind a mutex.
pub(crate) struct UserObject(pub(crate) Mutex<Box<dyn SharedObject>>);

impl Object for UserObject {
    fn call(&self, m: &str, b: &[u8], _: &CallCtx<'_>) -> std::result::Result<Bytes, RemoteError> {
        // A panicking user method fails that call, not the server (the object stays usable:
        // its mutex's poison is ignored, as the method left it).
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| lock(&self.0).call(m, b)));
        match r {
            Ok(r) => r.map_err(RemoteError::from),
            Err(p) => {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                Err(RemoteError::Other(format!("method {m:?} panicked: {msg}")))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------

/// Arguments of `create` (object 0).
#[derive(Serialize, Deserialize)]
pub(crate) struct Create {
    pub(crate) typename: String,
    pub(crate) args: Bytes,
    /// Get-or-create under this name (for programs that share objects by name).
    pub(crate) name: Option<String>,
}

pub(crate) struct Server {
    registry: Registry,
    objects: RwLock<HashMap<ObjectId, Arc<dyn Object>>>,
    names: Mutex<HashMap<String, (ObjectId, String)>>,
    next_id: AtomicU64,
    next_conn: AtomicU64,
    stopping: AtomicBool,
    /// Live connections (duplicates of their descriptors), to shut them down at the end.
    live: Mutex<HashMap<u64, OwnedFd>>,
    address: Address,
}

impl Server {
    pub(crate) fn new(registry: Registry, address: Address) -> Arc<Server> {
        Arc::new(Server {
            registry,
            objects: RwLock::new(HashMap::new()),
            names: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            next_conn: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
            live: Mutex::new(HashMap::new()),
            address,
        })
    }

    /// Accepts clients until a `shutdown` request. `exit_process`: end the whole process then
    /// (a manager's own server process) instead of returning.
    pub(crate) fn serve(self: &Arc<Server>, listener: Listener, exit_process: bool) -> Result<()> {
        let listener = Arc::new(listener);
        loop {
            let raw = match listener.accept_unauthenticated() {
                Ok(r) => r,
                Err(e) => {
                    if self.stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    tracing::warn!("manager: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            let me = Arc::clone(self);
            let l = Arc::clone(&listener);
            let spawned = std::thread::Builder::new()
                .name("mp-manager-conn".into())
                .spawn(move || me.handle(raw, &l, exit_process));
            if let Err(e) = spawned {
                tracing::warn!("manager: cannot start a connection thread: {e}");
            }
        }
        // Wake every connection thread: their clients see the end of the stream.
        for (_, fd) in lock(&self.live).drain() {
            shutdown_socket(fd);
        }
        Ok(())
    }

    fn handle(self: Arc<Server>, mut raw: RawConn, l: &Listener, exit_process: bool) {
        // Registered before the handshake, so that a shutdown also ends handshakes in progress.
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        if let Ok(fd) = raw.fileno() {
            if let Ok(dup) = fd.try_clone_to_owned() {
                lock(&self.live).insert(conn_id, dup);
            }
        }
        if self.stopping.load(Ordering::SeqCst) {
            lock(&self.live).remove(&conn_id);
            return;
        }
        if matches!(self.address, Address::Tcp(_)) {
            if let Err(e) = super::tcp_keepalive(&raw) {
                tracing::debug!("manager: no keepalive on a TCP connection: {e}");
            }
        }
        let deadline = Instant::now() + l.handshake_timeout();
        if let Err(e) = auth::server_handshake(&mut raw, l.authkey(), deadline) {
            tracing::debug!("manager: refused a client: {e}");
            lock(&self.live).remove(&conn_id);
            return;
        }
        raw.set_spin(SERVER_SPIN);
        let mut shutdown = false;
        // Set once the client asks for it (Unix sockets): requests and replies then cross
        // shared memory (see lane.rs).
        let mut lane: Option<Lane> = None;
        let mut out = Vec::new();
        loop {
            let decode = |b: &[u8]| {
                postcard::from_bytes::<Request<'_>>(b)
                    .map(|r| (r.obj, r.method.to_string(), r.args.to_vec()))
                    .map_err(|e| Error::Decode(e.to_string()))
            };
            let req = match &mut lane {
                Some(l) => l.recv(&mut raw, decode),
                None => raw.recv_with(None, |b, _| decode(b)),
            };
            let (obj, method, args) = match req {
                Ok(r) => r,
                Err(Error::Decode(e)) => {
                    let rep = Err(RemoteError::Other(e));
                    if send_reply(&mut raw, lane.as_mut(), &mut out, &rep).is_err() {
                        break;
                    }
                    continue;
                }
                Err(_) => break,
            };
            if obj == 0 && method == "lane" && lane.is_none() {
                match open_lane(&mut raw) {
                    Ok(l) => lane = Some(l),
                    Err(Error::Remote(_)) => {}
                    Err(_) => break,
                }
                continue;
            }
            let fd = match raw.fileno() {
                Ok(fd) => fd,
                Err(_) => break,
            };
            let ctx = CallCtx { conn_id, fd };
            let rep = if obj == 0 {
                self.manager_call(&method, &args, &mut shutdown)
            } else {
                let o = self
                    .objects
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&obj)
                    .cloned();
                match o {
                    Some(o) => o.call(&method, &args, &ctx),
                    None => Err(RemoteError::Other(format!("no object with id {obj}"))),
                }
            };
            if send_reply(&mut raw, lane.as_mut(), &mut out, &rep).is_err() {
                break;
            }
            if shutdown {
                self.stop(exit_process);
                break;
            }
        }
        lock(&self.live).remove(&conn_id);
        let objs: Vec<Arc<dyn Object>> = self
            .objects
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for o in objs {
            o.disconnected(conn_id);
        }
    }

    fn stop(&self, exit_process: bool) {
        if exit_process {
            // The manager's own process: nothing to tidy that the kernel does not.
            platform::exit_now(0);
        }
        self.stopping.store(true, Ordering::SeqCst);
        // Unblock the accept loop with a connection of our own.
        let _ = crate::connection::connect_raw(&self.address, Duration::from_secs(1));
    }

    fn manager_call(
        &self,
        method: &str,
        args: &[u8],
        shutdown: &mut bool,
    ) -> std::result::Result<Vec<u8>, RemoteError> {
        match method {
            "create" => {
                let c: Create = a(args)?;
                if let Some(name) = &c.name {
                    let mut names = lock(&self.names);
                    if let Some((id, ty)) = names.get(name) {
                        if *ty != c.typename {
                            return Err(RemoteError::Other(format!(
                                "{name:?} names a {ty}, not a {}",
                                c.typename
                            )));
                        }
                        return reply(id);
                    }
                    let id = self.insert(&c)?;
                    names.insert(name.clone(), (id, c.typename.clone()));
                    return reply(&id);
                }
                reply(&self.insert(&c)?)
            }
            "release" => {
                let id: ObjectId = a(args)?;
                self.objects
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                lock(&self.names).retain(|_, (i, _)| *i != id);
                reply(&())
            }
            "count" => reply(&self.objects.read().unwrap_or_else(|e| e.into_inner()).len()),
            "ping" => reply(&()),
            "shutdown" => {
                *shutdown = true;
                reply(&())
            }
            _ => Err(no_method("manager", method)),
        }
    }

    fn insert(&self, c: &Create) -> std::result::Result<ObjectId, RemoteError> {
        let obj: Arc<dyn Object> = match c.typename.as_str() {
            "dict" => Arc::new(Dict::default()),
            "list" => Arc::new(List(Mutex::new(a(&c.args)?))),
            "namespace" => Arc::new(Namespace::default()),
            "queue" => Arc::new(Queue::new(a(&c.args)?)),
            "lock" => Arc::new(Lock::default()),
            "value" => Arc::new(Value::new(a(&c.args)?)),
            "event" => Arc::new(Event::default()),
            "barrier" => {
                let parties: usize = a(&c.args)?;
                if parties == 0 {
                    return Err(RemoteError::Other(
                        "a barrier needs at least one party".into(),
                    ));
                }
                Arc::new(Barrier::new(parties))
            }
            other => {
                let make = self.registry.types.get(other).ok_or_else(|| {
                    RemoteError::Other(format!("no type {other:?} is registered with the manager"))
                })?;
                Arc::new(UserObject(Mutex::new(
                    make(&c.args).map_err(RemoteError::from)?,
                )))
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.objects
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, obj);
        Ok(id)
    }
}

fn send_reply(
    raw: &mut RawConn,
    lane: Option<&mut Lane>,
    out: &mut Vec<u8>,
    rep: &Reply,
) -> Result<()> {
    match lane {
        Some(l) => {
            out.clear();
            postcard::to_io(rep, &mut *out).map_err(|e| Error::Encode(e.to_string()))?;
            l.send(raw, out)
        }
        None => raw.send_with(|buf| {
            postcard::to_io(rep, &mut *buf).map_err(|e| Error::Encode(e.to_string()))?;
            Ok(Vec::new())
        }),
    }
}

/// Answers a client's `lane` request: makes the shared file and sends it with the reply. On
/// success the connection continues on the lane. [`Error::Remote`] when no lane could be made
/// (the client was told and carries on over the socket); any other error is the connection's.
fn open_lane(raw: &mut RawConn) -> Result<Lane> {
    let made = Lane::create();
    let (lane, fd) = match made {
        Ok(x) => x,
        Err(e) => {
            let rep: Reply = Err(RemoteError::Other(format!("no fast lane: {e}")));
            send_reply(raw, None, &mut Vec::new(), &rep)?;
            return Err(Error::Remote(e.to_string()));
        }
    };
    let rep: Reply = Ok(Vec::new());
    // Over TCP the descriptor cannot travel: the send fails before anything is written, and
    // the client is told so instead.
    let sent = raw.send_with(|buf| {
        postcard::to_io(&rep, &mut *buf).map_err(|e| Error::Encode(e.to_string()))?;
        Ok(vec![fd.as_raw_fd()])
    });
    match sent {
        Ok(()) => Ok(lane),
        Err(Error::Encode(e)) => {
            let rep: Reply = Err(RemoteError::Other(format!("no fast lane: {e}")));
            send_reply(raw, None, &mut Vec::new(), &rep)?;
            Err(Error::Remote(e))
        }
        Err(e) => Err(e),
    }
}

fn shutdown_socket(fd: OwnedFd) {
    // shutdown(2) acts on the socket, not the descriptor: the connection thread's blocking
    // receive returns the end of the stream. Through std, which wraps the call.
    let s = std::os::unix::net::UnixStream::from(fd);
    let _ = s.shutdown(std::net::Shutdown::Both);
    let _ = s.as_fd();
}
