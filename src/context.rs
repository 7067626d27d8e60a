//! Start methods and contexts, as in Python's `multiprocessing.context`.
//!
//! A [`Context`] fixes how children start; it offers the same constructors as the crate root
//! (each module adds its own: `ctx.process(..)`, `ctx.pool(..)`, ...). The crate root uses the
//! global default, [`get_start_method`], which is [`StartMethod::ForkServer`] unless
//! [`set_start_method`] changed it.

use std::sync::atomic::{AtomicU8, Ordering};

use serde::{Deserialize, Serialize};

/// How a child process starts. See `src/start/README.md` for what each one inherits.
///
/// ```
/// use multiproc::StartMethod;
/// assert_eq!(StartMethod::default(), StartMethod::ForkServer);
/// assert_eq!("spawn".parse::<StartMethod>().unwrap(), StartMethod::Spawn);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum StartMethod {
    /// `fork()` the calling process: fastest, inherits everything (including the state of locks
    /// other threads held: unsafe in multithreaded programs, as in Python). Only this method can
    /// run a capturing closure ([`Process::from_closure`](crate::Process::from_closure)).
    Fork,
    /// Ask a small single-threaded server, started from a fresh copy of the program, to fork the
    /// child. Safe in multithreaded programs and nearly as fast as `fork`. The default.
    #[default]
    ForkServer,
    /// Re-execute the program's binary; the child enters before `main` and runs only the task.
    /// Slowest, inherits nothing but what it is sent.
    Spawn,
}

impl StartMethod {
    /// Python's name for it.
    pub fn name(self) -> &'static str {
        match self {
            StartMethod::Fork => "fork",
            StartMethod::ForkServer => "forkserver",
            StartMethod::Spawn => "spawn",
        }
    }

    /// All methods, in Python's order.
    pub const ALL: [StartMethod; 3] = [
        StartMethod::Fork,
        StartMethod::ForkServer,
        StartMethod::Spawn,
    ];

    fn to_u8(self) -> u8 {
        match self {
            StartMethod::Fork => 0,
            StartMethod::ForkServer => 1,
            StartMethod::Spawn => 2,
        }
    }

    fn from_u8(v: u8) -> StartMethod {
        match v {
            0 => StartMethod::Fork,
            2 => StartMethod::Spawn,
            _ => StartMethod::ForkServer,
        }
    }
}

impl std::fmt::Display for StartMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for StartMethod {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "fork" => Ok(StartMethod::Fork),
            "forkserver" => Ok(StartMethod::ForkServer),
            "spawn" => Ok(StartMethod::Spawn),
            other => Err(crate::Error::arg(format!(
                "unknown start method {other:?} (expected fork, forkserver or spawn)"
            ))),
        }
    }
}

static DEFAULT_METHOD: AtomicU8 = AtomicU8::new(1);

/// Sets the start method used by the crate-root constructors ([`Process::new`](crate::Process::new),
/// [`Pool::new`](crate::Pool::new), ...). Unlike Python this may be called more than once; it
/// affects objects created afterwards.
///
/// ```
/// use multiproc::{set_start_method, get_start_method, StartMethod};
/// set_start_method(StartMethod::Spawn);
/// assert_eq!(get_start_method(), StartMethod::Spawn);
/// set_start_method(StartMethod::ForkServer);
/// ```
pub fn set_start_method(method: StartMethod) {
    DEFAULT_METHOD.store(method.to_u8(), Ordering::Relaxed);
}

/// The start method the crate-root constructors use (default [`StartMethod::ForkServer`]).
pub fn get_start_method() -> StartMethod {
    StartMethod::from_u8(DEFAULT_METHOD.load(Ordering::Relaxed))
}

/// Python's `get_all_start_methods()`.
pub fn get_all_start_methods() -> [StartMethod; 3] {
    StartMethod::ALL
}

/// A context: the crate's constructors bound to one start method.
///
/// ```
/// use multiproc::{get_context, StartMethod};
/// let ctx = get_context(StartMethod::Fork);
/// assert_eq!(ctx.start_method(), StartMethod::Fork);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Context {
    method: StartMethod,
}

impl Context {
    /// The context's start method.
    pub fn start_method(&self) -> StartMethod {
        self.method
    }

    /// The context of the current global default.
    pub fn default_context() -> Context {
        get_context(get_start_method())
    }
}

impl Default for Context {
    fn default() -> Self {
        Context::default_context()
    }
}

/// The context for `method`.
pub fn get_context(method: StartMethod) -> Context {
    Context { method }
}
