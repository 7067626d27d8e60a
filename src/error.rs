//! The crate's one error type.
//!
//! Every fallible operation in `multiproc` returns [`Result<T>`](crate::Result), whose error is
//! [`Error`]. The variants are meant to be matched on: a pool task that panicked is
//! [`Error::Panicked`], a worker that died under it is [`Error::WorkerLost`], a queue that is
//! empty is [`Error::Empty`], and so on.

use std::fmt;

/// How a child process ended, as the kernel reported it.
///
/// [`ExitStatus::code`] folds it into Python's `exitcode` convention: the exit code for a normal
/// exit, minus the signal number for a death by signal.
///
/// ```
/// use multiproc::ExitStatus;
/// assert_eq!(ExitStatus::Signaled(9).code(), -9);
/// assert_eq!(ExitStatus::Exited(3).code(), 3);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ExitStatus {
    /// The process called `exit` (or returned from its entry) with this code.
    Exited(i32),
    /// The process was killed by this signal number.
    Signaled(i32),
}

impl ExitStatus {
    /// Python's `exitcode`: the exit code, or `-signal` for a death by signal.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Exited(c) => c,
            ExitStatus::Signaled(s) => -s,
        }
    }

    /// True for `exit(0)`.
    pub fn success(self) -> bool {
        self == ExitStatus::Exited(0)
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Exited(c) => write!(f, "exit code {c}"),
            ExitStatus::Signaled(s) => write!(f, "signal {s} ({})", signal_name(*s)),
        }
    }
}

/// A short name for the common signals, for messages.
pub(crate) fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        _ => "signal",
    }
}

/// Everything that can go wrong in `multiproc`.
///
/// ```
/// use multiproc::Error;
/// fn describe(e: &Error) -> &'static str {
///     match e {
///         Error::Panicked { .. } => "the task panicked",
///         Error::WorkerLost { .. } => "the worker died",
///         Error::Timeout => "too slow",
///         _ => "something else",
///     }
/// }
/// assert_eq!(describe(&Error::Timeout), "too slow");
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system call failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),

    /// A value could not be serialized (it fails in the caller, at `send`/`put`/`apply`).
    #[error("could not serialize value: {0}")]
    Encode(String),

    /// Bytes could not be deserialized into the expected type.
    #[error("could not deserialize value: {0}")]
    Decode(String),

    /// The task's function panicked. `message` is the panic payload, `backtrace` is the
    /// backtrace captured in the process where it ran (may be empty when backtraces are off).
    #[error("task panicked: {message}")]
    Panicked {
        /// The panic message.
        message: String,
        /// The backtrace captured at the panic, as text.
        backtrace: String,
    },

    /// The process running the task died (a signal, `abort`, `exit`) before answering.
    #[error("worker process {pid} was lost: {status}")]
    WorkerLost {
        /// The pid of the process that died.
        pid: u32,
        /// How it ended.
        status: ExitStatus,
    },

    /// A bounded wait ran out of time.
    #[error("timed out")]
    Timeout,

    /// A non-blocking `get` found nothing (or a timed `get` timed out on an empty queue).
    #[error("queue is empty")]
    Empty,

    /// A non-blocking `put` found a bounded queue full.
    #[error("queue is full")]
    Full,

    /// The object was closed (a queue, a connection, a pool): no more operations.
    #[error("closed")]
    Closed,

    /// The peer closed its end or died: nothing more will arrive.
    #[error("end of file: the peer closed the connection or died")]
    Eof,

    /// A frame announced a length above the connection's limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The announced length.
        len: u64,
        /// The limit in force.
        max: u64,
    },

    /// A frame was structurally invalid (bad header, truncated, wrong file-descriptor count).
    #[error("malformed frame: {0}")]
    MalformedFrame(String),

    /// A child was started from a different build of the program than its parent's, so function
    /// identities cannot be trusted; it refused the task.
    #[error(
        "build id mismatch: the parent runs build {parent} but the child binary is build {child}; \
         a child refuses tasks from a different build of the program"
    )]
    BuildIdMismatch {
        /// The parent's build id, hex.
        parent: String,
        /// The child's build id, hex.
        child: String,
    },

    /// The HMAC challenge of a `Listener`/`Client` failed: a wrong key or a wrong protocol.
    #[error("authentication failed: {0}")]
    AuthenticationError(String),

    /// The previous holder of a process-shared lock died while holding it. The lock is now held
    /// by the caller (see the lock's documentation for how to recover).
    #[error("the previous owner of the lock died while holding it")]
    OwnerDied,

    /// A barrier was aborted or reset while threads or processes waited on it.
    #[error("broken barrier")]
    BrokenBarrier,

    /// The operation does not fit the object's state (starting a process twice, joining one
    /// never started, releasing a semaphore above its bound, ...).
    #[error("invalid state: {0}")]
    InvalidState(String),

    /// A value or argument was out of range or not supported here.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The pool was terminated (or dropped) before the task finished.
    #[error("the pool was terminated before the task finished")]
    PoolTerminated,

    /// A remote object (a manager proxy) reported an error of its own.
    #[error("remote error: {0}")]
    Remote(String),
}

impl Error {
    pub(crate) fn state(msg: impl Into<String>) -> Self {
        Error::InvalidState(msg.into())
    }

    pub(crate) fn arg(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    /// The last OS error as an [`Error::Io`].
    pub(crate) fn last_os() -> Self {
        Error::Io(std::io::Error::last_os_error())
    }
}

/// `Result<T, multiproc::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
