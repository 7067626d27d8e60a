//! `StartMethod::Fork`: the child is a copy of the caller.

use std::os::fd::{OwnedFd, RawFd};

use crate::error::Result;
use crate::platform::{self, Forked};
use crate::process;

use super::child;

/// Forks; the child runs [`child::child_main`] on `child_end`.
/// `parent_end` (the parent's end of the boot socket) is closed in the child, so that the child
/// sees end of file on the boot socket if the parent dies.
pub(super) fn launch(parent_end: RawFd, child_end: OwnedFd) -> Result<u32> {
    let guard = process::fork_guard();
    // SAFETY: the child path only resets this crate's own state (whose lock `guard` holds, so
    // it is consistent) and then reads its task; see StartMethod::Fork's documentation for what
    // user code may meet in a forked copy of a multithreaded program.
    match unsafe { platform::fork() }? {
        Forked::Child => {
            platform::close_raw(parent_end);
            process::after_fork_in_child(guard);
            child::child_main(child_end)
        }
        Forked::Parent(pid) => {
            drop(guard);
            drop(child_end);
            Ok(pid)
        }
    }
}

/// Forks; the child runs `f` and exits with its code.
pub(super) fn launch_closure(f: Box<dyn FnOnce() -> i32 + Send>) -> Result<u32> {
    let guard = process::fork_guard();
    // SAFETY: as in `launch`.
    match unsafe { platform::fork() }? {
        Forked::Child => {
            process::after_fork_in_child(guard);
            let code = child::catch_panic(f, true).unwrap_or(1);
            child::flush_stdio();
            platform::exit_now(code)
        }
        Forked::Parent(pid) => {
            drop(guard);
            Ok(pid)
        }
    }
}
