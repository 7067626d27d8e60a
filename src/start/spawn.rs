//! `StartMethod::Spawn`: re-execute this binary. Also the way the fork server itself starts.
//!
//! The child finds out what it is from one environment variable naming an inherited
//! descriptor, read by [`enter_if_child`] from the executable's `.init_array`, before `main`:
//! that is why the user's `main` never runs twice, and why it works in test binaries whose
//! `main` belongs to the test harness.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use crate::error::{Error, Result};
use crate::platform::{self, Forked};

use super::{child, forkserver};

/// Set in a spawned child: the number of its boot socket.
pub(super) const BOOT_ENV: &str = "__MULTIPROC_BOOT_FD";
/// Set in a fork server: the number of its control socket.
pub(super) const FORKSERVER_ENV: &str = "__MULTIPROC_FORKSERVER_FD";

/// Spawns a child that runs [`child::child_main`] on `child_end`.
pub(super) fn launch(child_end: OwnedFd) -> Result<u32> {
    exec_self(BOOT_ENV, child_end)
}

/// Fork + exec of this executable with `var=<fd>` in its environment and `fd` inherited (the
/// only descriptor it inherits that is not close-on-exec).
pub(super) fn exec_self(var: &str, fd: OwnedFd) -> Result<u32> {
    // Everything the child needs is allocated before the fork.
    let exe = c"/proc/self/exe";
    let argv0 = std::env::args_os()
        .next()
        .unwrap_or_else(|| "multiproc-child".into());
    let argv0 = CString::new(argv0.as_bytes()).map_err(|e| Error::arg(e.to_string()))?;
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k != OsStr::new(BOOT_ENV) && k != OsStr::new(FORKSERVER_ENV))
        .filter_map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    env.push(CString::new(format!("{var}={}", fd.as_raw_fd())).expect("no NUL"));
    let argv = [argv0.as_ptr(), std::ptr::null()];
    let envp: Vec<*const libc::c_char> = env
        .iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let raw = fd.as_raw_fd();
    // SAFETY: the child only calls fcntl, execve and _exit, all async-signal-safe, on data
    // allocated before the fork.
    match unsafe { platform::fork() }? {
        Forked::Child => {
            if platform::set_cloexec(fd.as_fd(), false).is_ok() {
                let _ = platform::execve(exe, &argv, &envp);
            }
            platform::exit_now(127)
        }
        Forked::Parent(pid) => {
            let _ = raw;
            drop(fd);
            Ok(pid)
        }
    }
}

/// If this process was exec'd as a spawn child or a fork server, becomes that and never
/// returns.
pub(super) fn enter_if_child() {
    if let Some(fd) = take_fd_var(BOOT_ENV) {
        child::child_main(fd);
    }
    if let Some(fd) = take_fd_var(FORKSERVER_ENV) {
        forkserver::server_main(fd);
    }
}

fn take_fd_var(var: &str) -> Option<OwnedFd> {
    let v = std::env::var_os(var)?;
    // SAFETY: called before main from .init_array (or from init() as the first line of main),
    // when no other thread exists to read the environment concurrently.
    unsafe { std::env::remove_var(var) };
    let fd: RawFd = match v.to_str().and_then(|s| s.parse().ok()) {
        Some(fd) if fd >= 0 => fd,
        _ => {
            eprintln!("multiproc: malformed {var}={v:?}");
            platform::exit_now(child::EXIT_REFUSED);
        }
    };
    // SAFETY: the parent put this descriptor here for us alone; we take ownership of it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if platform::set_cloexec(fd.as_fd(), true).is_err() {
        eprintln!("multiproc: {var} names descriptor {} which is not open", fd.as_raw_fd());
        std::mem::forget(fd);
        platform::exit_now(child::EXIT_REFUSED);
    }
    Some(fd)
}

/// Runs before `main` in every program that links multiproc: the spawn child's and the fork
/// server's entry. In an ordinary process it reads two environment variables and returns.
extern "C" fn on_load() {
    enter_if_child();
}

#[used]
#[unsafe(link_section = ".init_array")]
static ON_LOAD: extern "C" fn() = on_load;
