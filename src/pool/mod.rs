//! `Pool`: Python's `multiprocessing.Pool`, supervised and fast. See `README.md` beside this
//! file for how it works and the invariants it keeps.
//!
//! ```
//! fn square(x: u64) -> u64 {
//!     x * x
//! }
//! let pool = multiproc::Pool::new(2).unwrap();
//! assert_eq!(pool.map(square, 1..=5).unwrap(), vec![1, 4, 9, 16, 25]);
//! ```
//!
//! # Failure semantics
//! * A panic in a task is that task's [`Error::Panicked`] (message and backtrace).
//! * A worker that dies under a task (a signal, `abort`, `exit`) fails exactly that task with
//!   [`Error::WorkerLost`] naming its pid and how it ended, and is replaced at once. Tasks that
//!   were queued at that worker but had not started are run elsewhere.
//! * A task running longer than [`PoolBuilder::task_timeout`] fails with [`Error::Timeout`];
//!   its worker is killed and replaced.
//! * [`PoolBuilder::retries`] re-runs tasks that failed with `WorkerLost` or `Timeout`.
//! * An initializer that panics makes [`PoolBuilder::build`] fail (no endless respawning).
//! * [`Pool::terminate`] (and dropping the pool) kills the workers at once and fails what was
//!   outstanding with [`Error::PoolTerminated`].
//! * An argument or a result that does not deserialize is that task's [`Error::Decode`].
//! * [`Pool::map`] returns the first error by input order; [`Pool::imap`] yields each.
//!
//! Callbacks ([`AsyncResult::callback`]) run in whichever thread collects the result (the pool's
//! background thread, or a thread waiting in `get`); like Python's, they should be quick.

mod scheduler;
mod transport;
mod wire;
mod worker;

use std::any::Any;
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec;
use crate::context::{Context, StartMethod};
use crate::error::{Error, Result};
use crate::function;

use scheduler::{Config, Core, Inner, JobId, PoolState, Sink, Task, clone_error};
use transport::{BootEncoder, FdRef, LocalTransport};
use worker::{BootCommon, BootOut, ItemError};

// ---------------------------------------------------------------------------------------------
// Builder
// ---------------------------------------------------------------------------------------------

/// Configures a [`Pool`] (Python's `Pool(processes, initializer, initargs, maxtasksperchild,
/// context)`, plus `task_timeout`, `retries` and `progress`).
///
/// ```
/// use std::time::Duration;
/// fn hello(greeting: String) {
///     assert_eq!(greeting, "hi");
/// }
/// fn double(x: i32) -> i32 {
///     x * 2
/// }
/// let pool = multiproc::Pool::builder()
///     .processes(2)
///     .initializer(hello, "hi".to_string())
///     .maxtasksperchild(100)
///     .task_timeout(Duration::from_secs(10))
///     .retries(1)
///     .build()
///     .unwrap();
/// assert_eq!(pool.apply(double, 21).unwrap(), 42);
/// ```
#[derive(Default)]
pub struct PoolBuilder {
    processes: Option<usize>,
    boot: Option<MakeBoot>,
    maxtasks: u64,
    context: Context,
    task_timeout: Option<Duration>,
    retries: u32,
    progress: bool,
}

impl std::fmt::Debug for PoolBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolBuilder")
            .field("processes", &self.processes)
            .field("initializer", &self.boot.is_some())
            .field("maxtasksperchild", &self.maxtasks)
            .field("start_method", &self.context.start_method())
            .field("task_timeout", &self.task_timeout)
            .field("retries", &self.retries)
            .field("progress", &self.progress)
            .finish()
    }
}

fn boot_for<I, A>(_init: I, args: A, common: BootCommon) -> BootEncoder
where
    I: Fn(A) + Copy + Send + 'static,
    A: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    BootEncoder {
        entry: function::entry_id(worker::worker_main::<I, A>),
        encode: Box::new(move |sock, page, out| {
            let b = BootOut {
                sock: FdRef(sock),
                page: FdRef(page),
                common,
                args: &args,
            };
            codec::encode_into(&b, out)
        }),
    }
}

/// Makes the boot encoder once the settings are known (the initializer may come first).
type MakeBoot = Box<dyn FnOnce(BootCommon) -> BootEncoder + Send>;

impl PoolBuilder {
    /// Number of worker processes (default: [`process_cpu_count`](crate::process_cpu_count)).
    pub fn processes(mut self, n: usize) -> Self {
        self.processes = Some(n);
        self
    }

    /// A function each worker runs once at start with `args` (Python's `initializer` and
    /// `initargs`). If it panics in any worker, [`build`](PoolBuilder::build) fails with that
    /// panic.
    pub fn initializer<I, A>(mut self, f: I, args: A) -> Self
    where
        I: Fn(A) + Copy + Send + 'static,
        A: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        self.boot = Some(Box::new(move |common| boot_for(f, args, common)));
        self
    }

    /// Each worker exits after this many tasks (chunks) and is replaced by a fresh one
    /// (Python's `maxtasksperchild`). 0, the default, means never.
    pub fn maxtasksperchild(mut self, n: u64) -> Self {
        self.maxtasks = n;
        self
    }

    /// Starts workers with this context's start method.
    pub fn context(mut self, ctx: Context) -> Self {
        self.context = ctx;
        self
    }

    /// Starts workers with `method`.
    pub fn start_method(mut self, method: StartMethod) -> Self {
        self.context = crate::context::get_context(method);
        self
    }

    /// A task (chunk) running longer than this fails with [`Error::Timeout`]; its worker is
    /// killed and replaced. Checked at about an eighth of the timeout (at least every 1 ms).
    pub fn task_timeout(mut self, t: Duration) -> Self {
        self.task_timeout = Some(t);
        self
    }

    /// Re-runs a task that failed with [`Error::WorkerLost`] or [`Error::Timeout`] up to this
    /// many times (default 0).
    pub fn retries(mut self, n: u32) -> Self {
        self.retries = n;
        self
    }

    /// Shows a progress bar of completed tasks on standard error, when it is a terminal.
    pub fn progress(mut self, on: bool) -> Self {
        self.progress = on;
        self
    }

    /// Starts the workers and waits until each has run its initializer.
    pub fn build(self) -> Result<Pool> {
        let processes = self.processes.unwrap_or_else(crate::process_cpu_count);
        if processes == 0 {
            return Err(Error::arg("Number of processes must be at least 1"));
        }
        let common = BootCommon {
            maxtasks: self.maxtasks,
            timing: self.task_timeout.is_some(),
        };
        let boot = match self.boot {
            Some(make) => make(common),
            None => boot_for(worker::no_initializer, (), common),
        };
        let method = self.context.start_method();
        let worker_name = match method {
            StartMethod::Fork => "ForkPoolWorker",
            StartMethod::ForkServer => "ForkServerPoolWorker",
            StartMethod::Spawn => "SpawnPoolWorker",
        };
        let progress = (self.progress && std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .then(Progress::new);
        let inner = Inner::start(
            Config {
                processes,
                maxtasks: self.maxtasks,
                task_timeout: self.task_timeout,
                retries: self.retries,
                worker_name,
            },
            Box::new(LocalTransport { method }),
            boot,
            progress,
        )?;
        Ok(Pool { inner })
    }
}

/// The progress bar (standard error, only on a terminal).
pub(crate) struct Progress {
    bar: indicatif::ProgressBar,
}

impl Progress {
    fn new() -> Progress {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} tasks [{elapsed_precise}<{eta_precise}]",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Progress { bar }
    }

    pub(crate) fn update(&self, done: u64, total: u64) {
        self.bar.set_length(total);
        self.bar.set_position(done);
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

// ---------------------------------------------------------------------------------------------
// Pool
// ---------------------------------------------------------------------------------------------

/// A pool of worker processes (Python's `multiprocessing.Pool`).
///
/// Functions are `fn` items or closures that capture nothing, taking one argument (several
/// travel as a tuple: that is what `starmap` is for). Arguments and results are `serde` types;
/// arguments may hold handles (queues, locks, connections), whose descriptors travel along.
///
/// Dropping the pool terminates it, like leaving Python's `with Pool() as p:` block.
///
/// ```
/// use multiproc::Pool;
/// fn add((x, y, z): (i32, i32, i32)) -> i32 {
///     x + y + z
/// }
/// let pool = Pool::new(2).unwrap();
/// let r = pool.starmap(add, vec![(1, 2, 3), (10, 20, 30), (100, 0, -100)]).unwrap();
/// assert_eq!(r, vec![6, 60, 0]);
/// let sum: i32 = pool.imap(add, vec![(1, 1, 1); 10]).unwrap().map(|r| r.unwrap()).sum();
/// assert_eq!(sum, 30);
/// pool.close();
/// pool.join().unwrap();
/// ```
pub struct Pool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("processes", &self.inner.config.processes)
            .finish()
    }
}

/// Python's default chunk size: `ceil(len / (4 * processes))`, at least 1.
pub(crate) fn default_chunksize(len: usize, processes: usize) -> usize {
    len.div_ceil(4 * processes.max(1)).max(1)
}

/// What decoding a task's results gives: the results of the items that did not panic, and the
/// panics (index in the chunk, message, backtrace).
type Decoded<R> = (Vec<R>, Vec<ItemError>);

fn item_error((_, message, backtrace): ItemError) -> Error {
    Error::Panicked { message, backtrace }
}

/// Results of a map-like job. Chunks that complete in input order are decoded straight into
/// the output; others wait in `pending` until their turn.
struct ChunkSink<R> {
    out: Vec<R>,
    /// The next chunk the output needs.
    next: u32,
    pending: BTreeMap<u32, Result<Vec<R>>>,
    /// The first error by input order (map returns it).
    err: Option<Error>,
    /// Number of chunks (known once all are submitted).
    total: u32,
}

impl<R> ChunkSink<R> {
    fn new(capacity: usize, total: u32) -> Self {
        ChunkSink {
            out: Vec::with_capacity(capacity),
            next: 0,
            pending: BTreeMap::new(),
            err: None,
            total,
        }
    }

    fn take_chunk(&mut self, r: Result<Vec<R>>) {
        match r {
            Ok(v) if self.err.is_none() => self.out.extend(v),
            Ok(_) => {}
            Err(e) => {
                if self.err.is_none() {
                    self.err = Some(e);
                }
            }
        }
        self.next += 1;
    }
}

impl<R: DeserializeOwned + Send + 'static> Sink for ChunkSink<R> {
    fn deliver(&mut self, index: u32, _items: u32, outcome: Result<&[u8]>) {
        if index == self.next && self.err.is_none() {
            let r = outcome.and_then(|b| worker::decode_results_into(b, &mut self.out));
            match r {
                Ok(mut errs) if !errs.is_empty() => {
                    self.err = Some(item_error(errs.swap_remove(0)))
                }
                Ok(_) => {}
                Err(e) => self.err = Some(e),
            }
            self.next += 1;
        } else {
            let r = outcome.and_then(|b| {
                let (res, mut errs): Decoded<R> = worker::decode_results(b)?;
                if errs.is_empty() {
                    Ok(res)
                } else {
                    Err(item_error(errs.swap_remove(0)))
                }
            });
            self.pending.insert(index, r);
        }
        while let Some(r) = self.pending.remove(&self.next) {
            self.take_chunk(r);
        }
    }
    fn as_any(&mut self) -> &mut dyn Any {
        self
    }
}

fn into_chunk_sink<R: 'static>(mut s: Box<dyn Sink>) -> ChunkSink<R> {
    let cs = s
        .as_any()
        .downcast_mut::<ChunkSink<R>>()
        .expect("a map job has a ChunkSink");
    std::mem::replace(cs, ChunkSink::new(0, 0))
}

fn extract_vec<R: DeserializeOwned + Send + 'static>(s: Box<dyn Sink>) -> Result<Vec<R>> {
    let cs = into_chunk_sink::<R>(s);
    if let Some(e) = cs.err {
        return Err(e);
    }
    if cs.next < cs.total {
        return Err(Error::state("a task of this job never finished"));
    }
    Ok(cs.out)
}

fn extract_one<R: DeserializeOwned + Send + 'static>(s: Box<dyn Sink>) -> Result<R> {
    extract_vec::<R>(s)?
        .pop()
        .ok_or_else(|| Error::state("apply produced no result"))
}

impl Pool {
    /// A pool of `processes` workers with the default start method (Python's
    /// `Pool(processes)`).
    pub fn new(processes: usize) -> Result<Pool> {
        Pool::builder().processes(processes).build()
    }

    /// A builder for the other options.
    pub fn builder() -> PoolBuilder {
        PoolBuilder::default()
    }

    /// The number of workers.
    pub fn processes(&self) -> usize {
        self.inner.config.processes
    }

    /// The pids of the current workers (changes as workers are replaced).
    pub fn worker_pids(&self) -> Vec<u32> {
        self.inner.lock().worker_pids()
    }

    fn check_running(&self, g: &Core) -> Result<()> {
        match g.state {
            PoolState::Running => Ok(()),
            PoolState::Closed => Err(Error::state("Pool not running (closed)")),
            PoolState::Terminated => Err(Error::state("Pool not running (terminated)")),
        }
    }

    /// Submits `items` (`len` of them) in chunks of `chunksize` as one job, encoding chunk by
    /// chunk from the iterator (no copy of the whole input).
    fn submit_chunks<F, A, R>(
        &self,
        items: impl Iterator<Item = A>,
        len: usize,
        chunksize: usize,
    ) -> Result<JobId>
    where
        F: Fn(A) -> R + Copy + Send + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned + Send + 'static,
    {
        let cs = chunksize.max(1);
        let chunk_fn = Arc::new(worker::chunk_fn_id(worker::chunk_fn::<F, A, R>()));
        let nchunks = len.div_ceil(cs);
        let job = {
            let mut g = self.inner.lock();
            self.check_running(&g)?;
            let sink = ChunkSink::<R>::new(len, nchunks as u32);
            self.inner.new_job(&mut g, Box::new(sink), true)
        };
        // Encode and submit in batches of about 64 KiB, so the workers start on the first
        // chunks while later ones are still being encoded.
        const BATCH: usize = 64 * 1024;
        let mut chunk: Vec<A> = Vec::with_capacity(cs.min(len.max(1)));
        let mut items = items.fuse();
        let mut index = 0u32;
        let r = (|| -> Result<()> {
            loop {
                let mut buf = Vec::with_capacity(BATCH.min(len * std::mem::size_of::<A>() + 16));
                let mut spans = Vec::new();
                while buf.len() < BATCH {
                    chunk.clear();
                    chunk.extend(items.by_ref().take(cs));
                    if chunk.is_empty() {
                        break;
                    }
                    let start = buf.len();
                    let fds = worker::encode_items(&chunk, &mut buf)?;
                    spans.push((index, start, buf.len(), chunk.len() as u32, fds));
                    index += 1;
                }
                if spans.is_empty() {
                    return Ok(());
                }
                let payload = Arc::new(buf);
                let tasks = spans.into_iter().map(|(i, s, e, n, fds)| Task {
                    job,
                    index: i,
                    items: n,
                    chunk_fn: Arc::clone(&chunk_fn),
                    payload: Arc::clone(&payload),
                    range: (s, e),
                    fds,
                    attempts: 0,
                });
                let mut g = self.inner.lock();
                self.inner.submit(&mut g, tasks);
            }
        })();
        let mut g = self.inner.lock();
        if let Err(e) = r {
            // Nobody will see this job: forget it once its submitted tasks are done.
            if let Some(j) = g.jobs.get_mut(&job) {
                j.detached = true;
            }
            self.inner.close_job(&mut g, job);
            return Err(e);
        }
        if let Some(j) = g.jobs.get_mut(&job) {
            // The length was a promise of the iterator: trust what it gave.
            if let Some(cs) = j
                .sink
                .as_mut()
                .and_then(|s| s.as_any().downcast_mut::<ChunkSink<R>>())
            {
                // The length was the iterator's promise: trust what it gave.
                cs.total = index;
            }
        }
        self.inner.close_job(&mut g, job);
        Ok(job)
    }

    /// Calls `f(args)` in a worker and waits for the result (Python's `apply`).
    ///
    /// ```
    /// fn neg(x: i64) -> i64 {
    ///     -x
    /// }
    /// let pool = multiproc::Pool::new(1).unwrap();
    /// assert_eq!(pool.apply(neg, 5).unwrap(), -5);
    /// ```
    pub fn apply<F, A, R>(&self, f: F, args: A) -> Result<R>
    where
        F: Fn(A) -> R + Copy + Send + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned + Send + 'static,
    {
        self.apply_async(f, args)?.get()
    }

    /// Submits `f(args)` and returns at once (Python's `apply_async`).
    ///
    /// ```
    /// fn neg(x: i64) -> i64 {
    ///     -x
    /// }
    /// let pool = multiproc::Pool::new(1).unwrap();
    /// let r = pool.apply_async(neg, 5).unwrap();
    /// r.wait();
    /// assert!(r.ready());
    /// assert_eq!(r.successful().unwrap(), true);
    /// assert_eq!(r.get().unwrap(), -5);
    /// ```
    pub fn apply_async<F, A, R>(&self, f: F, args: A) -> Result<AsyncResult<R>>
    where
        F: Fn(A) -> R + Copy + Send + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned + Send + 'static,
    {
        let _ = f;
        let chunk_fn = worker::chunk_fn_id(worker::chunk_fn::<F, A, R>());
        let mut buf = Vec::new();
        let fds = worker::encode_items(std::slice::from_ref(&args), &mut buf)?;
        drop(args);
        let len = buf.len();
        let mut g = self.inner.lock();
        self.check_running(&g)?;
        let job = self
            .inner
            .new_job(&mut g, Box::new(ChunkSink::<R>::new(1, 1)), false);
        let task = Task {
            job,
            index: 0,
            items: 1,
            chunk_fn: Arc::new(chunk_fn),
            payload: Arc::new(buf),
            range: (0, len),
            fds,
            attempts: 0,
        };
        self.inner.submit(&mut g, std::iter::once(task));
        drop(g);
        Ok(AsyncResult::new(
            Arc::clone(&self.inner),
            job,
            extract_one::<R>,
        ))
    }

    /// Applies `f` to every item, in parallel, and returns the results in input order
    /// (Python's `map`). The input is cut into chunks of Python's default size. The first error
    /// by input order is returned.
    pub fn map<F, A, R, I>(&self, f: F, iterable: I) -> Result<Vec<R>>
    where
        F: Fn(A) -> R + Copy + Send + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator<Item = A>,
    {
        self.map_async(f, iterable)?.get()
    }

    /// [`map`](Pool::map) with an explicit chunk size.
    ///
    /// ```
    /// fn inc(x: u8) -> u16 {
    ///     x as u16 + 1
    /// }
    /// let pool = multiproc::Pool::new(2).unwrap();
    /// assert_eq!(pool.map_chunksize(inc, 0..4, 1).unwrap(), vec![1, 2, 3, 4]);
    /// ```
    pub fn map_chunksize<F, A, R, I>(&self, f: F, iterable: I, chunksize: usize) -> Result<Vec<R>>
    where
        F: Fn(A) -> R + Copy + Send + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator<Item = A>,
    {
        self.map_async_chunksize(f, iterable, chunksize)?.get()
    }

    /// [`map`](Pool::map) without waiting (Python's `map_async`).
    pub fn map_async<F, A, R, I>(&self, f: F, iterable: I) -> Result<AsyncResult<Vec<R>>>
    where
        F: Fn(A) -> R + Copy + Send + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator<Item = A>,
    {
        let it = iterable.into_iter();
        match it.size_hint() {
            (lo, Some(hi)) if lo == hi => {
                let cs = default_chunksize(lo, self.processes());
                self.map_items(f, it, lo, cs)
            }
            _ => {
                let items: Vec<A> = it.collect();
                let cs = default_chunksize(items.len(), self.processes());
                let n = items.len();
                self.map_items(f, items.into_iter(), n, cs)
            }
        }
    }

    /// [`map_async`](Pool::map_async) with an explicit chunk size.
    pub fn map_async_chunksize<F, A, R, I>(
        &self,
        f: F,
        iterable: I,
        chunksize: usize,
    ) -> Result<AsyncResult<Vec<R>>>
    where
        F: Fn(A) -> R + Copy + Send + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator<Item = A>,
    {
        if chunksize == 0 {
            return Err(Error::arg("chunksize must be at least 1"));
        }
        let it = iterable.into_iter();
        match it.size_hint() {
            (lo, Some(hi)) if lo == hi => self.map_items(f, it, lo, chunksize),
            _ => {
                let items: Vec<A> = it.collect();
                let n = items.len();
                self.map_items(f, items.into_iter(), n, chunksize)
            }
        }
    }

    fn map_items<F, A, R>(
        &self,
        f: F,
        items: impl Iterator<Item = A>,
        len: usize,
        cs: usize,
    ) -> Result<AsyncResult<Vec<R>>>
    where
        F: Fn(A) -> R + Copy + Send + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned + Send + 'static,
    {
        let _ = f;
        let job = self.submit_chunks::<F, A, R>(items, len, cs)?;
        Ok(AsyncResult::new(
            Arc::clone(&self.inner),
            job,
            extract_vec::<R>,
        ))
    }

    /// Python's `starmap`: each item is the tuple of the function's arguments. In Rust the
    /// function takes that tuple, so this is [`map`](Pool::map) under Python's name.
    pub fn starmap<F, A, R, I>(&self, f: F, iterable: I) -> Result<Vec<R>>
    where
        F: Fn(A) -> R + Copy + Send + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned + Send + 'static,
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
        F: Fn(A) -> R + Copy + Send + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator<Item = A>,
    {
        self.map_chunksize(f, iterable, chunksize)
    }

    /// Python's `starmap_async`.
    pub fn starmap_async<F, A, R, I>(&self, f: F, iterable: I) -> Result<AsyncResult<Vec<R>>>
    where
        F: Fn(A) -> R + Copy + Send + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned + Send + 'static,
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
        F: Fn(A) -> R + Copy + Send + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator<Item = A>,
    {
        self.map_async_chunksize(f, iterable, chunksize)
    }

    /// Lazily maps `f` over `iterable`, yielding results in input order (Python's `imap`, chunk
    /// size 1). The input is read as results are consumed, with a bounded window in flight, so
    /// an endless iterator works.
    ///
    /// ```
    /// fn sq(x: u64) -> u64 {
    ///     x * x
    /// }
    /// let pool = multiproc::Pool::new(2).unwrap();
    /// let first: Vec<u64> = pool.imap(sq, 0..).unwrap().take(5).map(|r| r.unwrap()).collect();
    /// assert_eq!(first, vec![0, 1, 4, 9, 16]);
    /// ```
    pub fn imap<'a, F, A, R, I>(&self, f: F, iterable: I) -> Result<IMap<'a, R>>
    where
        F: Fn(A) -> R + Copy + Send + 'static,
        A: Serialize + DeserializeOwned + 'a,
        R: Serialize + DeserializeOwned + Send + 'static,
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
    ) -> Result<IMap<'a, R>>
    where
        F: Fn(A) -> R + Copy + Send + 'static,
        A: Serialize + DeserializeOwned + 'a,
        R: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator<Item = A>,
        I::IntoIter: 'a,
    {
        IMap::new(self, f, iterable.into_iter(), chunksize, true)
    }

    /// Like [`imap`](Pool::imap) but yields results as they complete (Python's
    /// `imap_unordered`).
    pub fn imap_unordered<'a, F, A, R, I>(&self, f: F, iterable: I) -> Result<IMap<'a, R>>
    where
        F: Fn(A) -> R + Copy + Send + 'static,
        A: Serialize + DeserializeOwned + 'a,
        R: Serialize + DeserializeOwned + Send + 'static,
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
    ) -> Result<IMap<'a, R>>
    where
        F: Fn(A) -> R + Copy + Send + 'static,
        A: Serialize + DeserializeOwned + 'a,
        R: Serialize + DeserializeOwned + Send + 'static,
        I: IntoIterator<Item = A>,
        I::IntoIter: 'a,
    {
        IMap::new(self, f, iterable.into_iter(), chunksize, false)
    }

    /// No more tasks may be submitted; the workers exit once the outstanding work is done
    /// ([`join`](Pool::join) waits for that).
    pub fn close(&self) {
        let mut g = self.inner.lock();
        if g.state == PoolState::Running {
            g.state = PoolState::Closed;
        }
    }

    /// Kills the workers now; outstanding tasks fail with [`Error::PoolTerminated`].
    pub fn terminate(&self) {
        self.inner.terminate();
    }

    /// Waits for the workers to exit; call [`close`](Pool::close) or
    /// [`terminate`](Pool::terminate) first.
    pub fn join(&self) -> Result<()> {
        self.inner.join()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.inner.terminate();
    }
}

impl Context {
    /// A pool of `processes` workers started with this context's method.
    ///
    /// ```
    /// use multiproc::{get_context, StartMethod};
    /// fn one(_: ()) -> u8 {
    ///     1
    /// }
    /// let pool = get_context(StartMethod::Fork).pool(1).unwrap();
    /// assert_eq!(pool.apply(one, ()).unwrap(), 1);
    /// ```
    pub fn pool(&self, processes: usize) -> Result<Pool> {
        self.pool_builder().processes(processes).build()
    }

    /// A [`PoolBuilder`] with this context's method.
    pub fn pool_builder(&self) -> PoolBuilder {
        Pool::builder().context(*self)
    }
}

// ---------------------------------------------------------------------------------------------
// AsyncResult
// ---------------------------------------------------------------------------------------------

/// A callback on a typed result.
type ResultHook<T> = Box<dyn FnOnce(&Result<T>) + Send>;

/// The result of an `*_async` call (Python's `AsyncResult`). Also a [`Future`].
///
/// ```
/// fn sq(x: u32) -> u32 {
///     x * x
/// }
/// let pool = multiproc::Pool::new(1).unwrap();
/// let seen = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
/// let s = seen.clone();
/// let r = pool
///     .apply_async(sq, 7)
///     .unwrap()
///     .callback(move |v| s.store(*v, std::sync::atomic::Ordering::SeqCst));
/// assert_eq!(r.get().unwrap(), 49);
/// assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 49);
/// ```
pub struct AsyncResult<T> {
    inner: Arc<Inner>,
    job: JobId,
    extract: fn(Box<dyn Sink>) -> Result<T>,
}

impl<T> std::fmt::Debug for AsyncResult<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncResult")
            .field("job", &self.job)
            .finish()
    }
}

impl<T: Send + 'static> AsyncResult<T> {
    fn new(inner: Arc<Inner>, job: JobId, extract: fn(Box<dyn Sink>) -> Result<T>) -> Self {
        AsyncResult {
            inner,
            job,
            extract,
        }
    }

    fn finished(&self, g: &Core) -> bool {
        g.jobs.get(&self.job).is_none_or(|j| j.finished())
    }

    /// Turns the finished job's sink into its value (kept in the job until taken).
    fn settle(&self, g: &mut Core) {
        let extract = self.extract;
        if let Some(j) = g.jobs.get_mut(&self.job) {
            if j.value.is_none() && j.finished() {
                if let Some(s) = j.sink.take() {
                    j.value = Some(Box::new(extract(s)));
                }
            }
        }
    }

    fn take(&self, g: &mut Core) -> Result<T> {
        self.settle(g);
        let j = g
            .jobs
            .get_mut(&self.job)
            .ok_or_else(|| Error::state("the result was already taken"))?;
        let v = j
            .value
            .take()
            .ok_or_else(|| Error::state("the result was already taken"))?;
        g.jobs.remove(&self.job);
        *v.downcast::<Result<T>>().expect("typed result")
    }

    /// Whether the result is there.
    pub fn ready(&self) -> bool {
        let g = self.inner.lock();
        self.finished(&g)
    }

    /// Waits until the result is there.
    pub fn wait(&self) {
        let g = self.inner.lock();
        let (g, _) = self.inner.wait_until(g, |c| self.finished(c), None);
        drop(g);
    }

    /// Waits at most `timeout`; true if the result is there.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let g = self.inner.lock();
        let deadline = Instant::now() + timeout;
        let (g, ok) = self
            .inner
            .wait_until(g, |c| self.finished(c), Some(deadline));
        drop(g);
        ok
    }

    /// Whether the call completed without error; an error if it is not ready yet (as Python's
    /// `ValueError`).
    pub fn successful(&self) -> Result<bool> {
        let mut g = self.inner.lock();
        if !self.finished(&g) {
            return Err(Error::state("result is not ready"));
        }
        self.settle(&mut g);
        let j = g
            .jobs
            .get(&self.job)
            .ok_or_else(|| Error::state("the result was already taken"))?;
        let v = j
            .value
            .as_ref()
            .ok_or_else(|| Error::state("the result was already taken"))?;
        Ok(v.downcast_ref::<Result<T>>().is_some_and(|r| r.is_ok()))
    }

    /// Waits for the result and returns it.
    pub fn get(self) -> Result<T> {
        let g = self.inner.lock();
        let (mut g, _) = self.inner.wait_until(g, |c| self.finished(c), None);
        self.take(&mut g)
    }

    /// Waits at most `timeout` for the result: [`Error::Timeout`] if it is not there then (it
    /// can still be taken later).
    pub fn get_timeout(&self, timeout: Duration) -> Result<T> {
        let g = self.inner.lock();
        let deadline = Instant::now() + timeout;
        let (mut g, ok) = self
            .inner
            .wait_until(g, |c| self.finished(c), Some(deadline));
        if !ok {
            return Err(Error::Timeout);
        }
        self.take(&mut g)
    }

    fn add_hook(self, f: ResultHook<T>) -> Self {
        let extract = self.extract;
        let mut g = self.inner.lock();
        if self.finished(&g) {
            self.settle(&mut g);
            let v = g.jobs.get_mut(&self.job).and_then(|j| j.value.take());
            drop(g);
            if let Some(v) = v {
                if let Some(r) = v.downcast_ref::<Result<T>>() {
                    f(r);
                }
                let mut g = self.inner.lock();
                if let Some(j) = g.jobs.get_mut(&self.job) {
                    j.value = Some(v);
                }
            }
            return self;
        }
        let prev = match g.jobs.get_mut(&self.job) {
            Some(j) => j.hook.take(),
            None => {
                drop(g);
                return self;
            }
        };
        let j = g.jobs.get_mut(&self.job).expect("just seen");
        j.hook = Some(Box::new(move |sink: Box<dyn Sink>| {
            let v: Box<dyn Any + Send> = match prev {
                Some(p) => p(sink),
                None => Box::new(extract(sink)),
            };
            if let Some(r) = v.downcast_ref::<Result<T>>() {
                f(r);
            }
            v
        }));
        self.inner.urgent(&mut g);
        drop(g);
        self
    }

    /// Calls `f` with the value when the call succeeds (Python's `callback`).
    pub fn callback(self, f: impl FnOnce(&T) + Send + 'static) -> Self {
        self.add_hook(Box::new(move |r| {
            if let Ok(v) = r {
                f(v)
            }
        }))
    }

    /// Calls `f` with the error when the call fails (Python's `error_callback`).
    pub fn error_callback(self, f: impl FnOnce(&Error) + Send + 'static) -> Self {
        self.add_hook(Box::new(move |r| {
            if let Err(e) = r {
                f(e)
            }
        }))
    }
}

impl<T> Drop for AsyncResult<T> {
    fn drop(&mut self) {
        let mut g = self.inner.lock();
        let remove = match g.jobs.get_mut(&self.job) {
            Some(j) => {
                j.detached = true;
                j.finished()
            }
            None => false,
        };
        if remove {
            g.jobs.remove(&self.job);
        }
    }
}

impl<T: Send + 'static> Future for AsyncResult<T> {
    type Output = Result<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Result<T>> {
        let this = self.get_mut();
        let mut g = this.inner.lock();
        if this.finished(&g) {
            return Poll::Ready(this.take(&mut g));
        }
        if let Some(j) = g.jobs.get_mut(&this.job) {
            j.waker = Some(cx.waker().clone());
        }
        this.inner.urgent(&mut g);
        Poll::Pending
    }
}

// ---------------------------------------------------------------------------------------------
// IMap
// ---------------------------------------------------------------------------------------------

/// Results of an `imap` job, per item, in the order they are to be yielded.
struct StreamSink<R> {
    ordered: bool,
    next_index: u32,
    pending: BTreeMap<u32, Vec<Result<R>>>,
    ready: VecDeque<Result<R>>,
}

impl<R: DeserializeOwned + Send + 'static> Sink for StreamSink<R> {
    fn deliver(&mut self, index: u32, items: u32, outcome: Result<&[u8]>) {
        let mut out: Vec<Result<R>> = Vec::with_capacity(items as usize);
        match outcome.and_then(worker::decode_results::<Decoded<R>>) {
            Ok((res, errs)) => {
                let mut errs = errs.into_iter().peekable();
                let mut res = res.into_iter();
                for i in 0..items {
                    if errs.peek().is_some_and(|e| e.0 == i) {
                        out.push(Err(item_error(errs.next().expect("peeked"))));
                    } else {
                        match res.next() {
                            Some(v) => out.push(Ok(v)),
                            None => out.push(Err(Error::Decode("missing result".into()))),
                        }
                    }
                }
            }
            Err(e) => {
                for _ in 0..items {
                    out.push(Err(clone_error(&e)));
                }
            }
        }
        if !self.ordered {
            self.ready.extend(out);
            return;
        }
        self.pending.insert(index, out);
        while let Some(v) = self.pending.remove(&self.next_index) {
            self.ready.extend(v);
            self.next_index += 1;
        }
    }
    fn as_any(&mut self) -> &mut dyn Any {
        self
    }
}

type Feed<'a> = Box<dyn FnMut(&mut Vec<u8>) -> Result<Option<(u32, Vec<OwnedFd>)>> + 'a>;

/// The iterator [`Pool::imap`] and [`Pool::imap_unordered`] return: `Result<R>` per input item,
/// in input order (`imap`) or completion order (`imap_unordered`).
pub struct IMap<'a, R> {
    inner: Arc<Inner>,
    job: JobId,
    feed: Option<Feed<'a>>,
    chunk_fn: Arc<Vec<u8>>,
    next_chunk: u32,
    /// Items submitted and not yet yielded.
    outstanding: usize,
    window_items: usize,
    _r: std::marker::PhantomData<fn() -> R>,
}

impl<R> std::fmt::Debug for IMap<'_, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IMap").field("job", &self.job).finish()
    }
}

impl<'a, R: DeserializeOwned + Send + 'static> IMap<'a, R> {
    fn new<F, A, I>(pool: &Pool, _f: F, mut it: I, chunksize: usize, ordered: bool) -> Result<Self>
    where
        F: Fn(A) -> R + Copy + Send + 'static,
        A: Serialize + DeserializeOwned + 'a,
        R: Serialize,
        I: Iterator<Item = A> + 'a,
    {
        if chunksize == 0 {
            return Err(Error::arg("chunksize must be at least 1"));
        }
        let mut g = pool.inner.lock();
        pool.check_running(&g)?;
        let sink = StreamSink::<R> {
            ordered,
            next_index: 0,
            pending: BTreeMap::new(),
            ready: VecDeque::new(),
        };
        let job = pool.inner.new_job(&mut g, Box::new(sink), true);
        drop(g);
        let mut chunk: Vec<A> = Vec::with_capacity(chunksize);
        let feed: Feed<'a> = Box::new(move |buf: &mut Vec<u8>| {
            chunk.clear();
            chunk.extend(it.by_ref().take(chunksize));
            if chunk.is_empty() {
                return Ok(None);
            }
            let fds = worker::encode_items(&chunk[..], buf)?;
            Ok(Some((chunk.len() as u32, fds)))
        });
        let processes = pool.processes();
        let mut m = IMap {
            inner: Arc::clone(&pool.inner),
            job,
            feed: Some(feed),
            chunk_fn: Arc::new(worker::chunk_fn_id(worker::chunk_fn::<F, A, R>())),
            next_chunk: 0,
            outstanding: 0,
            window_items: (processes * 66 * chunksize).max(64),
            _r: std::marker::PhantomData,
        };
        m.top_up()?;
        Ok(m)
    }

    /// Reads input and submits chunks until the window is full or the input ends.
    fn top_up(&mut self) -> Result<()> {
        let Some(feed) = self.feed.as_mut() else {
            return Ok(());
        };
        let mut buf = Vec::new();
        let mut spans = Vec::new();
        let mut ended = false;
        let mut added = 0;
        while self.outstanding + added < self.window_items {
            let start = buf.len();
            match feed(&mut buf)? {
                Some((n, fds)) => {
                    spans.push((start, buf.len(), n, fds));
                    added += n as usize;
                }
                None => {
                    ended = true;
                    break;
                }
            }
        }
        self.outstanding += added;
        let payload = Arc::new(buf);
        let mut g = self.inner.lock();
        let tasks: Vec<Task> = spans
            .into_iter()
            .map(|(s, e, n, fds)| {
                let index = self.next_chunk;
                self.next_chunk += 1;
                Task {
                    job: self.job,
                    index,
                    items: n,
                    chunk_fn: Arc::clone(&self.chunk_fn),
                    payload: Arc::clone(&payload),
                    range: (s, e),
                    fds,
                    attempts: 0,
                }
            })
            .collect();
        if g.state == PoolState::Terminated {
            // Nothing will run them: fail them as a terminated pool does.
            ended = true;
        }
        if !tasks.is_empty() {
            self.inner.submit(&mut g, tasks);
        }
        if ended {
            self.feed = None;
            self.inner.close_job(&mut g, self.job);
        }
        Ok(())
    }
}

impl<R: DeserializeOwned + Send + 'static> Iterator for IMap<'_, R> {
    type Item = Result<R>;

    fn next(&mut self) -> Option<Result<R>> {
        if self.feed.is_some() && self.outstanding < self.window_items / 2 {
            if let Err(e) = self.top_up() {
                self.feed = None;
                let mut g = self.inner.lock();
                self.inner.close_job(&mut g, self.job);
                return Some(Err(e));
            }
        }
        let job = self.job;
        let g = self.inner.lock();
        let (mut g, _) = self.inner.wait_until(
            g,
            |c| match c.jobs.get_mut(&job) {
                None => true,
                Some(j) => {
                    let done = j.remaining == 0 && !j.open;
                    let has = j
                        .sink
                        .as_mut()
                        .and_then(|s| s.as_any().downcast_mut::<StreamSink<R>>())
                        .is_some_and(|s| !s.ready.is_empty());
                    has || done
                }
            },
            None,
        );
        let item = g.jobs.get_mut(&job).and_then(|j| {
            j.sink
                .as_mut()
                .and_then(|s| s.as_any().downcast_mut::<StreamSink<R>>())
                .and_then(|s| s.ready.pop_front())
        });
        if item.is_some() {
            self.outstanding = self.outstanding.saturating_sub(1);
        }
        drop(g);
        item
    }
}

impl<R> Drop for IMap<'_, R> {
    fn drop(&mut self) {
        let mut g = self.inner.lock();
        let remove = match g.jobs.get_mut(&self.job) {
            Some(j) => {
                j.detached = true;
                j.open = false;
                j.remaining == 0
            }
            None => false,
        };
        if remove {
            g.jobs.remove(&self.job);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Deserializer, Serializer};
    use std::os::fd::{AsFd, OwnedFd};
    use std::time::{Duration, Instant};

    #[test]
    fn python_default_chunksize() {
        assert_eq!(default_chunksize(1_000_000, 2), 125_000);
        assert_eq!(default_chunksize(0, 4), 1);
        assert_eq!(default_chunksize(5, 4), 1);
        assert_eq!(default_chunksize(17, 1), 5);
    }

    /// A handle as other modules make them: its descriptor travels with the message.
    #[derive(Debug)]
    struct PipeEnd(OwnedFd);

    impl Serialize for PipeEnd {
        fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
            codec::serialize_fd(self.0.as_fd(), s)
        }
    }

    impl<'de> Deserialize<'de> for PipeEnd {
        fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
            codec::deserialize_fd(d).map(PipeEnd)
        }
    }

    fn write_tag((w, tag): (PipeEnd, u8)) -> u8 {
        crate::platform::write(w.0.as_fd(), &[tag]).expect("write");
        tag + 1
    }

    fn read_n(r: &OwnedFd, n: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < n && Instant::now() < deadline {
            if crate::platform::poll_read(r.as_fd(), Some(Duration::from_millis(100))).unwrap() {
                let mut b = [0u8; 64];
                let k = crate::platform::read(r.as_fd(), &mut b).unwrap();
                got.extend_from_slice(&b[..k]);
            }
        }
        got
    }

    #[test]
    fn handles_in_arguments_travel_with_the_task() {
        let (r, w) = crate::platform::pipe().unwrap();
        let pool = Pool::new(2).unwrap();
        let dup = |fd: &OwnedFd| PipeEnd(crate::platform::dup(fd.as_fd()).unwrap());
        assert_eq!(pool.apply(write_tag, (dup(&w), 7)).unwrap(), 8);
        // A whole chunk of handles, and the imap path.
        let args: Vec<(PipeEnd, u8)> = (10..20).map(|t| (dup(&w), t)).collect();
        assert_eq!(
            pool.map_chunksize(write_tag, args, 4).unwrap(),
            (11..21).collect::<Vec<u8>>()
        );
        let args: Vec<(PipeEnd, u8)> = (30..33).map(|t| (dup(&w), t)).collect();
        let got: Vec<u8> = pool
            .imap(write_tag, args)
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(got, vec![31, 32, 33]);
        drop(w);
        let mut tags = read_n(&r, 14);
        tags.sort();
        let mut want: Vec<u8> = std::iter::once(7).chain(10..20).chain(30..33).collect();
        want.sort();
        assert_eq!(tags, want);
    }

    /// Runs in a child: makes a pool, reports its workers' pids, then waits to be killed.
    fn pool_owner(w: PipeEnd) {
        let pool = Pool::new(2).unwrap();
        let pids = pool.worker_pids();
        let mut msg = Vec::new();
        for p in pids {
            msg.extend_from_slice(&p.to_le_bytes());
        }
        crate::platform::write(w.0.as_fd(), &msg).unwrap();
        std::thread::sleep(Duration::from_secs(60));
    }

    fn alive(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(s) => !matches!(
                s.rsplit(')')
                    .next()
                    .map(str::trim)
                    .and_then(|t| t.chars().next()),
                Some('Z' | 'X')
            ),
            Err(_) => false,
        }
    }

    #[test]
    fn workers_die_with_a_killed_pool_owner() {
        let (r, w) = crate::platform::pipe().unwrap();
        let mut owner = crate::Process::new(pool_owner, PipeEnd(w));
        owner.start().unwrap();
        let bytes = read_n(&r, 8);
        assert_eq!(bytes.len(), 8, "the owner never reported its workers");
        let pids: Vec<u32> = bytes
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert!(pids.iter().all(|&p| alive(p)));
        owner.kill().unwrap();
        owner.join().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids.iter().any(|&p| alive(p)) {
            assert!(
                Instant::now() < deadline,
                "pool workers outlived their owner: {pids:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
