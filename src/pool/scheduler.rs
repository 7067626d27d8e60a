//! The parent side of a pool: task queue, workers, jobs, and who drives the I/O.
//!
//! See `README.md` beside this file for the invariants. In short: all state is in one
//! [`Core`] behind one mutex; whoever waits for a result *drives* (polls the workers' sockets
//! and death descriptors without the lock, then reads and dispatches with it), so a result
//! reaches the thread that wants it without a thread hop. A background thread drives only when
//! nobody has waited for a short grace period (async results nobody waits on yet, callbacks,
//! futures, dead workers to replace).

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::Waker;
use std::time::{Duration, Instant};

use super::transport::{
    BootEncoder, FROM_FAILED, FROM_INIT_FAILED, FROM_OK, FROM_PANICKED, FROM_READY, Fill, Link,
    Transport,
};
use crate::codec;
use crate::error::{Error, ExitStatus, Result};
use crate::platform::{self, EpollOp};
use crate::process::ProcessInfo;

/// A job's id.
pub(crate) type JobId = u64;

/// How long the background thread leaves work to a foreground waiter before driving itself.
const GRACE: Duration = Duration::from_millis(2);
/// Most tasks in flight at one worker.
const MAX_WINDOW: usize = 64;
/// A worker's queue should hold about this much work (so it never waits for the parent).
const TARGET_QUEUE_NS: f64 = 300_000.0;

/// Where a job's results go. Implemented by the typed layer (`mod.rs`).
pub(crate) trait Sink: Send + 'static {
    /// Task `index` of the job (holding `items` items) finished with `outcome`: the encoded
    /// `(errors, results)` of its chunk, or the error of the whole task.
    fn deliver(&mut self, index: u32, items: u32, outcome: Result<&[u8]>);
    /// For the typed layer to get its sink back.
    fn as_any(&mut self) -> &mut dyn Any;
}

/// Runs once a job is complete, outside the lock, and leaves the value the typed layer takes.
pub(crate) type Hook = Box<dyn FnOnce(Box<dyn Sink>) -> Box<dyn Any + Send> + Send>;

pub(crate) struct Job {
    pub(crate) sink: Option<Box<dyn Sink>>,
    /// Tasks not yet delivered.
    pub(crate) remaining: usize,
    /// Nobody will take the result (its handle was dropped): forget it when complete.
    pub(crate) detached: bool,
    pub(crate) waker: Option<Waker>,
    pub(crate) hook: Option<Hook>,
    /// The hook's product, once it ran.
    pub(crate) value: Option<Box<dyn Any + Send>>,
    /// The hook is running (the sink is out).
    pub(crate) in_hook: bool,
    /// More tasks may still be added (imap).
    pub(crate) open: bool,
}

impl Job {
    /// Complete, and any hook has run.
    pub(crate) fn finished(&self) -> bool {
        self.remaining == 0 && !self.open && !self.in_hook && self.hook.is_none()
    }
}

/// An encoded task (a chunk of items of one job).
pub(crate) struct Task {
    pub(crate) job: JobId,
    pub(crate) index: u32,
    pub(crate) items: u32,
    pub(crate) chunk_fn: Arc<Vec<u8>>,
    pub(crate) payload: Arc<Vec<u8>>,
    pub(crate) range: (usize, usize),
    /// Descriptors of handles in the arguments (our own duplicates).
    pub(crate) fds: Vec<OwnedFd>,
    pub(crate) attempts: u32,
}

struct Inflight {
    seq: u64,
    task: Task,
    sent: Instant,
}

#[derive(PartialEq, Eq, Clone, Copy, Debug)]
enum WState {
    Starting,
    Ready,
    /// Reached maxtasksperchild (or asked to exit): gets no more tasks.
    Retiring,
}

struct Worker {
    /// Its token in the epoll set (`2 * id` socket, `2 * id + 1` death).
    id: u64,
    /// Whether the epoll set watches its socket for writability.
    out_registered: bool,
    link: Box<dyn Link>,
    state: WState,
    inflight: VecDeque<Inflight>,
    sent: u64,
    last_result: Instant,
    /// Killed by us for this task's timeout.
    timed_out: Option<u64>,
    /// Its socket reached end of stream or failed.
    broken: bool,
}

#[derive(PartialEq, Eq, Clone, Copy, Debug)]
pub(crate) enum PoolState {
    Running,
    Closed,
    Terminated,
}

#[derive(PartialEq, Eq, Clone, Copy, Debug)]
enum Driver {
    None,
    Fg,
    Bg,
}

/// Pool configuration the scheduler needs.
pub(crate) struct Config {
    pub(crate) processes: usize,
    pub(crate) maxtasks: u64,
    pub(crate) task_timeout: Option<Duration>,
    pub(crate) retries: u32,
    pub(crate) worker_name: &'static str,
}

/// Everything behind the pool's mutex.
pub(crate) struct Core {
    workers: Vec<Worker>,
    queue: VecDeque<Task>,
    pub(crate) jobs: HashMap<JobId, Job>,
    next_seq: u64,
    next_job: JobId,
    pub(crate) state: PoolState,
    /// Why the pool cannot make workers any more (a replacement's initializer failed).
    broken: Option<String>,
    driver: Driver,
    fg_waiters: usize,
    bg_idle: bool,
    bg_urgent: bool,
    last_fg: Instant,
    /// EWMA of a task's service time, ns (0: unknown).
    ewma_ns: f64,
    worker_counter: u32,
    /// Wake-ups and hooks to run once the lock is released.
    pending_wakers: Vec<Waker>,
    pending_hooks: Vec<JobId>,
    /// Tasks completed (for the progress bar).
    pub(crate) completed: u64,
    pub(crate) submitted: u64,
    /// Pool creation in progress: a dying worker fails the creation instead of being replaced.
    starting: bool,
}

/// The job table and what completing a job produces, borrowed apart from the workers (so a
/// result can be delivered straight from a worker's receive buffer).
pub(crate) struct JobsView<'a> {
    jobs: &'a mut HashMap<JobId, Job>,
    wakers: &'a mut Vec<Waker>,
    hooks: &'a mut Vec<JobId>,
    completed: &'a mut u64,
}

impl JobsView<'_> {
    fn deliver(&mut self, task: Task, outcome: Result<&[u8]>) {
        *self.completed += 1;
        let job = task.job;
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        if let Some(s) = j.sink.as_mut() {
            s.deliver(task.index, task.items, outcome);
        }
        j.remaining -= 1;
        let complete = j.remaining == 0 && !j.open;
        if let Some(w) = j.waker.take() {
            self.wakers.push(w);
        }
        if complete {
            self.on_job_complete(job);
        }
    }

    fn on_job_complete(&mut self, job: JobId) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        if let Some(w) = j.waker.take() {
            self.wakers.push(w);
        }
        if j.hook.is_some() {
            self.hooks.push(job);
        } else if j.detached {
            self.jobs.remove(&job);
        }
    }
}

impl Core {
    fn view(&mut self) -> JobsView<'_> {
        JobsView {
            jobs: &mut self.jobs,
            wakers: &mut self.pending_wakers,
            hooks: &mut self.pending_hooks,
            completed: &mut self.completed,
        }
    }

    /// The pids of the current workers.
    pub(crate) fn worker_pids(&self) -> Vec<u32> {
        self.workers.iter().map(|w| w.link.pid()).collect()
    }
}

/// The shared part of a pool.
pub(crate) struct Inner {
    pub(crate) core: Mutex<Core>,
    fg_cv: Condvar,
    bg_cv: Condvar,
    nudge_r: OwnedFd,
    nudge_w: OwnedFd,
    /// The readiness set of the nudge pipe and every worker's socket and death descriptor.
    ep: OwnedFd,
    pub(crate) config: Config,
    transport: Box<dyn Transport>,
    boot: BootEncoder,
    bg: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub(crate) progress: Option<super::Progress>,
}

fn dup_err(e: &Error) -> Error {
    match e {
        Error::Panicked { message, backtrace } => Error::Panicked {
            message: message.clone(),
            backtrace: backtrace.clone(),
        },
        Error::WorkerLost { pid, status } => Error::WorkerLost {
            pid: *pid,
            status: *status,
        },
        Error::Timeout => Error::Timeout,
        Error::PoolTerminated => Error::PoolTerminated,
        Error::Decode(m) => Error::Decode(m.clone()),
        Error::Encode(m) => Error::Encode(m.clone()),
        Error::Remote(m) => Error::Remote(m.clone()),
        Error::InvalidState(m) => Error::InvalidState(m.clone()),
        Error::Closed => Error::Closed,
        other => Error::Remote(other.to_string()),
    }
}

/// A copy of an error, for the several items a failed task held.
pub(crate) fn clone_error(e: &Error) -> Error {
    dup_err(e)
}

impl Inner {
    /// Starts the workers (waiting until each ran its initializer) and the background thread.
    pub(crate) fn start(
        config: Config,
        transport: Box<dyn Transport>,
        boot: BootEncoder,
        progress: Option<super::Progress>,
    ) -> Result<Arc<Inner>> {
        let (nudge_r, nudge_w) = platform::pipe()?;
        platform::set_nonblocking(nudge_r.as_fd(), true)?;
        platform::set_nonblocking(nudge_w.as_fd(), true)?;
        let ep = platform::epoll_create()?;
        platform::epoll_ctl(
            ep.as_fd(),
            EpollOp::Add,
            nudge_r.as_fd(),
            platform::EPOLLIN,
            NUDGE_TOKEN,
        )?;
        let inner = Arc::new(Inner {
            core: Mutex::new(Core {
                workers: Vec::new(),
                queue: VecDeque::new(),
                jobs: HashMap::new(),
                next_seq: 1,
                next_job: 1,
                state: PoolState::Running,
                broken: None,
                driver: Driver::None,
                fg_waiters: 0,
                bg_idle: false,
                bg_urgent: false,
                last_fg: Instant::now(),
                ewma_ns: 0.0,
                worker_counter: 0,
                pending_wakers: Vec::new(),
                pending_hooks: Vec::new(),
                completed: 0,
                submitted: 0,
                starting: true,
            }),
            fg_cv: Condvar::new(),
            bg_cv: Condvar::new(),
            nudge_r,
            nudge_w,
            ep,
            config,
            transport,
            boot,
            bg: Mutex::new(None),
            progress,
        });
        {
            let mut g = inner.lock();
            for _ in 0..inner.config.processes {
                if let Err(e) = inner.spawn_worker(&mut g) {
                    drop(g);
                    inner.terminate();
                    return Err(e);
                }
            }
            // Wait for every worker's initializer; the first failure fails the pool.
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                if let Some(b) = g.broken.take() {
                    drop(g);
                    inner.terminate();
                    return Err(Error::Panicked {
                        message: format!("pool initializer failed: {b}"),
                        backtrace: String::new(),
                    });
                }
                if g.workers.len() == inner.config.processes
                    && g.workers.iter().all(|w| w.state == WState::Ready)
                {
                    g.starting = false;
                    break;
                }
                if Instant::now() > deadline {
                    drop(g);
                    inner.terminate();
                    return Err(Error::Timeout);
                }
                g.driver = Driver::Fg;
                g = inner.step(g, Some(deadline), true);
                g.driver = Driver::None;
                if g.workers.len() < inner.config.processes && g.broken.is_none() {
                    // A worker died during its initializer (exit, signal): that is a failure
                    // too, not something to retry forever.
                    drop(g);
                    inner.terminate();
                    return Err(Error::Panicked {
                        message: "pool initializer failed: a worker died while initializing".into(),
                        backtrace: String::new(),
                    });
                }
            }
        }
        let weak = Arc::downgrade(&inner);
        let h = std::thread::Builder::new()
            .name("multiproc-pool".into())
            .spawn(move || bg_loop(weak))
            .map_err(Error::Io)?;
        *inner.bg.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
        Ok(inner)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn nudge(&self) {
        let _ = platform::write(self.nudge_w.as_fd(), &[1]);
    }

    fn drain_nudge(&self) {
        let mut b = [0u8; 64];
        while let Ok(n) = platform::read(self.nudge_r.as_fd(), &mut b) {
            if n < b.len() {
                break;
            }
        }
    }

    fn spawn_worker(&self, g: &mut Core) -> Result<()> {
        g.worker_counter += 1;
        let me = crate::process::current_process();
        let mut identity = me.identity().to_vec();
        identity.push(g.worker_counter);
        let info = ProcessInfo {
            name: format!("{}-{}", self.config.worker_name, g.worker_counter),
            identity,
            daemon: true,
            parent_pid: me.pid(),
            parent_name: me.name().to_string(),
        };
        let link = self.transport.launch(&self.boot, info)?;
        let id = g.worker_counter as u64;
        platform::epoll_ctl(
            self.ep.as_fd(),
            EpollOp::Add,
            link.sock(),
            platform::EPOLLIN,
            2 * id,
        )?;
        platform::epoll_ctl(
            self.ep.as_fd(),
            EpollOp::Add,
            link.death(),
            platform::EPOLLIN,
            2 * id + 1,
        )?;
        g.workers.push(Worker {
            id,
            out_registered: false,
            link,
            state: WState::Starting,
            inflight: VecDeque::new(),
            sent: 0,
            last_result: Instant::now(),
            timed_out: None,
            broken: false,
        });
        Ok(())
    }

    /// Creates a job and returns its id. `tasks` may be added later with [`Inner::submit`].
    pub(crate) fn new_job(&self, g: &mut Core, sink: Box<dyn Sink>, open: bool) -> JobId {
        let id = g.next_job;
        g.next_job += 1;
        g.jobs.insert(
            id,
            Job {
                sink: Some(sink),
                remaining: 0,
                detached: false,
                waker: None,
                hook: None,
                value: None,
                in_hook: false,
                open,
            },
        );
        id
    }

    /// Queues tasks and sends what the workers' windows allow, from the calling thread.
    pub(crate) fn submit(&self, g: &mut Core, tasks: impl IntoIterator<Item = Task>) {
        let before = g.queue.len();
        for t in tasks {
            if let Some(j) = g.jobs.get_mut(&t.job) {
                j.remaining += 1;
            }
            g.queue.push_back(t);
        }
        g.submitted += (g.queue.len() - before) as u64;
        self.dispatch(g);
        if g.workers.iter().any(|w| w.link.wants_write()) && g.driver != Driver::None {
            self.nudge();
        }
        if g.bg_idle && g.driver == Driver::None {
            self.bg_cv.notify_one();
        }
    }

    /// Asks the background thread to drive now (callbacks, futures).
    pub(crate) fn urgent(&self, g: &mut Core) {
        g.bg_urgent = true;
        self.bg_cv.notify_one();
    }

    /// Marks an open job (imap) as having all its tasks.
    pub(crate) fn close_job(&self, g: &mut Core, job: JobId) {
        if let Some(j) = g.jobs.get_mut(&job) {
            j.open = false;
            if j.remaining == 0 {
                self.on_job_complete(g, job);
            }
        }
    }

    fn window(&self, g: &Core) -> usize {
        if g.ewma_ns <= 0.0 {
            return 2;
        }
        ((TARGET_QUEUE_NS / g.ewma_ns) as usize).clamp(1, MAX_WINDOW)
    }

    fn dispatch(&self, g: &mut Core) {
        if g.queue.is_empty() || g.state == PoolState::Terminated {
            return;
        }
        let window = self.window(g);
        let maxtasks = self.config.maxtasks;
        let now = Instant::now();
        let Core {
            workers,
            queue,
            next_seq,
            ..
        } = g;
        // Breadth first: one task per worker per round, so a short job spreads over all.
        let mut progress = true;
        while progress && !queue.is_empty() {
            progress = false;
            for w in workers.iter_mut() {
                if w.state != WState::Ready || w.broken || w.inflight.len() >= window {
                    continue;
                }
                if maxtasks != 0 && w.sent >= maxtasks {
                    w.state = WState::Retiring;
                    continue;
                }
                let Some(task) = queue.pop_front() else { break };
                let seq = *next_seq;
                *next_seq += 1;
                let fds: Vec<RawFd> = task
                    .fds
                    .iter()
                    .map(|f| {
                        use std::os::fd::AsRawFd;
                        f.as_raw_fd()
                    })
                    .collect();
                w.link.push_task(
                    seq,
                    &task.chunk_fn,
                    &task.payload[task.range.0..task.range.1],
                    &fds,
                );
                if w.inflight.is_empty() {
                    w.last_result = now;
                }
                w.inflight.push_back(Inflight {
                    seq,
                    task,
                    sent: now,
                });
                w.sent += 1;
                progress = true;
            }
        }
        for w in workers.iter_mut() {
            if w.link.wants_write() && !w.broken && w.link.flush().is_err() {
                w.broken = true;
            }
        }
    }

    fn has_work(g: &Core) -> bool {
        !g.queue.is_empty()
            || g.workers
                .iter()
                .any(|w| !w.inflight.is_empty() || w.state != WState::Ready || w.broken)
    }

    /// Delivers one task's outcome to its job.
    fn deliver(&self, g: &mut Core, task: Task, outcome: Result<&[u8]>) {
        g.view().deliver(task, outcome);
    }

    fn on_job_complete(&self, g: &mut Core, job: JobId) {
        g.view().on_job_complete(job);
    }

    /// Fails a task: retried if its failure allows and attempts remain, else delivered.
    fn fail_task(&self, g: &mut Core, mut task: Task, err: Error, retryable: bool) {
        if retryable && task.attempts < self.config.retries && g.state != PoolState::Terminated {
            task.attempts += 1;
            g.queue.push_front(task);
            return;
        }
        self.deliver(g, task, Err(err));
    }

    /// One round of driving: dispatch, wait for readiness (without the lock) until `deadline`,
    /// then handle what arrived. The caller has set `g.driver`.
    pub(crate) fn step<'a>(
        &'a self,
        mut g: MutexGuard<'a, Core>,
        deadline: Option<Instant>,
        may_block: bool,
    ) -> MutexGuard<'a, Core> {
        if g.state == PoolState::Terminated {
            return g;
        }
        self.dispatch(&mut g);
        // Watch for writability only while a worker has frames waiting to go.
        for w in g.workers.iter_mut() {
            let want = w.link.wants_write();
            if want != w.out_registered {
                let ev = if want {
                    platform::EPOLLIN | platform::EPOLLOUT
                } else {
                    platform::EPOLLIN
                };
                if platform::epoll_ctl(
                    self.ep.as_fd(),
                    EpollOp::Modify,
                    w.link.sock(),
                    ev,
                    2 * w.id,
                )
                .is_ok()
                {
                    w.out_registered = want;
                }
            }
        }
        let mut timeout_ms: i64 = -1;
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            timeout_ms = left.as_micros().div_ceil(1000) as i64;
        }
        if let Some(t) = self.config.task_timeout {
            if g.workers.iter().any(|w| !w.inflight.is_empty()) {
                let period = (t / 8).clamp(Duration::from_millis(1), Duration::from_millis(100));
                let p = period.as_millis() as i64;
                timeout_ms = if timeout_ms < 0 { p } else { timeout_ms.min(p) };
            }
        }
        if !may_block {
            timeout_ms = 0;
        }
        drop(g);
        let mut events = [platform::EpollEvent { events: 0, u64: 0 }; 32];
        let ep = self.ep.as_fd();
        let mut n = platform::epoll_wait(ep, &mut events, 0).unwrap_or(0);
        if n == 0 && timeout_ms != 0 {
            // Spin briefly (cheap non-blocking waits) before sleeping: waking an idle vCPU
            // costs tens of microseconds, and a result is often that close.
            let spin_until = Instant::now() + spin_time();
            while n == 0 && Instant::now() < spin_until {
                std::thread::yield_now();
                n = platform::epoll_wait(ep, &mut events, 0).unwrap_or(0);
            }
            if n == 0 {
                let ms = timeout_ms.min(i32::MAX as i64) as i32;
                n = platform::epoll_wait(ep, &mut events, ms).unwrap_or(0);
            }
        }
        let mut g = self.lock();
        if g.state == PoolState::Terminated {
            return g;
        }
        let mut ready_sock = Vec::new();
        let mut ready_death = Vec::new();
        for ev in &events[..n] {
            let token = ev.u64;
            if token == NUDGE_TOKEN {
                self.drain_nudge();
            } else if token % 2 == 0 {
                ready_sock.push(token / 2);
            } else {
                ready_death.push(token / 2);
            }
        }
        let mut dead = Vec::new();
        for i in 0..g.workers.len() {
            let id = g.workers[i].id;
            if ready_sock.contains(&id) || g.workers[i].link.wants_write() {
                self.service(&mut g, i);
            }
            if ready_death.contains(&id) || g.workers[i].broken {
                dead.push(i);
            }
        }
        self.check_timeouts(&mut g);
        for &i in dead.iter().rev() {
            self.bury(&mut g, i);
        }
        self.replace_workers(&mut g);
        self.dispatch(&mut g);
        if let Some(p) = &self.progress {
            p.update(g.completed, g.submitted);
        }
        g
    }

    /// Reads and handles what worker `i` sent; flushes what it waits to receive.
    fn service(&self, g: &mut Core, i: usize) {
        let maxtasks = self.config.maxtasks;
        let Core {
            workers,
            jobs,
            pending_wakers,
            pending_hooks,
            completed,
            ewma_ns,
            broken,
            ..
        } = g;
        let mut view = JobsView {
            jobs,
            wakers: pending_wakers,
            hooks: pending_hooks,
            completed,
        };
        let w = &mut workers[i];
        loop {
            let fill = w.link.fill().unwrap_or(Fill::Eof);
            let now = Instant::now();
            let mut any = false;
            loop {
                let msg = match w.link.next_msg() {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(_) => {
                        w.broken = true;
                        break;
                    }
                };
                any = true;
                match msg.kind {
                    FROM_READY => w.state = WState::Ready,
                    FROM_INIT_FAILED => {
                        let (m, _bt): (String, String) =
                            codec::decode_plain(msg.body).unwrap_or_default();
                        // Out of service; the pool cannot make workers any more.
                        w.broken = true;
                        w.state = WState::Retiring;
                        *broken = Some(m);
                    }
                    kind @ (FROM_OK | FROM_PANICKED | FROM_FAILED) => {
                        let Some(pos) = w.inflight.iter().position(|f| f.seq == msg.seq) else {
                            w.broken = true;
                            break;
                        };
                        let fl = w.inflight.remove(pos).expect("found");
                        let begun = fl.sent.max(w.last_result);
                        let took = now.saturating_duration_since(begun).as_nanos() as f64;
                        w.last_result = now;
                        if maxtasks != 0 && w.sent >= maxtasks {
                            w.state = WState::Retiring;
                        }
                        *ewma_ns = if *ewma_ns <= 0.0 {
                            took
                        } else {
                            0.9 * *ewma_ns + 0.1 * took
                        };
                        match kind {
                            FROM_OK => view.deliver(fl.task, Ok(msg.body)),
                            FROM_PANICKED => {
                                let (message, backtrace): (String, String) =
                                    codec::decode_plain(msg.body).unwrap_or_default();
                                view.deliver(fl.task, Err(Error::Panicked { message, backtrace }));
                            }
                            _ => {
                                let m = codec::decode_plain::<String>(msg.body).unwrap_or_default();
                                view.deliver(fl.task, Err(Error::Decode(m)));
                            }
                        }
                    }
                    _ => {
                        w.broken = true;
                        break;
                    }
                }
            }
            if fill == Fill::Eof {
                w.broken = true;
                break;
            }
            if !any || fill == Fill::Drained {
                break;
            }
        }
        if w.link.wants_write() && !w.broken && w.link.flush().is_err() {
            w.broken = true;
        }
    }

    fn check_timeouts(&self, g: &mut Core) {
        let Some(t) = self.config.task_timeout else {
            return;
        };
        let now = platform::monotonic_ns();
        for w in g.workers.iter_mut() {
            if w.timed_out.is_some() || w.inflight.is_empty() {
                continue;
            }
            if let Some((seq, started)) = w.link.running() {
                if now.saturating_sub(started) > t.as_nanos() as u64
                    && w.inflight.iter().any(|f| f.seq == seq)
                {
                    w.timed_out = Some(seq);
                    w.link.kill();
                    w.broken = true;
                }
            }
        }
    }

    /// Worker `i` died or its stream broke: read what it sent, reap it, settle its tasks.
    fn bury(&self, g: &mut Core, i: usize) {
        // Results it sent before dying still count.
        self.service(g, i);
        let mut w = g.workers.swap_remove(i);
        let _ = platform::epoll_ctl(self.ep.as_fd(), EpollOp::Delete, w.link.sock(), 0, 0);
        let _ = platform::epoll_ctl(self.ep.as_fd(), EpollOp::Delete, w.link.death(), 0, 0);
        let running = w.link.running().map(|(s, _)| s);
        w.link.kill();
        let status = w
            .link
            .reap(true)
            .unwrap_or(ExitStatus::Signaled(libc::SIGKILL));
        let pid = w.link.pid();
        let timed_out = w.timed_out;
        let mut requeue = Vec::new();
        for fl in w.inflight.drain(..) {
            if Some(fl.seq) == timed_out {
                self.fail_task(g, fl.task, Error::Timeout, true);
            } else if Some(fl.seq) == running {
                self.fail_task(g, fl.task, Error::WorkerLost { pid, status }, true);
            } else {
                // Not started (or finished with its result lost): run it again elsewhere.
                requeue.push(fl.task);
            }
        }
        for t in requeue.into_iter().rev() {
            g.queue.push_front(t);
        }
        drop(w);
    }

    fn replace_workers(&self, g: &mut Core) {
        // Retiring workers that are done get asked to exit... they exit by themselves after
        // maxtasks; a pool past its initializer failure stops making workers.
        if g.starting {
            return;
        }
        let idle = g.queue.is_empty() && g.workers.iter().all(|w| w.inflight.is_empty());
        if g.state == PoolState::Closed && idle {
            return;
        }
        if g.state == PoolState::Terminated || g.broken.is_some() {
            if g.broken.is_some() {
                self.fail_all(g, |b| Error::Panicked {
                    message: format!("pool initializer failed in a replacement worker: {b}"),
                    backtrace: String::new(),
                });
            }
            return;
        }
        let live = g
            .workers
            .iter()
            .filter(|w| w.state != WState::Retiring)
            .count();
        for _ in live..self.config.processes {
            if let Err(e) = self.spawn_worker(g) {
                tracing::warn!("could not start a pool worker: {e}");
                if g.workers.is_empty() {
                    let msg = e.to_string();
                    self.fail_all(g, |_| Error::Remote(format!("no pool worker: {msg}")));
                }
                break;
            }
        }
    }

    fn fail_all(&self, g: &mut Core, err: impl Fn(&str) -> Error) {
        let why = g.broken.clone().unwrap_or_default();
        while let Some(t) = g.queue.pop_front() {
            self.deliver(g, t, Err(err(&why)));
        }
    }

    /// Runs hooks and wakes futures collected while the lock was held.
    pub(crate) fn after_unlock(&self, mut g: MutexGuard<'_, Core>) {
        if g.pending_wakers.is_empty() && g.pending_hooks.is_empty() {
            return;
        }
        let wakers = std::mem::take(&mut g.pending_wakers);
        let hooks = std::mem::take(&mut g.pending_hooks);
        let mut work = Vec::new();
        for id in hooks {
            if let Some(j) = g.jobs.get_mut(&id) {
                if let (Some(h), Some(s)) = (j.hook.take(), j.sink.take()) {
                    j.in_hook = true;
                    work.push((id, h, s));
                }
            }
        }
        drop(g);
        let mut done = Vec::new();
        for (id, h, s) in work {
            done.push((id, h(s)));
        }
        for w in wakers {
            w.wake();
        }
        if !done.is_empty() {
            let mut g = self.lock();
            let mut wake = Vec::new();
            for (id, v) in done {
                if let Some(j) = g.jobs.get_mut(&id) {
                    j.in_hook = false;
                    if j.detached {
                        g.jobs.remove(&id);
                    } else {
                        j.value = Some(v);
                        if let Some(w) = j.waker.take() {
                            wake.push(w);
                        }
                    }
                }
            }
            self.fg_cv.notify_all();
            drop(g);
            for w in wake {
                w.wake();
            }
        }
    }

    /// Waits (driving the pool if nobody else does) until `cond` holds or `deadline` passes.
    /// Returns the guard and whether `cond` holds.
    pub(crate) fn wait_until<'a>(
        &'a self,
        mut g: MutexGuard<'a, Core>,
        mut cond: impl FnMut(&mut Core) -> bool,
        deadline: Option<Instant>,
    ) -> (MutexGuard<'a, Core>, bool) {
        loop {
            if cond(&mut g) {
                return (g, true);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return (g, false);
            }
            match g.driver {
                Driver::None => {
                    g.driver = Driver::Fg;
                    let guard = ReleaseOnUnwind(self);
                    g = self.step(g, deadline, true);
                    std::mem::forget(guard);
                    g.driver = Driver::None;
                    g.last_fg = Instant::now();
                    if g.fg_waiters > 0 {
                        self.fg_cv.notify_all();
                    } else if g.bg_idle && Self::has_work(&g) {
                        self.bg_cv.notify_one();
                    }
                    if !g.pending_hooks.is_empty() || !g.pending_wakers.is_empty() {
                        self.after_unlock(g);
                        g = self.lock();
                    }
                }
                d => {
                    if d == Driver::Bg {
                        self.nudge();
                    }
                    g.fg_waiters += 1;
                    let wait = deadline
                        .map(|d| d.saturating_duration_since(Instant::now()))
                        .unwrap_or(Duration::from_millis(100))
                        .min(Duration::from_millis(100));
                    g = self
                        .fg_cv
                        .wait_timeout(g, wait)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                    g.fg_waiters -= 1;
                }
            }
        }
    }

    /// Stops everything now: kills the workers, fails what was outstanding with
    /// [`Error::PoolTerminated`], stops the background thread, reaps the workers.
    pub(crate) fn terminate(&self) {
        let mut g = self.lock();
        if g.state != PoolState::Terminated {
            g.state = PoolState::Terminated;
            for w in &g.workers {
                w.link.kill();
            }
            while let Some(t) = g.queue.pop_front() {
                self.deliver(&mut g, t, Err(Error::PoolTerminated));
            }
            let mut lost = Vec::new();
            for w in g.workers.iter_mut() {
                lost.extend(w.inflight.drain(..).map(|f| f.task));
            }
            for t in lost {
                self.deliver(&mut g, t, Err(Error::PoolTerminated));
            }
            let open: Vec<JobId> = g
                .jobs
                .iter()
                .filter(|(_, j)| j.open)
                .map(|(id, _)| *id)
                .collect();
            for id in open {
                self.close_job(&mut g, id);
            }
        }
        self.nudge();
        self.bg_cv.notify_all();
        self.fg_cv.notify_all();
        // Wait until no one drives (a driver leaves promptly: nudged, and the state says so;
        // the bound is only a safety net).
        let give_up = Instant::now() + Duration::from_secs(5);
        while g.driver != Driver::None && Instant::now() < give_up {
            g = self
                .fg_cv
                .wait_timeout(g, Duration::from_millis(10))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            self.nudge();
        }
        let workers = std::mem::take(&mut g.workers);
        self.after_unlock(g);
        // Dropping a link kills and reaps its worker.
        drop(workers);
        let h = self.bg.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = h {
            if h.thread().id() != std::thread::current().id() {
                // It leaves at once when nudged, unless a user callback it runs blocks: then it
                // is detached after a bound rather than hanging terminate.
                let give_up = Instant::now() + Duration::from_secs(5);
                while !h.is_finished() && Instant::now() < give_up {
                    self.nudge();
                    std::thread::park_timeout(Duration::from_millis(1));
                }
                if h.is_finished() {
                    let _ = h.join();
                } else {
                    tracing::warn!("pool background thread still busy after terminate; detached");
                }
            }
        }
    }

    /// Graceful end after `close`: waits for the outstanding work, asks the workers to exit,
    /// reaps them.
    pub(crate) fn join(&self) -> Result<()> {
        let g = self.lock();
        match g.state {
            PoolState::Running => {
                return Err(Error::state(
                    "Pool::join needs close() or terminate() first",
                ));
            }
            PoolState::Terminated => {
                drop(g);
                self.terminate();
                return Ok(());
            }
            PoolState::Closed => {}
        }
        let (mut g, _) = self.wait_until(
            g,
            |c| c.queue.is_empty() && c.workers.iter().all(|w| w.inflight.is_empty()),
            None,
        );
        for w in g.workers.iter_mut() {
            w.state = WState::Retiring;
            w.link.push_exit();
            let _ = w.link.flush();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let (g, _) = self.wait_until(g, |c| c.workers.is_empty(), Some(deadline));
        drop(g);
        self.terminate();
        Ok(())
    }
}

/// The epoll token of the nudge pipe.
const NUDGE_TOKEN: u64 = u64::MAX;

/// How long a driver spins before it blocks (`MULTIPROC_SPIN_US`, default 30 µs).
fn spin_time() -> Duration {
    static SPIN: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *SPIN.get_or_init(|| {
        let us = std::env::var("MULTIPROC_SPIN_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(30);
        Duration::from_micros(us)
    })
}

/// Gives up the driver role if a driving thread unwinds (a panic must not leave the pool
/// without a driver). Forgotten on the normal path.
struct ReleaseOnUnwind<'a>(&'a Inner);

impl Drop for ReleaseOnUnwind<'_> {
    fn drop(&mut self) {
        let mut g = self.0.lock();
        g.driver = Driver::None;
        self.0.fg_cv.notify_all();
        self.0.bg_cv.notify_all();
    }
}

fn bg_loop(weak: std::sync::Weak<Inner>) {
    // A panic while driving is a bug; the thread reports it (panic hook) and carries on.
    while std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| bg_loop_inner(&weak))).is_err() {
        tracing::error!("the pool's background thread recovered from a panic");
    }
}

fn bg_loop_inner(weak: &std::sync::Weak<Inner>) {
    let mut idle_rounds = 0u32;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let mut g = inner.lock();
        loop {
            if g.state == PoolState::Terminated {
                return;
            }
            let work = Inner::has_work(&g)
                || g.workers.len() < inner.config.processes && g.broken.is_none();
            if g.driver == Driver::None && g.fg_waiters == 0 && work {
                let since = g.last_fg.elapsed();
                if g.bg_urgent || since >= GRACE {
                    g.bg_urgent = false;
                    idle_rounds = 0;
                    g.driver = Driver::Bg;
                    let guard = ReleaseOnUnwind(&inner);
                    g = inner.step(g, None, true);
                    std::mem::forget(guard);
                    g.driver = Driver::None;
                    if g.fg_waiters > 0 {
                        inner.fg_cv.notify_all();
                    }
                    inner.after_unlock(g);
                    break;
                }
                g = inner
                    .bg_cv
                    .wait_timeout(g, GRACE - since)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                continue;
            }
            if work {
                // Someone else drives: sleep until they leave (they notify), or a while.
                g = inner
                    .bg_cv
                    .wait_timeout(g, Duration::from_millis(50))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                continue;
            }
            // No work: linger with timed waits for a while (so a busy caller does not have to
            // wake us on every submission), then sleep until a submission wakes us.
            if idle_rounds < 20 {
                idle_rounds += 1;
                g = inner
                    .bg_cv
                    .wait_timeout(g, Duration::from_millis(5))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            } else {
                g.bg_idle = true;
                g = inner.bg_cv.wait(g).unwrap_or_else(|p| p.into_inner());
                g.bg_idle = false;
                idle_rounds = 0;
            }
            if g.bg_urgent {
                continue;
            }
        }
        drop(inner);
    }
}
