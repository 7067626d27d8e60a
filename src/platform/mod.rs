//! The platform seam: every system call the crate makes goes through this module.
//!
//! Only Linux is implemented. A macOS port adds `macos.rs` with the same functions (kqueue in
//! place of pidfds, `os_sync_wait_on_address` or a pthread fallback in place of futexes) and
//! selects it here; nothing outside this module names a system call.

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub(crate) use linux::*;

#[cfg(not(target_os = "linux"))]
compile_error!("multiproc supports Linux only for now; see src/platform/mod.rs");
