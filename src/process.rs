//! `Process`, `spawn`/`JoinHandle`, and the questions a process asks about itself and its
//! children, as in Python's `multiprocessing.process`.
//!
//! # Hygiene
//! * Every child is reaped: by `join`, `is_alive` or `exitcode` once it ended; by a background
//!   reaper thread when a running `Process` is dropped; at exit otherwise.
//! * At normal exit (return from `main` or `std::process::exit`), as in Python, daemon children
//!   are terminated and the others joined.
//! * A daemon child dies with its parent even when the parent is SIGKILLed (`PR_SET_PDEATHSIG`
//!   plus a re-check of the parent pid, closing the race where the parent died first).
//! * Descriptors the crate creates are close-on-exec; a child gets only what it is sent.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::context::{Context, StartMethod};
use crate::error::{Error, ExitStatus, Result};
use crate::frame;
use crate::function::{self, Entry};
use crate::platform;
use crate::start::{self, ChildTask, Outcome};

// ---------------------------------------------------------------------------------------------
// Who am I
// ---------------------------------------------------------------------------------------------

/// What a process knows about itself (Python's `current_process()` attributes).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub(crate) name: String,
    pub(crate) identity: Vec<u32>,
    pub(crate) daemon: bool,
    pub(crate) parent_pid: u32,
    pub(crate) parent_name: String,
}

impl ProcessInfo {
    fn main() -> ProcessInfo {
        ProcessInfo {
            name: "MainProcess".into(),
            identity: Vec::new(),
            daemon: false,
            parent_pid: 0,
            parent_name: String::new(),
        }
    }
}

/// A view of the current process, as `multiprocessing.current_process()` gives.
///
/// ```
/// let me = multiproc::current_process();
/// assert_eq!(me.name(), "MainProcess");
/// assert_eq!(me.pid(), std::process::id());
/// ```
#[derive(Clone, Debug)]
pub struct CurrentProcess {
    info: ProcessInfo,
    pid: u32,
}

impl CurrentProcess {
    /// The process's name: `"MainProcess"`, or the name given to [`Process::name`], or
    /// `"Process-N"` (`"Process-N:M"` for a grandchild) as in Python.
    pub fn name(&self) -> &str {
        &self.info.name
    }
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }
    /// Python's `ident`: the same as the pid.
    pub fn ident(&self) -> u32 {
        self.pid
    }
    /// Whether this process was started as a daemon.
    pub fn daemon(&self) -> bool {
        self.info.daemon
    }
    /// Python's `_identity`: the path of child counters from the main process (empty there).
    pub fn identity(&self) -> &[u32] {
        &self.info.identity
    }
}

/// A view of the parent of the current process.
#[derive(Clone, Debug)]
pub struct ParentProcess {
    name: String,
    pid: u32,
}

impl ParentProcess {
    /// The parent's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The parent's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }
    /// Python's `ident`: the same as the pid.
    pub fn ident(&self) -> u32 {
        self.pid
    }
    /// Whether the parent still runs (its pid is still our parent's).
    pub fn is_alive(&self) -> bool {
        platform::getppid() == self.pid
    }
}

static CURRENT: AtomicPtr<ProcessInfo> = AtomicPtr::new(std::ptr::null_mut());
static CHILD_COUNTER: AtomicU32 = AtomicU32::new(0);

fn current_info() -> &'static ProcessInfo {
    let p = CURRENT.load(Ordering::Acquire);
    if p.is_null() {
        static MAIN: std::sync::OnceLock<ProcessInfo> = std::sync::OnceLock::new();
        return MAIN.get_or_init(ProcessInfo::main);
    }
    // SAFETY: CURRENT only ever holds pointers from Box::leak in `set_current`, never freed.
    unsafe { &*p }
}

/// Records who this child is (called once in a new child, before user code).
pub(crate) fn set_current(info: ProcessInfo) {
    CHILD_COUNTER.store(0, Ordering::Relaxed);
    CURRENT.store(Box::leak(Box::new(info)), Ordering::Release);
}

/// The current process (Python's `current_process()`).
pub fn current_process() -> CurrentProcess {
    CurrentProcess {
        info: current_info().clone(),
        pid: platform::getpid(),
    }
}

/// The parent process, or `None` in the main process (Python's `parent_process()`).
///
/// ```
/// assert!(multiproc::parent_process().is_none());
/// ```
pub fn parent_process() -> Option<ParentProcess> {
    let i = current_info();
    (i.parent_pid != 0).then(|| ParentProcess {
        name: i.parent_name.clone(),
        pid: i.parent_pid,
    })
}

/// Number of CPUs in the system (Python's `cpu_count()`).
///
/// ```
/// assert!(multiproc::cpu_count() >= 1);
/// ```
pub fn cpu_count() -> usize {
    platform::cpu_count()
}

/// Number of CPUs this process may use, from its affinity mask (Python 3.13's
/// `process_cpu_count()`): what a pool should size itself by.
///
/// ```
/// assert!(multiproc::process_cpu_count() <= multiproc::cpu_count());
/// ```
pub fn process_cpu_count() -> usize {
    platform::process_cpu_count()
}

fn child_info(name: Option<String>, daemon: bool) -> ProcessInfo {
    let parent = current_info();
    let n = CHILD_COUNTER.fetch_add(1, Ordering::Relaxed) + 1;
    let mut identity = parent.identity.clone();
    identity.push(n);
    let default_name = format!(
        "Process-{}",
        identity
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(":")
    );
    ProcessInfo {
        name: name.unwrap_or(default_name),
        identity,
        daemon,
        parent_pid: platform::getpid(),
        parent_name: parent.name.clone(),
    }
}

// ---------------------------------------------------------------------------------------------
// The children registry, the reaper and the exit handler
// ---------------------------------------------------------------------------------------------

/// The kernel side of a started child, shared by its `Process` and the registry.
#[derive(Debug)]
pub(crate) struct ChildProc {
    pub(crate) pid: u32,
    pub(crate) pidfd: OwnedFd,
    pub(crate) name: String,
    pub(crate) daemon: bool,
    status: Mutex<Option<ExitStatus>>,
}

impl ChildProc {
    pub(crate) fn new(pid: u32, pidfd: OwnedFd, name: String, daemon: bool) -> Arc<ChildProc> {
        let c = Arc::new(ChildProc {
            pid,
            pidfd,
            name,
            daemon,
            status: Mutex::new(None),
        });
        registry().push(Arc::clone(&c));
        ensure_exit_handler();
        c
    }

    /// The exit status if it has ended (reaping it), without blocking.
    pub(crate) fn poll(&self) -> Result<Option<ExitStatus>> {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if s.is_none() {
            *s = platform::pidfd_wait(self.pidfd.as_fd(), false)?;
        }
        Ok(*s)
    }

    /// Waits up to `timeout` (`None`: forever) for it to end.
    pub(crate) fn wait(&self, timeout: Option<Duration>) -> Result<Option<ExitStatus>> {
        if let Some(s) = self.poll()? {
            return Ok(Some(s));
        }
        if !platform::poll_read(self.pidfd.as_fd(), timeout)? {
            return Ok(None);
        }
        self.poll()
    }

    pub(crate) fn signal(&self, sig: i32) -> Result<()> {
        if self.poll()?.is_some() {
            return Ok(());
        }
        platform::pidfd_send_signal(self.pidfd.as_fd(), sig)
    }
}

fn registry() -> MutexGuard<'static, Vec<Arc<ChildProc>>> {
    static REG: Mutex<Vec<Arc<ChildProc>>> = Mutex::new(Vec::new());
    REG.lock().unwrap_or_else(|p| p.into_inner())
}

/// Holds the registry lock, the manager connection pool's and the shared-memory tracker's across
/// a `fork`, so a forked child sees them consistent.
pub(crate) struct ForkGuard(
    MutexGuard<'static, Vec<Arc<ChildProc>>>,
    crate::managers::ForkLock,
    crate::shared_memory::ForkLock,
);

/// Lock order: the registry, then the manager connection pool, then the shared-memory
/// tracker's pipe (none of their holders takes another of them).
pub(crate) fn fork_guard() -> ForkGuard {
    let reg = registry();
    let pool = crate::managers::lock_for_fork();
    ForkGuard(reg, pool, crate::shared_memory::lock_for_fork())
}

/// In a freshly forked child: forget the parent's children (they are not ours), close the
/// copies of the parent's manager connections, and unlock.
pub(crate) fn after_fork_in_child(g: ForkGuard) {
    let ForkGuard(mut reg, pool, tracker) = g;
    drop(tracker);
    // The Arcs are copies of the parent's memory; leaking them keeps their descriptors (which
    // are copies too) from being used or double-closed here.
    let old = std::mem::take(&mut *reg);
    std::mem::forget(old);
    drop(reg);
    crate::managers::after_fork_in_child(pool);
}

/// Python's `active_children()`: the children still running; reaps the ones that ended.
///
/// ```
/// assert!(multiproc::active_children().is_empty());
/// ```
pub fn active_children() -> Vec<ChildSummary> {
    let mut reg = registry();
    reg.retain(|c| matches!(c.poll(), Ok(None)));
    reg.iter()
        .map(|c| ChildSummary {
            name: c.name.clone(),
            pid: c.pid,
            daemon: c.daemon,
        })
        .collect()
}

/// One entry of [`active_children`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildSummary {
    /// The child's name.
    pub name: String,
    /// The child's pid.
    pub pid: u32,
    /// Whether it is a daemon.
    pub daemon: bool,
}

fn ensure_exit_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        extern "C" fn at_exit() {
            // Only the process that registered it: a forked child exits with _exit anyway.
            let children: Vec<Arc<ChildProc>> = std::mem::take(&mut *registry());
            for c in &children {
                if c.daemon {
                    let _ = c.signal(libc::SIGTERM);
                }
            }
            for c in &children {
                let t = if c.daemon {
                    Some(Duration::from_secs(1))
                } else {
                    None
                };
                if let Ok(None) = c.wait(t) {
                    let _ = c.signal(libc::SIGKILL);
                    let _ = c.wait(None);
                }
            }
        }
        // SAFETY: at_exit is an `extern "C" fn()` that never unwinds out (it catches nothing
        // that can panic: lock poisoning is handled).
        unsafe { libc::atexit(at_exit) };
    });
}

/// Hands a still-running child to the background reaper, which reaps it when it ends.
fn hand_to_reaper(c: Arc<ChildProc>) {
    // The sender is tagged with the pid that started the reaper thread: a forked copy of this
    // process has the sender but not the thread, and must start its own.
    type Reaper = (u32, std::sync::mpsc::Sender<Arc<ChildProc>>);
    static REAPER: Mutex<Option<Reaper>> = Mutex::new(None);
    let me = platform::getpid();
    let mut tx = REAPER.lock().unwrap_or_else(|p| p.into_inner());
    let sent = tx
        .as_ref()
        .is_some_and(|(owner, s)| *owner == me && s.send(Arc::clone(&c)).is_ok());
    if sent {
        return;
    }
    if let Some(old) = tx.take() {
        // Not ours (inherited through fork): its receiver has no thread here; leak it rather
        // than run destructors on state copied from another process.
        std::mem::forget(old);
    }
    let (s, r) = std::sync::mpsc::channel::<Arc<ChildProc>>();
    let _ = s.send(c);
    *tx = Some((me, s));
    let spawned = std::thread::Builder::new()
        .name("multiproc-reaper".into())
        .spawn(move || {
            let mut watched: Vec<Arc<ChildProc>> = Vec::new();
            loop {
                while let Ok(c) = r.try_recv() {
                    watched.push(c);
                }
                watched.retain(|c| {
                    let running = matches!(c.poll(), Ok(None));
                    if !running {
                        registry().retain(|r| !Arc::ptr_eq(r, c));
                    }
                    running
                });
                if watched.is_empty() {
                    match r.recv() {
                        Ok(c) => watched.push(c),
                        Err(_) => return,
                    }
                    continue;
                }
                let fds: Vec<(BorrowedFd<'_>, platform::Interest)> = watched
                    .iter()
                    .map(|c| (c.pidfd.as_fd(), platform::Interest::Read))
                    .collect();
                // Re-check for new children at least every 100 ms.
                let _ = platform::poll(&fds, Some(Duration::from_millis(100)));
            }
        });
    if spawned.is_err() {
        *tx = None;
    }
}

// ---------------------------------------------------------------------------------------------
// Process
// ---------------------------------------------------------------------------------------------

type Encoder = Box<dyn Fn(&mut Vec<u8>) -> Result<Vec<std::os::fd::RawFd>> + Send + Sync>;

enum Target {
    /// `args` is taken at `start`: the parent must not keep the child's handles (a passed
    /// `Connection`'s end would otherwise stay open here and the other side never see EOF).
    Entry {
        entry: Entry,
        args: Option<Encoder>,
    },
    Closure(Option<Box<dyn FnOnce() + Send>>),
}

/// A child process running one function, as Python's `multiprocessing.Process`.
///
/// The function is a plain `fn` item (or a closure that captures nothing) taking one argument;
/// several arguments travel as a tuple. The arguments are serialized at [`start`](Process::start)
/// and may contain handles ([`Connection`](crate::Connection), locks, queues...). The function's
/// return value is discarded; use [`spawn`] to get it back.
///
/// ```
/// use multiproc::Process;
/// fn work(n: i32) {
///     assert_eq!(n, 7);
/// }
/// let mut p = Process::new(work, 7).name("worker");
/// p.start().unwrap();
/// p.join().unwrap();
/// assert_eq!(p.exitcode(), Some(0));
/// ```
pub struct Process {
    target: Target,
    name: Option<String>,
    daemon: bool,
    context: Context,
    child: Option<Arc<ChildProc>>,
    closed: bool,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("name", &self.name)
            .field("daemon", &self.daemon)
            .field("start_method", &self.context.start_method())
            .field("pid", &self.pid())
            .finish()
    }
}

impl Process {
    /// A process that will run `f(args)` (not started yet).
    pub fn new<F, A, R>(f: F, args: A) -> Process
    where
        F: Fn(A) -> R + Copy + Send + 'static,
        A: Serialize + DeserializeOwned + Send + Sync + 'static,
        R: Serialize + DeserializeOwned,
    {
        Process {
            target: Target::Entry {
                entry: function::entry_of(f),
                args: Some(Box::new(move |out| codec::encode_into(&args, out))),
            },
            name: None,
            daemon: false,
            context: Context::default(),
            child: None,
            closed: false,
        }
    }

    /// A process that runs a closure, which may capture anything. Only with
    /// [`StartMethod::Fork`] (the closure's captures exist only in this address space);
    /// `start` fails with [`Error::InvalidArgument`] under another method.
    ///
    /// ```
    /// use multiproc::{get_context, Process, StartMethod};
    /// let greeting = String::from("hello");
    /// let mut p = Process::from_closure(move || assert_eq!(greeting, "hello"))
    ///     .context(get_context(StartMethod::Fork));
    /// p.start().unwrap();
    /// p.join().unwrap();
    /// assert_eq!(p.exitcode(), Some(0));
    /// ```
    pub fn from_closure(f: impl FnOnce() + Send + 'static) -> Process {
        Process {
            target: Target::Closure(Some(Box::new(f))),
            name: None,
            daemon: false,
            context: get_fork_context_if_default(),
            child: None,
            closed: false,
        }
    }

    /// Sets the name (default `Process-N`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Makes it a daemon: terminated when the parent exits normally, killed by the kernel when
    /// the parent dies abnormally.
    pub fn daemon(mut self, daemon: bool) -> Self {
        self.daemon = daemon;
        self
    }

    /// Chooses the start method through a context.
    pub fn context(mut self, ctx: Context) -> Self {
        self.context = ctx;
        self
    }

    /// The name it has or will have.
    pub fn get_name(&self) -> &str {
        match (&self.name, &self.child) {
            (Some(n), _) => n,
            (None, Some(c)) => &c.name,
            (None, None) => "Process",
        }
    }

    /// Whether it is (or will be) a daemon.
    pub fn is_daemon(&self) -> bool {
        self.daemon
    }

    /// Starts the child. Fails if already started, or if the arguments do not serialize.
    pub fn start(&mut self) -> Result<()> {
        if self.closed {
            return Err(Error::state("process object is closed"));
        }
        if self.child.is_some() {
            return Err(Error::state("processes can only be started once"));
        }
        let info = child_info(self.name.clone(), self.daemon);
        let name = info.name.clone();
        let method = self.context.start_method();
        let (pid, pidfd) = match &mut self.target {
            Target::Entry { entry, args } => {
                let encode = args
                    .take()
                    .ok_or_else(|| Error::state("arguments already used"))?;
                let mut payload = Vec::new();
                let fds = encode(&mut payload)?;
                let task = ChildTask {
                    build_id: function::build_id().to_vec(),
                    entry: function::entry_id(*entry),
                    payload,
                    info,
                    want_result: false,
                };
                let l = start::launch_task(method, &task, &fds)?;
                (l.pid, l.pidfd)
            }
            Target::Closure(f) => {
                if method != StartMethod::Fork {
                    return Err(Error::arg(format!(
                        "Process::from_closure needs StartMethod::Fork, not {method}: a capturing \
                         closure cannot travel to a process that does not share this memory"
                    )));
                }
                let f = f
                    .take()
                    .ok_or_else(|| Error::state("closure already used"))?;
                start::launch_closure(Box::new(move || {
                    if info.daemon {
                        platform::die_with_parent(info.parent_pid);
                    }
                    set_current(info);
                    f();
                    0
                }))?
            }
        };
        self.child = Some(ChildProc::new(pid, pidfd, name, self.daemon));
        Ok(())
    }

    fn started(&self) -> Result<&Arc<ChildProc>> {
        self.child
            .as_ref()
            .ok_or_else(|| Error::state("process has not been started"))
    }

    /// Waits for the child to end.
    pub fn join(&self) -> Result<ExitStatus> {
        let c = self.started()?;
        Ok(c.wait(None)?.expect("an unbounded wait returns a status"))
    }

    /// Waits at most `timeout`; `Ok(None)` if it is still running then.
    pub fn join_timeout(&self, timeout: Duration) -> Result<Option<ExitStatus>> {
        self.started()?.wait(Some(timeout))
    }

    /// Whether it has started and not yet ended.
    pub fn is_alive(&self) -> bool {
        self.child
            .as_ref()
            .is_some_and(|c| matches!(c.poll(), Ok(None)))
    }

    /// The child's pid once started.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.pid)
    }

    /// Python's `exitcode`: `None` while running (or before start), the exit code after a
    /// normal exit, `-N` after death by signal N.
    pub fn exitcode(&self) -> Option<i32> {
        self.child
            .as_ref()
            .and_then(|c| c.poll().ok().flatten())
            .map(ExitStatus::code)
    }

    /// How it ended, once it has.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.child.as_ref().and_then(|c| c.poll().ok().flatten())
    }

    /// Sends `SIGTERM`.
    pub fn terminate(&self) -> Result<()> {
        self.started()?.signal(libc::SIGTERM)
    }

    /// Sends `SIGKILL`.
    pub fn kill(&self) -> Result<()> {
        self.started()?.signal(libc::SIGKILL)
    }

    /// A descriptor that becomes readable when the child ends (Python's `sentinel`), for
    /// [`connection::wait`](crate::connection::wait).
    pub fn sentinel(&self) -> Result<BorrowedFd<'_>> {
        Ok(self.started()?.pidfd.as_fd())
    }

    /// Releases the process's resources. Fails while it is still running.
    pub fn close(&mut self) -> Result<()> {
        if let Some(c) = &self.child {
            if c.poll()?.is_none() {
                return Err(Error::state(
                    "cannot close a process while it is still running; join or terminate it first",
                ));
            }
        }
        self.child = None;
        self.closed = true;
        Ok(())
    }
}

fn get_fork_context_if_default() -> Context {
    crate::context::get_context(StartMethod::Fork)
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            if matches!(c.poll(), Ok(None)) {
                hand_to_reaper(c);
            } else {
                registry().retain(|r| !Arc::ptr_eq(r, &c));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// spawn / JoinHandle
// ---------------------------------------------------------------------------------------------

/// Runs `f(args)` in a new process (default start method) and returns a handle to its result.
///
/// ```
/// fn add((a, b): (i32, i32)) -> i32 {
///     a + b
/// }
/// let h = multiproc::spawn(add, (2, 3)).unwrap();
/// assert_eq!(h.join().unwrap(), 5);
///
/// fn boom(_: ()) -> i32 {
///     panic!("no luck")
/// }
/// match multiproc::spawn(boom, ()).unwrap().join() {
///     Err(multiproc::Error::Panicked { message, .. }) => assert!(message.contains("no luck")),
///     other => panic!("{other:?}"),
/// }
/// ```
pub fn spawn<F, A, R>(f: F, args: A) -> Result<JoinHandle<R>>
where
    F: Fn(A) -> R + Copy + Send + 'static,
    A: Serialize + DeserializeOwned,
    R: Serialize + DeserializeOwned,
{
    spawn_in(Context::default(), f, args)
}

/// [`spawn`] with an explicit context.
pub fn spawn_in<F, A, R>(ctx: Context, f: F, args: A) -> Result<JoinHandle<R>>
where
    F: Fn(A) -> R + Copy + Send + 'static,
    A: Serialize + DeserializeOwned,
    R: Serialize + DeserializeOwned,
{
    let entry = function::entry_of(f);
    let mut payload = Vec::new();
    let fds = codec::encode_into(&args, &mut payload)?;
    let info = child_info(None, false);
    let name = info.name.clone();
    let task = ChildTask {
        build_id: function::build_id().to_vec(),
        entry: function::entry_id(entry),
        payload,
        info,
        want_result: true,
    };
    let l = start::launch_task(ctx.start_method(), &task, &fds)?;
    drop(args);
    let child = ChildProc::new(l.pid, l.pidfd, name, false);
    Ok(JoinHandle {
        boot: Some(l.boot),
        child,
        _r: std::marker::PhantomData,
    })
}

/// The handle [`spawn`] returns: join it for the function's value.
#[derive(Debug)]
pub struct JoinHandle<R> {
    boot: Option<OwnedFd>,
    child: Arc<ChildProc>,
    _r: std::marker::PhantomData<fn() -> R>,
}

impl<R: DeserializeOwned> JoinHandle<R> {
    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.pid
    }

    /// Whether the child has finished.
    pub fn is_finished(&self) -> bool {
        !matches!(self.child.poll(), Ok(None))
    }

    /// Waits for the result: the function's value, [`Error::Panicked`] with its message and
    /// backtrace, or [`Error::WorkerLost`] if the child died without answering.
    pub fn join(mut self) -> Result<R> {
        self.join_inner(None)
    }

    /// As [`join`](JoinHandle::join) but gives up after `timeout` with [`Error::Timeout`] (the
    /// child keeps running and is reaped when it ends).
    pub fn join_timeout(mut self, timeout: Duration) -> Result<R> {
        self.join_inner(Some(timeout))
    }

    fn join_inner(&mut self, timeout: Option<Duration>) -> Result<R> {
        let boot = self
            .boot
            .take()
            .ok_or_else(|| Error::state("already joined"))?;
        // Wait for the answer or for the child's end, whichever comes first: a grandchild forked
        // by the child holds a copy of the boot socket, so a child that died without answering
        // does not always give end of file here.
        use platform::Interest::Read;
        let ready = platform::poll(
            &[(boot.as_fd(), Read), (self.child.pidfd.as_fd(), Read)],
            timeout,
        )?;
        if !ready[0] && !ready[1] {
            return Err(Error::Timeout);
        }
        // A child that ended had queued all it sent before exiting: one more look suffices, and
        // reading must not block (a half-sent answer from a killed child would wait forever on a
        // grandchild's copy of the socket).
        if ready[1] {
            platform::set_nonblocking(boot.as_fd(), true)?;
        }
        let answered = ready[0] || platform::poll_read(boot.as_fd(), Some(Duration::ZERO))?;
        let got = if answered {
            frame::recv_frame(boot.as_fd(), frame::DEFAULT_MAX_FRAME)
        } else {
            Err(Error::Eof)
        };
        match got {
            // The child exits right after answering; if it is not reaped yet, Drop hands it to
            // the reaper, so the caller never waits on a child that lingers.
            Ok((bytes, _fds)) => {
                let outcome: Outcome = codec::decode_plain(&bytes)?;
                codec::decode_plain(&outcome.into_result()?)
            }
            // No (whole) answer: the child ended or is ending. A bounded wait for its status;
            // a child still running after it sent garbage is reported by what went wrong.
            Err(e) => match self.child.wait(Some(Duration::from_secs(5)))? {
                Some(status) => Err(Error::WorkerLost {
                    pid: self.child.pid,
                    status,
                }),
                None => Err(e),
            },
        }
    }
}

impl<R> Drop for JoinHandle<R> {
    fn drop(&mut self) {
        if matches!(self.child.poll(), Ok(None)) {
            hand_to_reaper(Arc::clone(&self.child));
        } else {
            registry().retain(|r| !Arc::ptr_eq(r, &self.child));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Worker: Python's `Process` subclass with a `run` method
// ---------------------------------------------------------------------------------------------

/// A type whose `run` a child process calls: the Rust form of subclassing Python's
/// `multiprocessing.Process` and overriding `run`. The value travels to the child (it is
/// serialized at `start`), so it carries the worker's state.
///
/// ```
/// use multiproc::{Process, Worker};
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Greeter {
///     who: String,
/// }
/// impl Worker for Greeter {
///     fn run(self) {
///         println!("hello {} from {}", self.who, std::process::id());
///     }
/// }
/// let mut p = Process::from_worker(Greeter { who: "world".into() });
/// p.start().unwrap();
/// p.join().unwrap();
/// assert_eq!(p.exitcode(), Some(0));
/// ```
pub trait Worker: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The child's body.
    fn run(self);
}

fn run_worker<W: Worker>(w: W) {
    w.run()
}

impl Process {
    /// A process that calls `worker.run()` in the child.
    pub fn from_worker<W: Worker>(worker: W) -> Process {
        Process::new(run_worker::<W>, worker)
    }
}
