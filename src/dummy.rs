//! `multiproc::dummy`: the [`Pool`] API on threads (Python's `multiprocessing.dummy`), for
//! I/O-bound work.
//!
//! Functions may capture state here (threads share memory), and arguments and results need no
//! `serde`. What processes give and threads cannot:
//! * a panic is still the task's [`Error::Panicked`], but nothing can die under a task, so
//!   there is no `WorkerLost` and [`PoolBuilder::retries`] has nothing to retry;
//! * a thread cannot be killed: with [`PoolBuilder::task_timeout`] a late task's result is
//!   [`Error::Timeout`] while the thread runs on to the end of the task;
//! * [`Pool::terminate`] fails what has not started with [`Error::PoolTerminated`] and does not
//!   wait for running tasks (their threads finish them and exit).
//!
//! ```
//! use multiproc::dummy::Pool;
//! let offset = 10;
//! let pool = Pool::new(4).unwrap();
//! assert_eq!(pool.map(move |x: i32| x + offset, 0..3).unwrap(), vec![10, 11, 12]);
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context as TaskContext, Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// A queued task; called with `true` when the pool was terminated before it ran.
type Job = Box<dyn FnOnce(bool) + Send>;

struct State {
    jobs: VecDeque<Job>,
    closed: bool,
    terminated: bool,
    /// Tasks queued or running.
    busy: usize,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
    done_cv: Condvar,
    maxtasks: u64,
    init: Option<Arc<dyn Fn() + Send + Sync>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    timeout: Option<Duration>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> Error {
    let message = if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "Box<dyn Any>".to_string()
    };
    Error::Panicked {
        message,
        backtrace: String::new(),
    }
}

fn run_caught<R>(f: impl FnOnce() -> R) -> Result<R> {
    catch_unwind(AssertUnwindSafe(f)).map_err(panic_message)
}

fn spawn_thread(shared: &Arc<Shared>) -> Result<()> {
    let s = Arc::clone(shared);
    let h = std::thread::Builder::new()
        .name("multiproc-dummy".into())
        .spawn(move || worker(s))
        .map_err(Error::Io)?;
    lock(&shared.threads).push(h);
    Ok(())
}

fn worker(shared: Arc<Shared>) {
    if let Some(init) = &shared.init {
        init();
    }
    let mut done = 0u64;
    loop {
        let job = {
            let mut g = lock(&shared.state);
            loop {
                if g.terminated {
                    return;
                }
                if let Some(j) = g.jobs.pop_front() {
                    break j;
                }
                if g.closed {
                    return;
                }
                g = shared.cv.wait(g).unwrap_or_else(|p| p.into_inner());
            }
        };
        job(false);
        {
            let mut g = lock(&shared.state);
            g.busy -= 1;
            if g.busy == 0 {
                shared.done_cv.notify_all();
            }
        }
        done += 1;
        if shared.maxtasks != 0 && done >= shared.maxtasks {
            // Recycled, as Python's maxtasksperchild: a fresh thread takes over.
            let terminated = lock(&shared.state).terminated;
            if !terminated {
                let _ = spawn_thread(&shared);
            }
            return;
        }
    }
}

/// Configures a thread [`Pool`] (the same options as [`crate::PoolBuilder`]).
pub struct PoolBuilder {
    processes: Option<usize>,
    init: Option<Arc<dyn Fn() + Send + Sync>>,
    maxtasks: u64,
    timeout: Option<Duration>,
}

impl std::fmt::Debug for PoolBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolBuilder")
            .field("processes", &self.processes)
            .field("maxtasksperchild", &self.maxtasks)
            .finish()
    }
}

impl PoolBuilder {
    /// Number of threads (default: [`crate::process_cpu_count`]).
    pub fn processes(mut self, n: usize) -> Self {
        self.processes = Some(n);
        self
    }

    /// Runs `f(args)` once in each thread at start. If it panics, `build` fails.
    pub fn initializer<I, A>(mut self, f: I, args: A) -> Self
    where
        I: Fn(A) + Send + Sync + 'static,
        A: Clone + Send + Sync + 'static,
    {
        self.init = Some(Arc::new(move || f(args.clone())));
        self
    }

    /// Each thread is replaced by a fresh one after this many tasks (0: never).
    pub fn maxtasksperchild(mut self, n: u64) -> Self {
        self.maxtasks = n;
        self
    }

    /// Accepted for the same API; threads need no start method.
    pub fn context(self, _ctx: crate::Context) -> Self {
        self
    }

    /// A task's result becomes [`Error::Timeout`] when it is not there this long after it was
    /// submitted (the thread runs on).
    pub fn task_timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }

    /// Accepted for the same API; nothing can be lost under a thread, so nothing is retried.
    pub fn retries(self, _n: u32) -> Self {
        self
    }

    /// Accepted for the same API; no progress bar for threads.
    pub fn progress(self, _on: bool) -> Self {
        self
    }

    /// Starts the threads (each runs the initializer first; a panic there fails the build).
    pub fn build(self) -> Result<Pool> {
        let n = self.processes.unwrap_or_else(crate::process_cpu_count);
        if n == 0 {
            return Err(Error::arg("Number of processes must be at least 1"));
        }
        if let Some(init) = &self.init {
            // Run it once here first, so a failing initializer fails creation (no thread loop).
            run_caught(|| init()).map_err(|e| match e {
                Error::Panicked { message, backtrace } => Error::Panicked {
                    message: format!("pool initializer failed: {message}"),
                    backtrace,
                },
                e => e,
            })?;
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                closed: false,
                terminated: false,
                busy: 0,
            }),
            cv: Condvar::new(),
            done_cv: Condvar::new(),
            maxtasks: self.maxtasks,
            init: self.init,
            threads: Mutex::new(Vec::new()),
            timeout: self.timeout,
        });
        for _ in 0..n {
            spawn_thread(&shared)?;
        }
        Ok(Pool {
            shared,
            processes: n,
        })
    }
}

/// A pool of threads with [`crate::Pool`]'s API.
pub struct Pool {
    shared: Arc<Shared>,
    processes: usize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("dummy::Pool")
            .field("processes", &self.processes)
            .finish()
    }
}

/// Where one async call's result lands.
struct Slot<T> {
    m: Mutex<SlotState<T>>,
    cv: Condvar,
}

/// A callback waiting for a result.
type SlotHook<T> = Box<dyn FnOnce(&Result<T>) + Send>;

struct SlotState<T> {
    value: Option<Result<T>>,
    done: bool,
    waker: Option<Waker>,
    hooks: Vec<SlotHook<T>>,
}

impl<T> Slot<T> {
    fn new() -> Arc<Slot<T>> {
        Arc::new(Slot {
            m: Mutex::new(SlotState {
                value: None,
                done: false,
                waker: None,
                hooks: Vec::new(),
            }),
            cv: Condvar::new(),
        })
    }

    fn set(&self, v: Result<T>) {
        let waker = {
            let mut g = lock(&self.m);
            // Callbacks run here, under the slot's lock, so one added concurrently is never
            // missed; like Python's, they should be quick.
            for h in std::mem::take(&mut g.hooks) {
                h(&v);
            }
            g.value = Some(v);
            g.done = true;
            g.waker.take()
        };
        self.cv.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// The result of a `dummy::Pool` `*_async` call (the same API as [`crate::AsyncResult`]).
pub struct AsyncResult<T> {
    slot: Arc<Slot<T>>,
    deadline: Option<Instant>,
}

impl<T> std::fmt::Debug for AsyncResult<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("dummy::AsyncResult").finish()
    }
}

impl<T: Send + 'static> AsyncResult<T> {
    fn wait_until(&self, deadline: Option<Instant>) -> MutexGuard<'_, SlotState<T>> {
        let mut g = lock(&self.slot.m);
        while !g.done {
            let d = match (deadline, self.deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            match d {
                None => g = self.slot.cv.wait(g).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        if self.deadline.is_some_and(|x| now >= x) {
                            // The task timed out: its result is Timeout from now on.
                            g.value = Some(Err(Error::Timeout));
                            g.done = true;
                        }
                        break;
                    }
                    g = self
                        .slot
                        .cv
                        .wait_timeout(g, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
        g
    }

    /// Whether the result is there.
    pub fn ready(&self) -> bool {
        lock(&self.slot.m).done
    }

    /// Waits until it is there.
    pub fn wait(&self) {
        drop(self.wait_until(None));
    }

    /// Waits at most `timeout`; true if it is there.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.wait_until(Some(Instant::now() + timeout)).done
    }

    /// Whether it completed without error (an error if not ready).
    pub fn successful(&self) -> Result<bool> {
        let g = lock(&self.slot.m);
        if !g.done {
            return Err(Error::state("result is not ready"));
        }
        Ok(matches!(g.value, Some(Ok(_))))
    }

    /// Waits for the result and returns it.
    pub fn get(self) -> Result<T> {
        let mut g = self.wait_until(None);
        g.value
            .take()
            .unwrap_or_else(|| Err(Error::state("the result was already taken")))
    }

    /// Waits at most `timeout`; [`Error::Timeout`] if it is not there then.
    pub fn get_timeout(&self, timeout: Duration) -> Result<T> {
        let mut g = self.wait_until(Some(Instant::now() + timeout));
        if !g.done {
            return Err(Error::Timeout);
        }
        g.value
            .take()
            .unwrap_or_else(|| Err(Error::state("the result was already taken")))
    }

    fn hook(self, h: SlotHook<T>) -> Self {
        {
            let mut g = lock(&self.slot.m);
            if g.done {
                if let Some(v) = g.value.as_ref() {
                    h(v);
                }
            } else {
                g.hooks.push(h);
            }
        }
        self
    }

    /// Calls `f` with the value when the call succeeds.
    pub fn callback(self, f: impl FnOnce(&T) + Send + 'static) -> Self {
        self.hook(Box::new(move |r| {
            if let Ok(v) = r {
                f(v)
            }
        }))
    }

    /// Calls `f` with the error when the call fails.
    pub fn error_callback(self, f: impl FnOnce(&Error) + Send + 'static) -> Self {
        self.hook(Box::new(move |r| {
            if let Err(e) = r {
                f(e)
            }
        }))
    }
}

impl<T: Send + 'static> Future for AsyncResult<T> {
    type Output = Result<T>;
    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Result<T>> {
        let mut g = lock(&self.slot.m);
        if g.done {
            return Poll::Ready(
                g.value
                    .take()
                    .unwrap_or_else(|| Err(Error::state("the result was already taken"))),
            );
        }
        g.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// Results of a map job by chunk.
struct Collect<R> {
    chunks: Vec<Option<Vec<Result<R>>>>,
    left: usize,
}

impl Pool {
    /// A pool of `processes` threads.
    pub fn new(processes: usize) -> Result<Pool> {
        Pool::builder().processes(processes).build()
    }

    /// A builder for the other options.
    pub fn builder() -> PoolBuilder {
        PoolBuilder {
            processes: None,
            init: None,
            maxtasks: 0,
            timeout: None,
        }
    }

    /// The number of threads.
    pub fn processes(&self) -> usize {
        self.processes
    }

    fn push(&self, jobs: Vec<Job>) -> Result<()> {
        let mut g = lock(&self.shared.state);
        if g.closed || g.terminated {
            return Err(Error::state("Pool not running"));
        }
        g.busy += jobs.len();
        g.jobs.extend(jobs);
        drop(g);
        self.shared.cv.notify_all();
        Ok(())
    }

    fn deadline(&self) -> Option<Instant> {
        self.shared.timeout.map(|t| Instant::now() + t)
    }

    /// Calls `f(args)` in a thread and waits.
    pub fn apply<F, A, R>(&self, f: F, args: A) -> Result<R>
    where
        F: Fn(A) -> R + Send + Sync + 'static,
        A: Send + 'static,
        R: Send + 'static,
    {
        self.apply_async(f, args)?.get()
    }

    /// Submits `f(args)`.
    pub fn apply_async<F, A, R>(&self, f: F, args: A) -> Result<AsyncResult<R>>
    where
        F: Fn(A) -> R + Send + Sync + 'static,
        A: Send + 'static,
        R: Send + 'static,
    {
        let slot = Slot::new();
        let s = Arc::clone(&slot);
        self.push(vec![Box::new(move |cancelled: bool| {
            s.set(if cancelled {
                Err(Error::PoolTerminated)
            } else {
                run_caught(|| f(args))
            })
        })])?;
        Ok(AsyncResult {
            slot,
            deadline: self.deadline(),
        })
    }

    /// Applies `f` to every item; results in input order, the first error by input order.
    pub fn map<F, A, R, I>(&self, f: F, iterable: I) -> Result<Vec<R>>
    where
        F: Fn(A) -> R + Send + Sync + 'static,
        A: Send + 'static,
        R: Send + 'static,
        I: IntoIterator<Item = A>,
    {
        self.map_async(f, iterable)?.get()
    }

    /// [`map`](Pool::map) with an explicit chunk size.
    pub fn map_chunksize<F, A, R, I>(&self, f: F, iterable: I, chunksize: usize) -> Result<Vec<R>>
    where
        F: Fn(A) -> R + Send + Sync + 'static,
        A: Send + 'static,
        R: Send + 'static,
        I: IntoIterator<Item = A>,
    {
        self.map_async_chunksize(f, iterable, chunksize)?.get()
    }

    /// [`map`](Pool::map) without waiting.
    pub fn map_async<F, A, R, I>(&self, f: F, iterable: I) -> Result<AsyncResult<Vec<R>>>
    where
        F: Fn(A) -> R + Send + Sync + 'static,
        A: Send + 'static,
        R: Send + 'static,
        I: IntoIterator<Item = A>,
    {
        let items: Vec<A> = iterable.into_iter().collect();
        let cs = crate::pool::default_chunksize(items.len(), self.processes);
        self.map_items(f, items, cs)
    }

    /// [`map_async`](Pool::map_async) with an explicit chunk size.
    pub fn map_async_chunksize<F, A, R, I>(
        &self,
        f: F,
        iterable: I,
        chunksize: usize,
    ) -> Result<AsyncResult<Vec<R>>>
    where
        F: Fn(A) -> R + Send + Sync + 'static,
        A: Send + 'static,
        R: Send + 'static,
        I: IntoIterator<Item = A>,
    {
        if chunksize == 0 {
            return Err(Error::arg("chunksize must be at least 1"));
        }
        self.map_items(f, iterable.into_iter().collect(), chunksize)
    }

    fn map_items<F, A, R>(&self, f: F, items: Vec<A>, cs: usize) -> Result<AsyncResult<Vec<R>>>
    where
        F: Fn(A) -> R + Send + Sync + 'static,
        A: Send + 'static,
        R: Send + 'static,
    {
        let slot: Arc<Slot<Vec<R>>> = Slot::new();
        let mut chunks: Vec<Vec<A>> = Vec::new();
        let mut it = items.into_iter().peekable();
        while it.peek().is_some() {
            chunks.push(it.by_ref().take(cs).collect());
        }
        if chunks.is_empty() {
            slot.set(Ok(Vec::new()));
            return Ok(AsyncResult {
                slot,
                deadline: None,
            });
        }
        let f = Arc::new(f);
        let collect = Arc::new(Mutex::new(Collect::<R> {
            chunks: (0..chunks.len()).map(|_| None).collect(),
            left: chunks.len(),
        }));
        let jobs: Vec<Job> = chunks
            .into_iter()
            .enumerate()
            .map(|(i, chunk)| {
                let f = Arc::clone(&f);
                let c = Arc::clone(&collect);
                let s = Arc::clone(&slot);
                Box::new(move |cancelled: bool| {
                    let out: Vec<Result<R>> = if cancelled {
                        chunk
                            .into_iter()
                            .map(|_| Err(Error::PoolTerminated))
                            .collect()
                    } else {
                        chunk.into_iter().map(|a| run_caught(|| f(a))).collect()
                    };
                    let mut g = lock(&c);
                    g.chunks[i] = Some(out);
                    g.left -= 1;
                    if g.left == 0 {
                        let all = std::mem::take(&mut g.chunks);
                        drop(g);
                        let r: Result<Vec<R>> = all.into_iter().flatten().flatten().collect();
                        s.set(r);
                    }
                }) as Job
            })
            .collect();
        self.push(jobs)?;
        Ok(AsyncResult {
            slot,
            deadline: self.deadline(),
        })
    }

    /// Python's `starmap`: `f` takes the tuple.
    pub fn starmap<F, A, R, I>(&self, f: F, iterable: I) -> Result<Vec<R>>
    where
        F: Fn(A) -> R + Send + Sync + 'static,
        A: Send + 'static,
        R: Send + 'static,
        I: IntoIterator<Item = A>,
    {
        self.map(f, iterable)
    }

    /// [`starmap`](Pool::starmap) with an explicit chunk size.
    pub fn starmap_chunksize<F, A, R, I>(
        &self,
        f: F,
        iterable: I,
        chunksize: usize,
    ) -> Result<Vec<R>>
    where
        F: Fn(A) -> R + Send + Sync + 'static,
        A: Send + 'static,
        R: Send + 'static,
        I: IntoIterator<Item = A>,
    {
        self.map_chunksize(f, iterable, chunksize)
    }

    /// Python's `starmap_async`.
    pub fn starmap_async<F, A, R, I>(&self, f: F, iterable: I) -> Result<AsyncResult<Vec<R>>>
    where
        F: Fn(A) -> R + Send + Sync + 'static,
        A: Send + 'static,
        R: Send + 'static,
        I: IntoIterator<Item = A>,
    {
        self.map_async(f, iterable)
    }

    /// [`starmap_async`](Pool::starmap_async) with an explicit chunk size.
    pub fn starmap_async_chunksize<F, A, R, I>(
        &self,
        f: F,
        iterable: I,
        chunksize: usize,
    ) -> Result<AsyncResult<Vec<R>>>
    where
        F: Fn(A) -> R + Send + Sync + 'static,
        A: Send + 'static,
        R: Send + 'static,
        I: IntoIterator<Item = A>,
    {
        self.map_async_chunksize(f, iterable, chunksize)
    }

    /// Lazy map in input order, with a bounded window in flight.
    pub fn imap<'a, F, A, R, I>(&self, f: F, iterable: I) -> Result<IMap<'a, A, R>>
    where
        F: Fn(A) -> R + Send + Sync + 'static,
        A: Send + 'static,
        R: Send + 'static,
        I: IntoIterator<Item = A>,
        I::IntoIter: 'a,
    {
        self.imap_chunksize(f, iterable, 1)
    }

    /// [`imap`](Pool::imap) with an explicit chunk size.
    pub fn imap_chunksize<'a, F, A, R, I>(
        &self,
        f: F,
        iterable: I,
        chunksize: usize,
    ) -> Result<IMap<'a, A, R>>
    where
        F: Fn(A) -> R + Send + Sync + 'static,
        A: Send + 'static,
        R: Send + 'static,
        I: IntoIterator<Item = A>,
        I::IntoIter: 'a,
    {
        IMap::new(self, f, iterable, chunksize, true)
    }

    /// Lazy map in completion order.
    pub fn imap_unordered<'a, F, A, R, I>(&self, f: F, iterable: I) -> Result<IMap<'a, A, R>>
    where
        F: Fn(A) -> R + Send + Sync + 'static,
        A: Send + 'static,
        R: Send + 'static,
        I: IntoIterator<Item = A>,
        I::IntoIter: 'a,
    {
        self.imap_unordered_chunksize(f, iterable, 1)
    }

    /// [`imap_unordered`](Pool::imap_unordered) with an explicit chunk size.
    pub fn imap_unordered_chunksize<'a, F, A, R, I>(
        &self,
        f: F,
        iterable: I,
        chunksize: usize,
    ) -> Result<IMap<'a, A, R>>
    where
        F: Fn(A) -> R + Send + Sync + 'static,
        A: Send + 'static,
        R: Send + 'static,
        I: IntoIterator<Item = A>,
        I::IntoIter: 'a,
    {
        IMap::new(self, f, iterable, chunksize, false)
    }

    /// No more tasks; threads exit when the queue is empty.
    pub fn close(&self) {
        lock(&self.shared.state).closed = true;
        self.shared.cv.notify_all();
    }

    /// Fails queued tasks with [`Error::PoolTerminated`]; running ones finish in their threads.
    pub fn terminate(&self) {
        let jobs = {
            let mut g = lock(&self.shared.state);
            g.terminated = true;
            let n = g.jobs.len();
            g.busy -= n;
            std::mem::take(&mut g.jobs)
        };
        self.shared.cv.notify_all();
        self.shared.done_cv.notify_all();
        for j in jobs {
            j(true);
        }
    }

    /// Waits for the threads to exit; call `close` or `terminate` first.
    pub fn join(&self) -> Result<()> {
        {
            let g = lock(&self.shared.state);
            if !g.closed && !g.terminated {
                return Err(Error::state(
                    "Pool::join needs close() or terminate() first",
                ));
            }
        }
        loop {
            let hs: Vec<JoinHandle<()>> = std::mem::take(&mut *lock(&self.shared.threads));
            if hs.is_empty() {
                return Ok(());
            }
            for h in hs {
                let _ = h.join();
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Results for [`IMap`], by chunk.
struct Stream<R> {
    ordered: bool,
    next: usize,
    pending: BTreeMap<usize, Vec<Result<R>>>,
    ready: VecDeque<Result<R>>,
}

/// The iterator of `dummy::Pool::imap*`.
pub struct IMap<'a, A, R> {
    pool: Arc<Shared>,
    input: Box<dyn Iterator<Item = A> + 'a>,
    f: Arc<dyn Fn(A) -> R + Send + Sync>,
    chunksize: usize,
    next_chunk: usize,
    outstanding: usize,
    window: usize,
    ended: bool,
    stream: Arc<(Mutex<Stream<R>>, Condvar)>,
}

impl<A, R> std::fmt::Debug for IMap<'_, A, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("dummy::IMap").finish()
    }
}

impl<'a, A: Send + 'static, R: Send + 'static> IMap<'a, A, R> {
    fn new<F, I>(pool: &Pool, f: F, it: I, chunksize: usize, ordered: bool) -> Result<Self>
    where
        F: Fn(A) -> R + Send + Sync + 'static,
        I: IntoIterator<Item = A>,
        I::IntoIter: 'a,
    {
        if chunksize == 0 {
            return Err(Error::arg("chunksize must be at least 1"));
        }
        let mut m = IMap {
            pool: Arc::clone(&pool.shared),
            input: Box::new(it.into_iter()),
            f: Arc::new(f),
            chunksize,
            next_chunk: 0,
            outstanding: 0,
            window: (4 * pool.processes * chunksize).max(16),
            ended: false,
            stream: Arc::new((
                Mutex::new(Stream {
                    ordered,
                    next: 0,
                    pending: BTreeMap::new(),
                    ready: VecDeque::new(),
                }),
                Condvar::new(),
            )),
        };
        m.top_up()?;
        Ok(m)
    }

    fn top_up(&mut self) -> Result<()> {
        let mut jobs: Vec<Job> = Vec::new();
        while !self.ended && self.outstanding < self.window {
            let chunk: Vec<A> = self.input.by_ref().take(self.chunksize).collect();
            if chunk.is_empty() {
                self.ended = true;
                break;
            }
            self.outstanding += chunk.len();
            let i = self.next_chunk;
            self.next_chunk += 1;
            let f = Arc::clone(&self.f);
            let st = Arc::clone(&self.stream);
            jobs.push(Box::new(move |cancelled: bool| {
                let out: Vec<Result<R>> = if cancelled {
                    chunk
                        .into_iter()
                        .map(|_| Err(Error::PoolTerminated))
                        .collect()
                } else {
                    chunk.into_iter().map(|a| run_caught(|| f(a))).collect()
                };
                let mut g = lock(&st.0);
                if g.ordered {
                    g.pending.insert(i, out);
                    loop {
                        let n = g.next;
                        let Some(v) = g.pending.remove(&n) else { break };
                        g.ready.extend(v);
                        g.next += 1;
                    }
                } else {
                    g.ready.extend(out);
                }
                drop(g);
                st.1.notify_all();
            }));
        }
        if jobs.is_empty() {
            return Ok(());
        }
        let mut g = lock(&self.pool.state);
        if g.closed || g.terminated {
            return Err(Error::state("Pool not running"));
        }
        g.busy += jobs.len();
        g.jobs.extend(jobs);
        drop(g);
        self.pool.cv.notify_all();
        Ok(())
    }
}

impl<A: Send + 'static, R: Send + 'static> Iterator for IMap<'_, A, R> {
    type Item = Result<R>;
    fn next(&mut self) -> Option<Result<R>> {
        if !self.ended && self.outstanding <= self.window / 2 {
            if let Err(e) = self.top_up() {
                self.ended = true;
                return Some(Err(e));
            }
        }
        if self.outstanding == 0 {
            return None;
        }
        let mut g = lock(&self.stream.0);
        loop {
            if let Some(v) = g.ready.pop_front() {
                self.outstanding -= 1;
                return Some(v);
            }
            g = self
                .stream
                .1
                .wait_timeout(g, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}
