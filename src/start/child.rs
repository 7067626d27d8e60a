//! The child side: what every new child runs, whatever started it.

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Once;

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::error::{Error, Result};
use crate::frame;
use crate::function::{self, FnId};
use crate::platform;
use crate::process::{self, ProcessInfo};

/// Exit code of a child that refused its task (a different build, or an unreadable task).
pub(crate) const EXIT_REFUSED: i32 = 121;

/// What a parent sends down the boot socket. The payload's descriptors ride with the frame.
#[derive(Serialize, Deserialize, Debug)]
pub(crate) struct ChildTask {
    /// The parent's [`function::build_id`].
    pub(crate) build_id: Vec<u8>,
    /// The entry point ([`function::Entry`]) to call.
    pub(crate) entry: FnId,
    /// The encoded arguments.
    pub(crate) payload: Vec<u8>,
    /// Who the child is (name, identity, daemon flag, parent).
    pub(crate) info: ProcessInfo,
    /// Whether the parent waits for an [`Outcome`] on the boot socket.
    pub(crate) want_result: bool,
}

/// What a child sends back when `want_result` is set.
#[derive(Serialize, Deserialize, Debug)]
pub(crate) enum Outcome {
    /// The entry returned; these are the encoded result bytes.
    Returned(Vec<u8>),
    /// The entry panicked.
    Panicked {
        /// Panic message.
        message: String,
        /// Backtrace text.
        backtrace: String,
    },
    /// The entry failed before or after running (arguments that did not decode, ...).
    Failed(String),
    /// The child is a different build than the parent.
    BuildIdMismatch {
        /// Parent's build id, hex.
        parent: String,
        /// Child's build id, hex.
        child: String,
    },
}

impl Outcome {
    /// Converts into the caller's result.
    pub(crate) fn into_result(self) -> Result<Vec<u8>> {
        match self {
            Outcome::Returned(b) => Ok(b),
            Outcome::Panicked { message, backtrace } => Err(Error::Panicked { message, backtrace }),
            Outcome::Failed(m) => Err(Error::Remote(m)),
            Outcome::BuildIdMismatch { parent, child } => {
                Err(Error::BuildIdMismatch { parent, child })
            }
        }
    }
}

/// Largest task a child accepts on its boot socket.
const MAX_TASK: u64 = 1 << 31;

/// The life of a child: read the task, check the build, run, report, exit. Never returns.
pub(crate) fn child_main(boot: OwnedFd) -> ! {
    let code = match run_task(&boot) {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "multiproc child {}: {e}", platform::getpid());
            EXIT_REFUSED
        }
    };
    flush_stdio();
    platform::exit_now(code)
}

fn run_task(boot: &OwnedFd) -> Result<i32> {
    let (bytes, fds) = frame::recv_frame(boot.as_fd(), MAX_TASK)?;
    let task: ChildTask = codec::decode_plain(&bytes)?;
    drop(bytes);
    if let Err(Error::BuildIdMismatch { parent, child }) = function::check_build_id(&task.build_id)
    {
        let msg = Error::BuildIdMismatch {
            parent: parent.clone(),
            child: child.clone(),
        }
        .to_string();
        if task.want_result {
            send_outcome(boot, &Outcome::BuildIdMismatch { parent, child });
        }
        return Err(Error::Remote(msg));
    }
    if task.info.daemon {
        platform::die_with_parent(task.info.parent_pid);
    }
    process::set_current(task.info);
    // SAFETY: the build id matched, so `entry` was made by `entry_id` in the same executable.
    let entry = unsafe { function::entry_from_id(task.entry) };
    let (outcome, code) = match catch_panic(|| entry(&task.payload, fds), true) {
        Ok(Ok(r)) => (Outcome::Returned(r), 0),
        Ok(Err(e)) => {
            let _ = writeln!(
                std::io::stderr(),
                "Process {}: {e}",
                process::current_process().name()
            );
            (Outcome::Failed(e.to_string()), 1)
        }
        Err(Error::Panicked { message, backtrace }) => {
            (Outcome::Panicked { message, backtrace }, 1)
        }
        Err(e) => (Outcome::Failed(e.to_string()), 1),
    };
    if task.want_result {
        send_outcome(boot, &outcome);
    }
    Ok(code)
}

fn send_outcome(boot: &OwnedFd, outcome: &Outcome) {
    let mut buf = Vec::new();
    if codec::encode_plain(outcome, &mut buf).is_ok() {
        // The parent may have gone away: nothing to do about it here.
        let _ = frame::send_frame(boot.as_fd(), &buf, &[]);
    }
}

/// Flushes Rust's buffered standard output before a child `_exit`s.
pub(crate) fn flush_stdio() {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
}

thread_local! {
    static LAST_PANIC: std::cell::RefCell<Option<(String, String)>> =
        const { std::cell::RefCell::new(None) };
    static CAPTURING: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Runs `f`, turning a panic into [`Error::Panicked`] with its message and backtrace. With
/// `print`, the panic is also reported on standard error as Rust normally does (a `Process`
/// does that, as Python prints a traceback); pool workers pass `false`.
pub(crate) fn catch_panic<R>(f: impl FnOnce() -> R, print: bool) -> Result<R> {
    install_hook();
    let prev = CAPTURING.with(|c| c.replace(Some(print)));
    let r = catch_unwind(AssertUnwindSafe(f));
    CAPTURING.with(|c| c.set(prev));
    r.map_err(|payload| {
        let (message, backtrace) = LAST_PANIC
            .with(|p| p.borrow_mut().take())
            .unwrap_or_else(|| (payload_message(&*payload), String::new()));
        Error::Panicked { message, backtrace }
    })
}

fn payload_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "Box<dyn Any>".to_string()
    }
}

fn install_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            match CAPTURING.with(|c| c.get()) {
                Some(print) => {
                    let message = payload_message(info.payload());
                    let message = match info.location() {
                        Some(l) => format!("{message} (at {}:{})", l.file(), l.line()),
                        None => message,
                    };
                    let bt = std::backtrace::Backtrace::force_capture().to_string();
                    LAST_PANIC.with(|p| *p.borrow_mut() = Some((message, bt)));
                    if print {
                        prev(info);
                    }
                }
                None => prev(info),
            }
        }));
    });
}
