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
use crate::platform::{self, ExecArgs, Forked};

use super::{child, forkserver};

/// Set in a spawned child: the number of its boot socket.
pub(super) const BOOT_ENV: &str = "__MULTIPROC_BOOT_FD";
/// Set in a fork server: the number of its control socket.
pub(super) const FORKSERVER_ENV: &str = "__MULTIPROC_FORKSERVER_FD";

static EXECUTABLE: std::sync::Mutex<Option<CString>> = std::sync::Mutex::new(None);

/// Python's `set_executable`: the binary that spawn children and the fork server re-execute.
pub(crate) fn set_executable(path: Option<&std::path::Path>) -> Result<()> {
    let c = match path {
        Some(p) => {
            Some(CString::new(p.as_os_str().as_bytes()).map_err(|e| Error::arg(e.to_string()))?)
        }
        None => None,
    };
    *EXECUTABLE.lock().unwrap_or_else(|p| p.into_inner()) = c;
    Ok(())
}

fn executable() -> CString {
    EXECUTABLE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_else(|| c"/proc/self/exe".to_owned())
}

/// Spawns a child that runs [`child::child_main`] on `child_end`.
pub(super) fn launch(child_end: OwnedFd) -> Result<u32> {
    exec_self(BOOT_ENV, child_end)
}

/// Fork + exec of this executable with `var=<fd>` in its environment and `fd` inherited (the
/// only descriptor it inherits that is not close-on-exec).
pub(super) fn exec_self(var: &str, fd: OwnedFd) -> Result<u32> {
    // Everything the child needs is allocated before the fork.
    let exe = executable();
    let exe = exe.as_c_str();
    let args = ExecArgs::new(
        "multiproc-child",
        |k| k != OsStr::new(BOOT_ENV) && k != OsStr::new(FORKSERVER_ENV),
        format!("{var}={}", fd.as_raw_fd()),
    )?;
    // SAFETY: the child only calls fcntl, execve and _exit, all async-signal-safe, on data
    // allocated before the fork.
    match unsafe { platform::fork() }? {
        Forked::Child => {
            if platform::set_cloexec(fd.as_fd(), false).is_ok() {
                let _ = platform::execve(exe, &args.argv, &args.envp);
            }
            platform::exit_now(127)
        }
        Forked::Parent(pid) => {
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
        eprintln!(
            "multiproc: {var} names descriptor {} which is not open",
            fd.as_raw_fd()
        );
        std::mem::forget(fd);
        platform::exit_now(child::EXIT_REFUSED);
    }
    // Exec'd from /proc/self/exe, the kernel names us "exe": take the program's name back, so
    // `ps`/`pgrep` show children under the name of the program they belong to.
    if let Some(arg0) = std::env::args_os().next() {
        let p = std::path::Path::new(&arg0);
        if let Some(base) = p.file_name() {
            platform::set_process_name(&base.to_string_lossy());
        }
    }
    Some(fd)
}

/// Runs before `main` in every program that links multiproc: the spawn child's and the fork
/// server's entry. In an ordinary process it reads two environment variables and returns.
extern "C" fn on_load() {
    enter_if_child();
}

// SAFETY: `.init_array` holds `extern "C" fn()` pointers that the loader calls once, before
// `main`, with no arguments; `on_load` has that type. A panic in it would abort (it cannot
// unwind through the `extern "C"` boundary), which is the right outcome for a broken child.
#[used]
#[unsafe(link_section = ".init_array")]
static ON_LOAD: extern "C" fn() = on_load;
