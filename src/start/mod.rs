//! The start-method seam: how a child process comes to exist. See `README.md` beside this file.
//!
//! Every method produces the same thing, a [`Launched`] child that is a direct child of the
//! calling process (so it can be waited on through a pidfd) and that runs
//! [`child::child_main`] on its end of a *boot socket*, down which [`launch_task`] sends a
//! [`child::ChildTask`]. Nothing above this module knows which method made the child.

pub(crate) mod child;
mod fork;
mod forkserver;
mod spawn;

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use crate::context::StartMethod;
use crate::error::{Error, Result};
use crate::frame;
use crate::platform;

pub(crate) use child::{ChildTask, Outcome};

/// A child that was just started.
#[derive(Debug)]
pub(crate) struct Launched {
    /// Its process id.
    pub(crate) pid: u32,
    /// A pidfd: readable when it exits, and the handle to signal and reap it.
    pub(crate) pidfd: OwnedFd,
    /// The parent's end of the boot socket (a `SOCK_STREAM` Unix socket).
    pub(crate) boot: OwnedFd,
}

/// Largest task frame queued in the boot socket *before* the child exists (the socket's buffer
/// holds it, so the new child finds its task at once instead of waiting for a later wake-up).
const PRELOAD_MAX: usize = 64 * 1024;

/// Starts a child with `method` and delivers `task` (with `fds`) to it.
pub(crate) fn launch_task(
    method: StartMethod,
    task: &ChildTask,
    fds: &[RawFd],
) -> Result<Launched> {
    let mut buf = Vec::new();
    crate::codec::encode_plain(task, &mut buf)?;
    let (parent_end, child_end) = platform::socketpair(libc::SOCK_STREAM)?;
    let preload = buf.len() <= PRELOAD_MAX;
    if preload {
        frame::send_frame(parent_end.as_fd(), &buf, fds)?;
    }
    let l = launch_on(method, parent_end, child_end)?;
    if !preload {
        if let Err(e) = frame::send_frame(l.boot.as_fd(), &buf, fds) {
            let _ = platform::pidfd_send_signal(l.pidfd.as_fd(), libc::SIGKILL);
            let _ = platform::pidfd_wait(l.pidfd.as_fd(), true);
            return Err(e);
        }
    }
    Ok(l)
}

fn launch_on(method: StartMethod, parent_end: OwnedFd, child_end: OwnedFd) -> Result<Launched> {
    let parent_raw = parent_end.as_raw_fd();
    let pid = on_long_lived_thread(move || make_child(method, parent_raw, child_end))??;
    finish_launch(pid, parent_end)
}

/// Runs `f` on a thread that lives as long as the process: the calling thread if it is the main
/// thread, else the process-wide launcher thread.
///
/// Why: `PR_SET_PDEATHSIG`, which makes daemon children die with their parent, fires when the
/// *thread* that created the child exits, not the process. A child made from a short-lived thread
/// (a test, a pool's helper, a caller's worker thread) would be killed when that thread ends. The
/// fork server's children inherit the thread that started the server as their parent thread, so
/// the server is started here too. A forked copy of the process has the launcher's channel but
/// not its thread, so the launcher is recreated when the pid changes.
fn on_long_lived_thread<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> Result<R> {
    let me = platform::getpid();
    if platform::gettid() == me {
        return Ok(f());
    }
    type Job = Box<dyn FnOnce() + Send>;
    static LAUNCHER: std::sync::Mutex<Option<(u32, std::sync::mpsc::Sender<Job>)>> =
        std::sync::Mutex::new(None);
    let tx = {
        let mut g = LAUNCHER.lock().unwrap_or_else(|p| p.into_inner());
        match g.as_ref() {
            Some((pid, tx)) if *pid == me => tx.clone(),
            _ => {
                if let Some(old) = g.take() {
                    // Inherited through fork: its thread does not exist here.
                    std::mem::forget(old);
                }
                let (tx, rx) = std::sync::mpsc::channel::<Job>();
                std::thread::Builder::new()
                    .name("multiproc-launcher".into())
                    .spawn(move || {
                        for job in rx {
                            // A panicking launch must not take the launcher down with it: the
                            // caller sees its reply channel close, later launches still work.
                            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                        }
                    })
                    .map_err(Error::Io)?;
                *g = Some((me, tx.clone()));
                tx
            }
        }
    };
    let (reply, answer) = std::sync::mpsc::channel();
    tx.send(Box::new(move || {
        let _ = reply.send(f());
    }))
    .map_err(|_| Error::state("the launcher thread is gone"))?;
    answer
        .recv()
        .map_err(|_| Error::state("the launcher thread is gone"))
}

fn make_child(method: StartMethod, parent_end: RawFd, child_end: OwnedFd) -> Result<u32> {
    match method {
        StartMethod::Fork => fork::launch(parent_end, child_end),
        StartMethod::ForkServer => forkserver::launch(child_end),
        StartMethod::Spawn => spawn::launch(child_end),
    }
}

fn finish_launch(pid: u32, parent_end: OwnedFd) -> Result<Launched> {
    // The child is our own child in every method (the fork server forks with CLONE_PARENT), so
    // its pid cannot be reused before we reap it: pidfd_open has no race here.
    let pidfd = match platform::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = platform::kill(pid, libc::SIGKILL);
            platform::reap_pid(pid);
            return Err(e);
        }
    };
    Ok(Launched {
        pid,
        pidfd,
        boot: parent_end,
    })
}

/// Forks a child that runs `f` and exits with the code it returns ([`StartMethod::Fork`] only:
/// the closure's captures exist only in this address space).
pub(crate) fn launch_closure(f: Box<dyn FnOnce() -> i32 + Send>) -> Result<(u32, OwnedFd)> {
    let pid = on_long_lived_thread(move || fork::launch_closure(f))??;
    match platform::pidfd_open(pid) {
        Ok(pidfd) => Ok((pid, pidfd)),
        Err(e) => {
            // Without a pidfd nobody would ever reap it: end it now (as `finish_launch` does).
            let _ = platform::kill(pid, libc::SIGKILL);
            platform::reap_pid(pid);
            Err(e)
        }
    }
}

/// Called once per process, before `main` (from the executable's `.init_array`): if this
/// process was started as a spawn child or as a fork server, it does that job and never
/// returns. A no-op in ordinary processes.
pub(crate) fn enter_if_child() {
    spawn::enter_if_child();
}

/// Starts the fork server now if it is not running (done by [`crate::init`]).
pub(crate) fn ensure_forkserver() -> Result<()> {
    forkserver::ensure_started()
}

/// Pid of this process's fork server, if it started one.
pub(crate) fn forkserver_pid() -> Option<u32> {
    forkserver::server_pid()
}

/// Sets (or with `None` resets to this process's own binary) the executable that
/// [`StartMethod::Spawn`] children and the fork server re-execute, as Python's `set_executable`.
///
/// The executable must be a build of the same program: a child whose build id differs refuses
/// its task with [`Error::BuildIdMismatch`].
///
/// ```
/// multiproc::set_executable(None).unwrap();
/// ```
pub fn set_executable(path: Option<&std::path::Path>) -> Result<()> {
    spawn::set_executable(path)
}
