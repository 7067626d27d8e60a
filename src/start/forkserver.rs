//! `StartMethod::ForkServer`: a single-threaded server, exec'd from this binary, forks children
//! on request. See `README.md` beside this file for the protocol and the invariants.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::platform::{self, Forked};

use super::{child, spawn};

struct Server {
    /// Our end of the control socket (`SOCK_SEQPACKET`).
    ctl: OwnedFd,
    /// The server's pid (it is our child).
    pid: u32,
    /// The pid of the process that started it: a forked copy of that process must start its own.
    owner: u32,
}

static SERVER: Mutex<Option<Server>> = Mutex::new(None);

/// How long a launch waits for the fork server's reply (a fork takes well under a millisecond).
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Starts the server if this process has none.
pub(super) fn ensure_started() -> Result<()> {
    let mut s = SERVER.lock().unwrap_or_else(|p| p.into_inner());
    ensure(&mut s)?;
    Ok(())
}

/// The server's pid, if running.
pub(super) fn server_pid() -> Option<u32> {
    let s = SERVER.lock().unwrap_or_else(|p| p.into_inner());
    s.as_ref()
        .filter(|s| s.owner == platform::getpid())
        .map(|s| s.pid)
}

fn ensure(slot: &mut Option<Server>) -> Result<&Server> {
    let me = platform::getpid();
    if slot.as_ref().is_some_and(|s| s.owner != me) {
        // Inherited through a fork: that server belongs to our parent. Forget it without
        // closing anything the parent owns... the descriptor is ours (a copy), so close it.
        *slot = None;
    }
    if slot.is_none() {
        let (ours, theirs) = platform::socketpair(libc::SOCK_SEQPACKET)?;
        let pid = spawn::exec_self(spawn::FORKSERVER_ENV, theirs)?;
        *slot = Some(Server {
            ctl: ours,
            pid,
            owner: me,
        });
    }
    Ok(slot.as_ref().expect("just set"))
}

/// Asks the server to fork a child that runs [`child::child_main`] on `child_end`. Returns the
/// child's pid; the child is our own child (`CLONE_PARENT`).
pub(super) fn launch(child_end: OwnedFd) -> Result<u32> {
    let mut slot = SERVER.lock().unwrap_or_else(|p| p.into_inner());
    // One retry: a server that died (killed by someone) is replaced.
    for attempt in 0..2 {
        let server = ensure(&mut slot)?;
        match request(server, &child_end) {
            Ok(pid) => return Ok(pid),
            Err(e) if attempt == 0 => {
                tracing::warn!(
                    "fork server {} failed ({e}); starting a new one",
                    server.pid
                );
                let old = slot.take().expect("present");
                let _ = platform::kill(old.pid, libc::SIGKILL);
                platform::reap_pid(old.pid);
            }
            Err(e) => return Err(e),
        }
    }
    unreachable!("the loop returns")
}

fn request(server: &Server, child_end: &OwnedFd) -> Result<u32> {
    platform::send_with_fds(server.ctl.as_fd(), b"F", &[child_end.as_raw_fd()])
        .map_err(Error::Io)?;
    // A server that is stopped or wedged must not block every launch of this process (the
    // SERVER lock is held here): after the bound the caller replaces it.
    if !platform::poll_read(server.ctl.as_fd(), Some(REPLY_TIMEOUT))? {
        return Err(Error::Timeout);
    }
    let mut reply = [0u8; 8];
    let mut fds = Vec::new();
    let n = platform::recv_with_fds(server.ctl.as_fd(), &mut reply, &mut fds).map_err(Error::Io)?;
    if n != 8 {
        return Err(Error::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "fork server closed its socket",
        )));
    }
    let errno = i32::from_le_bytes(reply[..4].try_into().expect("4 bytes"));
    let pid = u32::from_le_bytes(reply[4..].try_into().expect("4 bytes"));
    if errno != 0 {
        return Err(Error::Io(std::io::Error::from_raw_os_error(errno)));
    }
    Ok(pid)
}

/// The server's loop. Runs before `main` in a freshly exec'd copy of the program, so it has a
/// single thread and pristine state; every child it forks starts from that state.
pub(super) fn server_main(ctl: OwnedFd) -> ! {
    warm_up_for_children();
    // The server must not outlive its client: it exits when the control socket reaches end of
    // file (which the kernel delivers when the client process dies, however it dies).
    loop {
        let mut buf = [0u8; 16];
        let mut fds = Vec::new();
        let n = match platform::recv_with_fds(ctl.as_fd(), &mut buf, &mut fds) {
            Ok(n) => n,
            Err(_) => platform::exit_now(1),
        };
        if n == 0 {
            platform::exit_now(0);
        }
        let Some(boot) = fds.pop().filter(|_| buf[0] == b'F' && fds.is_empty()) else {
            let _ = platform::send(ctl.as_fd(), &reply(libc::EINVAL, 0));
            continue;
        };
        // SAFETY: this process is single-threaded (see above).
        match unsafe { platform::fork_as_sibling() } {
            Ok(Forked::Child) => {
                drop(ctl);
                child::child_main(boot)
            }
            Ok(Forked::Parent(pid)) => {
                drop(boot);
                let _ = platform::send(ctl.as_fd(), &reply(0, pid));
            }
            Err(e) => {
                let errno = match e {
                    Error::Io(io) => io.raw_os_error().unwrap_or(libc::EIO),
                    _ => libc::EIO,
                };
                let _ = platform::send(ctl.as_fd(), &reply(errno, 0));
            }
        }
    }
}

thread_local! {
    /// A thread-local with a destructor, touched once by the server (see below).
    static WARM: std::cell::Cell<Option<Box<u8>>> = const { std::cell::Cell::new(None) };
}

/// Work every child would otherwise repeat, done once here so that children inherit its result.
///
/// A process's first thread-local with a destructor registers it with libc, and libc's first
/// such registration resolves a symbol of the dynamic loader lazily: a lookup through the
/// symbol tables of every loaded object, which maps tens of KiB of each (fault-around) into the
/// child that does it. Resolved here, the entry is in the memory children are forked from.
/// Worth about 0.2 MiB of every worker's resident memory (`worker_rss`).
fn warm_up_for_children() {
    WARM.with(|w| w.set(None));
}

fn reply(errno: i32, pid: u32) -> [u8; 8] {
    let mut r = [0u8; 8];
    r[..4].copy_from_slice(&errno.to_le_bytes());
    r[4..].copy_from_slice(&pid.to_le_bytes());
    r
}
