#![allow(dead_code)] // helpers used by the modules built on the platform seam
//! Linux system calls. Every `unsafe` call into the kernel that the crate makes lives here,
//! behind a small safe wrapper, so that a macOS port replaces this one file.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use crate::error::{Error, ExitStatus, Result};

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_long(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Retries a call while it fails with `EINTR`.
pub(crate) fn retry<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// The calling process's id.
pub(crate) fn getpid() -> u32 {
    std::process::id()
}

/// The parent's process id.
pub(crate) fn getppid() -> u32 {
    // SAFETY: getppid has no preconditions and cannot fail.
    unsafe { libc::getppid() as u32 }
}

/// The calling thread's id.
pub(crate) fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() as u32 }
}

/// Which side of a fork we are on.
pub(crate) enum Forked {
    Parent(u32),
    Child,
}

/// `fork(2)`.
///
/// # Safety
/// In a multithreaded program the child may only do what is safe after `fork`: the caller
/// guarantees that the child path avoids locks other threads might have held (the crate's child
/// paths take no lock before they exec or reinitialise their own state).
pub(crate) unsafe fn fork() -> Result<Forked> {
    // SAFETY: forwarded to the caller.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(Error::last_os()),
        0 => Ok(Forked::Child),
        p => Ok(Forked::Parent(p as u32)),
    }
}

/// `clone3(CLONE_PARENT)`: a fork whose child gets the caller's parent as its parent. The fork
/// server uses it so that its workers are children of the program that asked for them.
///
/// # Safety
/// As for [`fork`].
pub(crate) unsafe fn fork_as_sibling() -> Result<Forked> {
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    // A raw clone skips what glibc's fork does in the child: the kernel must write the child's
    // tid into glibc's cached thread id (else every child of the fork server owns pthread
    // mutexes under the server's tid), and the child must register glibc's robust-mutex list
    // (else mutexes it holds are not released when it dies). See `sibling_glibc_state`.
    let (tid_addr, robust) = sibling_glibc_state();
    let mut args = CloneArgs {
        // With CLONE_PARENT the kernel refuses an exit signal: the child inherits the caller's
        // (SIGCHLD for a process started by fork), which is what its new parent expects.
        flags: libc::CLONE_PARENT as u64
            | if tid_addr != 0 {
                (libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID) as u64
            } else {
                0
            },
        child_tid: tid_addr,
        ..Default::default()
    };
    // SAFETY: clone3 with no stack behaves like fork (the child resumes on a copy of this
    // stack); args is a valid clone_args of the size we pass. The caller upholds fork's rules.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match r {
        -1 => Err(Error::last_os()),
        0 => {
            if let Some((head, len)) = robust {
                // SAFETY: head is glibc's robust-list head of this (only) thread, at the same
                // address in the child's copy of the memory; set_robust_list only records it.
                unsafe { libc::syscall(libc::SYS_set_robust_list, head, len) };
            }
            Ok(Forked::Child)
        }
        p => Ok(Forked::Parent(p as u32)),
    }
}

/// What [`fork_as_sibling`] needs to redo glibc's post-fork bookkeeping: the address of the
/// calling thread's cached tid (the kernel's `clear_child_tid`, which glibc points there) and
/// its robust-list head. Zero / `None` when the kernel does not tell.
fn sibling_glibc_state() -> (u64, Option<(usize, usize)>) {
    let mut tid_addr: usize = 0;
    // SAFETY: PR_GET_TID_ADDRESS writes one pointer to the address given.
    let r = unsafe { libc::prctl(libc::PR_GET_TID_ADDRESS, &mut tid_addr as *mut usize) };
    let tid_addr = if r == 0 { tid_addr as u64 } else { 0 };
    let mut head: usize = 0;
    let mut len: usize = 0;
    // SAFETY: get_robust_list(0 = this thread) writes a pointer and a length to valid
    // out-pointers.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            0,
            &mut head as *mut usize,
            &mut len as *mut usize,
        )
    };
    let robust = (r == 0 && head != 0).then_some((head, len));
    (tid_addr, robust)
}

/// Ends the calling process at once, without running `atexit` handlers or destructors: what a
/// forked child must do, since the handlers it inherited belong to its parent.
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and has no preconditions.
    unsafe { libc::_exit(code) }
}

/// Asks the kernel to send `SIGKILL` to the calling process when its parent thread dies, and
/// closes the race where the parent died before the call: if the parent is no longer
/// `expected_parent`, the process exits at once.
pub(crate) fn die_with_parent(expected_parent: u32) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number; no memory is passed.
    unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if getppid() != expected_parent {
        exit_now(1);
    }
}

/// `pidfd_open(2)`: a file descriptor that refers to process `pid`; it becomes readable when
/// the process exits, and it can be waited on and signalled without pid-reuse races.
pub(crate) fn pidfd_open(pid: u32) -> Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; on success it returns a new fd we own.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    let fd = cvt_long(r)? as RawFd;
    // SAFETY: the fd was just returned by the kernel and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    set_cloexec(fd.as_fd_ref(), true)?;
    Ok(fd)
}

trait AsFdRef {
    fn as_fd_ref(&self) -> BorrowedFd<'_>;
}
impl AsFdRef for OwnedFd {
    fn as_fd_ref(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.as_fd()
    }
}

/// `pidfd_send_signal(2)`.
pub(crate) fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: i32) -> Result<()> {
    // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    match cvt_long(r) {
        Ok(_) => Ok(()),
        // The process already exited (a zombie or reaped): nothing to signal.
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Waits for (and reaps) the child behind `pidfd`. With `block == false` returns `Ok(None)` if it
/// is still running.
pub(crate) fn pidfd_wait(pidfd: BorrowedFd<'_>, block: bool) -> Result<Option<ExitStatus>> {
    const P_PIDFD: libc::idtype_t = 3;
    let mut info: libc::siginfo_t = unsafe_zeroed_siginfo();
    let mut flags = libc::WEXITED;
    if !block {
        flags |= libc::WNOHANG;
    }
    retry(|| {
        // SAFETY: info is a valid, writable siginfo_t; the pidfd is valid for the call.
        cvt(unsafe { libc::waitid(P_PIDFD, pidfd.as_raw_fd() as libc::id_t, &mut info, flags) })
    })?;
    // SAFETY: waitid filled info (or left it zeroed for WNOHANG with no change): si_pid is valid
    // to read for SIGCHLD infos, and zero means "nothing yet".
    let pid = unsafe { info.si_pid() };
    if pid == 0 {
        return Ok(None);
    }
    // SAFETY: as above, si_status is valid for a SIGCHLD siginfo.
    let status = unsafe { info.si_status() };
    Ok(Some(match info.si_code {
        libc::CLD_EXITED => ExitStatus::Exited(status),
        _ => ExitStatus::Signaled(status),
    }))
}

fn unsafe_zeroed_siginfo() -> libc::siginfo_t {
    // SAFETY: siginfo_t is plain old data; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Blocks until child `pid` exits and reaps it.
pub(crate) fn reap_pid(pid: u32) -> Option<ExitStatus> {
    let mut status = 0;
    let r = retry(|| {
        // SAFETY: status is a valid out-pointer.
        cvt(unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) })
    });
    match r {
        Ok(p) if p > 0 => Some(decode_wait_status(status)),
        _ => None,
    }
}

fn decode_wait_status(status: libc::c_int) -> ExitStatus {
    if libc::WIFSIGNALED(status) {
        ExitStatus::Signaled(libc::WTERMSIG(status))
    } else {
        ExitStatus::Exited(libc::WEXITSTATUS(status))
    }
}

/// `kill(2)` by pid (prefer [`pidfd_send_signal`] where a pidfd is at hand).
pub(crate) fn kill(pid: u32, sig: i32) -> Result<()> {
    // SAFETY: kill takes a pid and a signal number.
    cvt(unsafe { libc::kill(pid as libc::pid_t, sig) })?;
    Ok(())
}

/// Replaces the process image (`execve`). Only returns on failure. `argv` and `envp` are
/// prepared before a fork so the child allocates nothing.
pub(crate) fn execve(
    path: &CStr,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> io::Error {
    // SAFETY: path is NUL-terminated; argv and envp are NULL-terminated arrays of pointers to
    // NUL-terminated strings that outlive the call (the caller keeps their owners alive).
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    io::Error::last_os_error()
}

/// Number of CPUs online.
pub(crate) fn cpu_count() -> usize {
    // SAFETY: sysconf has no memory arguments.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n < 1 { 1 } else { n as usize }
}

/// Number of CPUs this process may run on (its affinity mask).
pub(crate) fn process_cpu_count() -> usize {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            let n = libc::CPU_COUNT(&set);
            if n > 0 {
                return n as usize;
            }
        }
    }
    cpu_count()
}

/// Resident set size of a process, in bytes, from `/proc/PID/statm`.
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no memory arguments.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    Some(pages * page)
}

/// Memory only this process maps (its unique set size: private clean and dirty pages), in
/// bytes, from `/proc/PID/smaps_rollup`. Shared text and libraries, which RSS counts in full
/// in every process, are left out.
pub(crate) fn private_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let mut kib = 0;
    let mut seen = 0;
    for line in s.lines() {
        if let Some(v) = line
            .strip_prefix("Private_Clean:")
            .or_else(|| line.strip_prefix("Private_Dirty:"))
        {
            kib += v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
            seen += 1;
        }
    }
    (seen == 2).then_some(kib * 1024)
}

// ---------------------------------------------------------------------------------------------
// File descriptors, sockets, poll
// ---------------------------------------------------------------------------------------------

/// Sets or clears `FD_CLOEXEC`.
pub(crate) fn set_cloexec(fd: BorrowedFd<'_>, on: bool) -> Result<()> {
    set_fcntl_bit(fd, libc::F_GETFD, libc::F_SETFD, libc::FD_CLOEXEC, on)
}

/// Sets or clears `O_NONBLOCK`.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> Result<()> {
    set_fcntl_bit(fd, libc::F_GETFL, libc::F_SETFL, libc::O_NONBLOCK, on)
}

/// Sets or clears `bit` in the flags that the fcntl commands `get`/`set` read and write.
fn set_fcntl_bit(
    fd: BorrowedFd<'_>,
    get: libc::c_int,
    set: libc::c_int,
    bit: libc::c_int,
    on: bool,
) -> Result<()> {
    // SAFETY: fcntl on a valid fd with integer arguments (F_GETFD/F_GETFL take none).
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), get) })?;
    let new = if on { flags | bit } else { flags & !bit };
    if new != flags {
        // SAFETY: fcntl on a valid fd with an integer argument (F_SETFD/F_SETFL).
        cvt(unsafe { libc::fcntl(fd.as_raw_fd(), set, new) })?;
    }
    Ok(())
}

/// A connected pair of close-on-exec Unix sockets of the given type
/// (`libc::SOCK_STREAM` or `libc::SOCK_SEQPACKET`).
pub(crate) fn socketpair(kind: libc::c_int) -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds is a valid array of two ints for the kernel to fill.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            kind | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A close-on-exec pipe: (read end, write end).
pub(crate) fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds is a valid array of two ints for the kernel to fill.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Duplicates `fd` onto the number `target` (which is closed first if open), without
/// close-on-exec: for handing one descriptor to an exec'd child at a known number.
pub(crate) fn dup2(fd: RawFd, target: RawFd) -> io::Result<()> {
    // SAFETY: dup2 on integers; the caller owns `target`'s slot (used only in a child before
    // exec).
    cvt(unsafe { libc::dup2(fd, target) }).map(|_| ())
}

/// Duplicates a descriptor (close-on-exec).
pub(crate) fn dup(fd: BorrowedFd<'_>) -> Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a valid fd returns a new fd we own.
    let r = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) })?;
    // SAFETY: the fd was just created.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// `read(2)` into `buf`, retrying on `EINTR`. Returns 0 at end of file.
pub(crate) fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    retry(|| {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let r = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        cvt_long(r as libc::c_long).map(|n| n as usize)
    })
}

/// `write(2)` from `buf`, retrying on `EINTR`. Never raises `SIGPIPE` for sockets.
pub(crate) fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    retry(|| {
        // SAFETY: buf is valid for reads of buf.len() bytes.
        let r = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        cvt_long(r as libc::c_long).map(|n| n as usize)
    })
}

/// Writes all of `buf`.
pub(crate) fn write_all(fd: BorrowedFd<'_>, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = send(fd, buf)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}

/// Fills all of `buf`; `Ok(false)` if end of file came before the first byte, an
/// `UnexpectedEof` error if it came in the middle.
pub(crate) fn read_exact(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let n = read(fd, &mut buf[got..])?;
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Ok(true)
}

/// `send(2)` with `MSG_NOSIGNAL` on sockets, falling back to `write` for other descriptors.
pub(crate) fn send(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    retry(|| {
        // SAFETY: buf is valid for reads of buf.len() bytes.
        let r = unsafe {
            libc::send(
                fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOTSOCK) {
            return write(fd, buf);
        }
        cvt_long(r as libc::c_long).map(|n| n as usize)
    })
}

/// Largest number of descriptors one message may carry.
pub(crate) const MAX_FDS_PER_MSG: usize = 64;

/// Sends `buf` (at least one byte) with `fds` attached as `SCM_RIGHTS` on a Unix socket.
/// Returns how many bytes of `buf` went; the descriptors go with the first byte.
pub(crate) fn send_with_fds(fd: BorrowedFd<'_>, buf: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    if fds.is_empty() {
        return send(fd, buf);
    }
    if fds.len() > MAX_FDS_PER_MSG || buf.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors or empty buffer",
        ));
    }
    let space = cmsg_space(fds.len());
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is valid, fields set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points to a buffer of CMSG_SPACE(len) bytes, aligned for cmsghdr;
    // CMSG_FIRSTHDR/CMSG_DATA stay within it and we copy exactly fds.len() ints.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast::<RawFd>(), fds.len());
    }
    retry(|| {
        // SAFETY: msg is fully initialised and its buffers outlive the call.
        let r = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        cvt_long(r as libc::c_long).map(|n| n as usize)
    })
}

fn cmsg_space(nfds: usize) -> usize {
    // SAFETY: CMSG_SPACE is a pure computation.
    unsafe { libc::CMSG_SPACE((nfds * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// Receives into `buf` from a Unix socket, collecting any `SCM_RIGHTS` descriptors into `fds`
/// (close-on-exec). Returns the byte count (0 at end of file). Falls back to `read` for a
/// descriptor that is not a socket.
pub(crate) fn recv_with_fds(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    match recvmsg_fds(fd, buf, fds, 0) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => read(fd, buf),
        r => r,
    }
}

/// `recvmsg` with `flags` (plus `MSG_CMSG_CLOEXEC`), collecting `SCM_RIGHTS` descriptors.
fn recvmsg_fds(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    flags: libc::c_int,
) -> io::Result<usize> {
    // Room for MAX_FDS_PER_MSG descriptors (CMSG_SPACE of 256 bytes is 272), on the stack.
    let mut cbuf = [0u64; 64];
    let space = cmsg_space(MAX_FDS_PER_MSG).min(std::mem::size_of_val(&cbuf));
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is valid, fields set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = retry(|| {
        // SAFETY: msg describes valid writable buffers that outlive the call.
        let r = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC | flags) };
        cvt_long(r as libc::c_long).map(|n| n as usize)
    })?;
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of well-formed cmsgs; we
    // walk them with the CMSG macros and read only SCM_RIGHTS payloads as ints.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "too many file descriptors in one message",
        ));
    }
    Ok(n)
}

/// Readiness to wait for in [`poll`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Interest {
    Read,
    Write,
}

/// Waits until one of `fds` is ready (readable, or writable, or hung up / in error) or the
/// timeout passes (`None` waits forever). Returns a readiness flag for each descriptor.
pub(crate) fn poll(
    fds: &[(BorrowedFd<'_>, Interest)],
    timeout: Option<Duration>,
) -> Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|(fd, i)| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: match i {
                Interest::Read => libc::POLLIN,
                Interest::Write => libc::POLLOUT,
            },
            revents: 0,
        })
        .collect();
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    loop {
        let ms = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(std::time::Instant::now());
                // Round up so a short timeout still sleeps instead of spinning.
                left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int
            }
        };
        // SAFETY: pfds is a valid array of pollfd of the given length.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        if r == 0 {
            if let Some(d) = deadline {
                if std::time::Instant::now() < d {
                    continue;
                }
            }
        }
        return Ok(pfds.iter().map(|p| p.revents != 0).collect());
    }
}

/// True when `fd` is readable (or at end of file) within `timeout`.
pub(crate) fn poll_read(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> Result<bool> {
    Ok(poll(&[(fd, Interest::Read)], timeout)?[0])
}

// ---------------------------------------------------------------------------------------------
// Memory: memfd, POSIX shared memory, mmap
// ---------------------------------------------------------------------------------------------

/// An anonymous shared-memory file of `size` bytes (zero-filled, close-on-exec). It has no name
/// in /dev/shm: it is freed when the last descriptor and mapping go, even if every process
/// holding it is killed.
pub(crate) fn memfd(name: &CStr, size: usize) -> Result<OwnedFd> {
    // SAFETY: name is NUL-terminated; flags are valid.
    let r = cvt(unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) })?;
    // SAFETY: the fd was just created.
    let fd = unsafe { OwnedFd::from_raw_fd(r) };
    ftruncate(fd.as_fd_ref(), size)?;
    Ok(fd)
}

/// Sets a file's size.
pub(crate) fn ftruncate(fd: BorrowedFd<'_>, size: usize) -> Result<()> {
    // SAFETY: ftruncate on a valid fd.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) })?;
    Ok(())
}

/// The size of the file behind `fd`.
pub(crate) fn fstat_size(fd: BorrowedFd<'_>) -> Result<usize> {
    Ok(fstat(fd)?.st_size as usize)
}

/// The inode number of the file `fd` refers to.
pub(crate) fn fstat_inode(fd: BorrowedFd<'_>) -> Result<u64> {
    Ok(fstat(fd)?.st_ino)
}

fn fstat(fd: BorrowedFd<'_>) -> Result<libc::stat> {
    // SAFETY: st is plain data for the kernel to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and out-pointer.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// `shm_open(name, O_RDWR | O_CREAT [| O_EXCL])` (close-on-exec). `name` starts with '/'.
pub(crate) fn shm_open(name: &CStr, create: bool, exclusive: bool) -> Result<OwnedFd> {
    let mut flags = libc::O_RDWR | libc::O_CLOEXEC;
    if create {
        flags |= libc::O_CREAT;
    }
    if exclusive {
        flags |= libc::O_EXCL;
    }
    // SAFETY: name is NUL-terminated.
    let r = cvt(unsafe { libc::shm_open(name.as_ptr(), flags, 0o600) })?;
    // SAFETY: the fd was just created.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// `shm_unlink(name)`.
pub(crate) fn shm_unlink(name: &CStr) -> Result<()> {
    // SAFETY: name is NUL-terminated.
    cvt(unsafe { libc::shm_unlink(name.as_ptr()) })?;
    Ok(())
}

/// Where the kernel keeps POSIX shared-memory objects (a tmpfs; glibc's `shm_open` uses it).
const SHM_DIR: &str = "/dev/shm";

fn shm_path(name: &CStr) -> Result<CString> {
    let bare = name.to_bytes();
    let bare = bare.strip_prefix(b"/").unwrap_or(bare);
    let mut path = Vec::with_capacity(SHM_DIR.len() + 1 + bare.len());
    path.extend_from_slice(SHM_DIR.as_bytes());
    path.push(b'/');
    path.extend_from_slice(bare);
    CString::new(path).map_err(|_| Error::arg("shared memory name with a NUL byte"))
}

/// Renames shared-memory object `from` to `to`, failing with `AlreadyExists` if `to` exists
/// (`renameat2(RENAME_NOREPLACE)` in /dev/shm): publishes a fully made object under its name
/// in one step. `Ok(false)` if this kernel or file system cannot rename without replacing.
pub(crate) fn shm_rename_noreplace(from: &CStr, to: &CStr) -> Result<bool> {
    let (from, to) = (shm_path(from)?, shm_path(to)?);
    // SAFETY: both paths are NUL-terminated; AT_FDCWD is ignored for absolute paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::EINVAL | libc::ENOSYS) => Ok(false),
        _ => Err(Error::last_os()),
    }
}

/// The inode number of shared-memory object `name`, if it exists.
pub(crate) fn shm_inode(name: &CStr) -> Option<u64> {
    let path = shm_path(name).ok()?;
    // SAFETY: st is plain data for the kernel to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: NUL-terminated path and valid out-pointer.
    (unsafe { libc::stat(path.as_ptr(), &mut st) } == 0).then_some(st.st_ino)
}

/// A shared, read-write mapping of a file; unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; synchronising access to its bytes is the job of
// the types built on it (atomics, futex locks).
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` shared and read-write.
    pub(crate) fn new(fd: BorrowedFd<'_>, len: usize) -> Result<Mapping> {
        if len == 0 {
            return Err(Error::arg("cannot map zero bytes"));
        }
        // SAFETY: a fresh mapping chosen by the kernel; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::last_os());
        }
        Ok(Mapping { ptr: p.cast(), len })
    }

    /// Start of the mapping (page aligned).
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe a mapping this value created and nobody else unmaps.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

// ---------------------------------------------------------------------------------------------
// Futexes (shared between processes: no FUTEX_PRIVATE_FLAG)
// ---------------------------------------------------------------------------------------------

/// Sleeps while `*word == expected`, at most `timeout` (`None` waits forever). Returns `false`
/// on timeout, `true` otherwise (woken, value changed, or interrupted: callers re-check).
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> bool {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let tsp = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: word is a valid, aligned u32 for the duration of the call; tsp is null or valid.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            tsp,
        )
    };
    !(r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ETIMEDOUT))
}

/// Wakes up to `n` waiters sleeping on `word`. Returns how many were woken.
pub(crate) fn futex_wake(word: &AtomicU32, n: u32) -> u32 {
    // SAFETY: word is a valid, aligned u32; FUTEX_WAKE does not dereference other memory.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            n.min(i32::MAX as u32),
        )
    };
    if r < 0 { 0 } else { r as u32 }
}

// ---------------------------------------------------------------------------------------------
// Robust, process-shared mutexes
// ---------------------------------------------------------------------------------------------

/// A `pthread_mutex_t` configured process-shared and robust, to be placed in shared memory.
///
/// When a holder dies (even by `SIGKILL`) the kernel walks its robust list, marks the mutex
/// owner-died and wakes one waiter, whose lock call then returns [`RobustLock::OwnerDied`]: the
/// caller holds the mutex and must call [`RawRobustMutex::make_consistent`] after repairing what
/// it protects (or unlock without it, which makes the mutex permanently unusable, `ENOTRECOVERABLE`).
#[repr(C)]
pub(crate) struct RawRobustMutex(std::cell::UnsafeCell<libc::pthread_mutex_t>);

// SAFETY: pthread mutexes are designed to be shared between threads and (pshared) processes.
unsafe impl Sync for RawRobustMutex {}
// SAFETY: as above.
unsafe impl Send for RawRobustMutex {}

/// Result of locking a [`RawRobustMutex`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RobustLock {
    /// Locked normally.
    Acquired,
    /// Locked, but the previous owner died holding it.
    OwnerDied,
}

impl RawRobustMutex {
    /// Initialises a mutex in place.
    ///
    /// # Safety
    /// `at` points to writable memory of `size_of::<RawRobustMutex>()` bytes, suitably aligned,
    /// that no other thread or process is using yet.
    pub(crate) unsafe fn init_at(at: *mut RawRobustMutex, recursive: bool) -> Result<()> {
        // SAFETY: attr is initialised by pthread_mutexattr_init before use and destroyed after;
        // `at` is valid per the caller's contract.
        unsafe {
            let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
            let r = libc::pthread_mutexattr_init(&mut attr);
            if r != 0 {
                return Err(io::Error::from_raw_os_error(r).into());
            }
            libc::pthread_mutexattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED);
            libc::pthread_mutexattr_setrobust(&mut attr, libc::PTHREAD_MUTEX_ROBUST);
            if recursive {
                libc::pthread_mutexattr_settype(&mut attr, libc::PTHREAD_MUTEX_RECURSIVE);
            } else {
                libc::pthread_mutexattr_settype(&mut attr, libc::PTHREAD_MUTEX_ERRORCHECK);
            }
            let r = libc::pthread_mutex_init((*at).0.get(), &attr);
            libc::pthread_mutexattr_destroy(&mut attr);
            if r != 0 {
                return Err(io::Error::from_raw_os_error(r).into());
            }
        }
        Ok(())
    }

    /// Locks, waiting at most `timeout` (`None`: forever). `Err(Timeout)` when it runs out.
    pub(crate) fn lock(&self, timeout: Option<Duration>) -> Result<RobustLock> {
        let r = match timeout {
            None => {
                // SAFETY: the mutex was initialised by init_at (the owning type guarantees it).
                unsafe { libc::pthread_mutex_lock(self.0.get()) }
            }
            Some(t) => {
                let mut now: libc::timespec = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: valid out-pointer.
                unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) };
                let total = now.tv_nsec as u128 + t.subsec_nanos() as u128;
                let deadline = libc::timespec {
                    tv_sec: now
                        .tv_sec
                        .saturating_add(t.as_secs().min(i32::MAX as u64) as libc::time_t)
                        .saturating_add((total / 1_000_000_000) as libc::time_t),
                    tv_nsec: (total % 1_000_000_000) as libc::c_long,
                };
                // SAFETY: initialised mutex, valid timespec.
                unsafe { libc::pthread_mutex_timedlock(self.0.get(), &deadline) }
            }
        };
        match r {
            0 => Ok(RobustLock::Acquired),
            libc::EOWNERDEAD => Ok(RobustLock::OwnerDied),
            libc::ETIMEDOUT => Err(Error::Timeout),
            libc::EDEADLK => Err(Error::state(
                "lock already held by this thread (use an RLock for re-entrant locking)",
            )),
            libc::ENOTRECOVERABLE => Err(Error::state(
                "lock is unusable: a previous holder died and the lock was not made consistent",
            )),
            e => Err(io::Error::from_raw_os_error(e).into()),
        }
    }

    /// Tries to lock without waiting; `Ok(None)` if another holder has it.
    pub(crate) fn try_lock(&self) -> Result<Option<RobustLock>> {
        // SAFETY: initialised mutex.
        match unsafe { libc::pthread_mutex_trylock(self.0.get()) } {
            0 => Ok(Some(RobustLock::Acquired)),
            libc::EOWNERDEAD => Ok(Some(RobustLock::OwnerDied)),
            libc::EBUSY => Ok(None),
            libc::EDEADLK => Ok(None),
            libc::ENOTRECOVERABLE => Err(Error::state(
                "lock is unusable: a previous holder died and the lock was not made consistent",
            )),
            e => Err(io::Error::from_raw_os_error(e).into()),
        }
    }

    /// Marks the state consistent again after an [`RobustLock::OwnerDied`] (caller holds it).
    pub(crate) fn make_consistent(&self) -> Result<()> {
        // SAFETY: initialised mutex held by the caller.
        match unsafe { libc::pthread_mutex_consistent(self.0.get()) } {
            0 => Ok(()),
            e => Err(io::Error::from_raw_os_error(e).into()),
        }
    }

    /// Unlocks. Fails with `EPERM` if the caller does not hold it.
    pub(crate) fn unlock(&self) -> Result<()> {
        // SAFETY: initialised mutex.
        match unsafe { libc::pthread_mutex_unlock(self.0.get()) } {
            0 => Ok(()),
            libc::EPERM => Err(Error::state("unlock of a lock this thread does not hold")),
            e => Err(io::Error::from_raw_os_error(e).into()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helper processes that outlive their creator (the shared-memory tracker)
// ---------------------------------------------------------------------------------------------

/// What an exec'd copy of this program gets, built before the fork so that the child only passes
/// pointers to `execve`: argv `[argv0]`, and this process's environment (the variables whose
/// names `keep` accepts) plus `extra` (`KEY=value`). The pointer arrays point into the
/// `CString`s' heap buffers, which do not move when the value does.
pub(crate) struct ExecArgs {
    _argv0: CString,
    _env: Vec<CString>,
    /// NULL-terminated argv.
    pub(crate) argv: [*const libc::c_char; 2],
    /// NULL-terminated envp.
    pub(crate) envp: Vec<*const libc::c_char>,
}

impl ExecArgs {
    pub(crate) fn new(
        default_argv0: &str,
        keep: impl Fn(&OsStr) -> bool,
        extra: String,
    ) -> Result<ExecArgs> {
        let argv0 = std::env::args_os()
            .next()
            .unwrap_or_else(|| default_argv0.into());
        let argv0 = CString::new(argv0.as_bytes()).map_err(|e| Error::arg(e.to_string()))?;
        let mut env: Vec<CString> = std::env::vars_os()
            .filter(|(k, _)| keep(k))
            .filter_map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                CString::new(kv).ok()
            })
            .collect();
        env.push(CString::new(extra).map_err(|e| Error::arg(e.to_string()))?);
        let argv = [argv0.as_ptr(), std::ptr::null()];
        let envp = env
            .iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        Ok(ExecArgs {
            _argv0: argv0,
            _env: env,
            argv,
            envp,
        })
    }
}

/// Starts this executable again as a detached helper: a double fork (the helper is reparented
/// to init or the nearest subreaper, so it is nobody's zombie and outlives a SIGKILLed caller)
/// then `execve("/proc/self/exe")` with `var=<fd>` in the environment and `fd` inherited (the
/// only descriptor it inherits). `keep` picks the variables of this process's environment to pass on.
/// Waits for the intermediate child, so it returns once the helper exists.
pub(crate) fn spawn_detached_self(
    var: &str,
    fd: BorrowedFd<'_>,
    keep: impl Fn(&OsStr) -> bool,
) -> Result<()> {
    let exe = c"/proc/self/exe";
    let args = ExecArgs::new(
        "multiproc-helper",
        keep,
        format!("{var}={}", fd.as_raw_fd()),
    )?;
    let raw = fd.as_raw_fd();
    // SAFETY: between fork and execve/_exit the children only call fork, fcntl, setsid, execve
    // and _exit (all async-signal-safe) on data allocated before the first fork.
    match unsafe { fork() }? {
        Forked::Child => {
            // SAFETY: as above.
            if let Ok(Forked::Child) = unsafe { fork() } {
                // SAFETY: fcntl on an inherited descriptor with integer arguments; setsid has
                // no arguments (a new session: terminal signals for the program's group do
                // not reach the helper).
                unsafe {
                    let flags = libc::fcntl(raw, libc::F_GETFD);
                    if flags >= 0 {
                        libc::fcntl(raw, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                    }
                    libc::setsid();
                }
                let _ = execve(exe, &args.argv, &args.envp);
                exit_now(127);
            }
            exit_now(0)
        }
        Forked::Parent(pid) => match reap_pid(pid) {
            Some(ExitStatus::Exited(0)) => Ok(()),
            other => Err(Error::state(format!(
                "could not start a helper process (intermediate child ended with {other:?})"
            ))),
        },
    }
}

/// Ignores the given signals (a helper that must survive `SIGINT`/`SIGTERM` sent to the
/// program's process group and end only when its work is done).
pub(crate) fn ignore_signals(sigs: &[i32]) {
    for &sig in sigs {
        // SAFETY: SIG_IGN is always a valid disposition.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
}

/// Takes ownership of a descriptor number inherited through the environment, making it
/// close-on-exec; `None` if it is not open.
pub(crate) fn fd_from_env(fd: RawFd) -> Option<OwnedFd> {
    if fd < 0 {
        return None;
    }
    // SAFETY: fcntl(F_GETFD) on an integer only queries; it fails with EBADF if not open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the parent put this descriptor here for this process alone; we take it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    set_cloexec(fd.as_fd_ref(), true).ok()?;
    Some(fd)
}

impl RawRobustMutex {
    /// A racy hint that the mutex is held, read without writing the cache line (for spinning
    /// before a `try_lock`). glibc keeps the owner's tid in `__data.__lock`, the first `int` of
    /// `pthread_mutex_t`; elsewhere the hint is always "free" (spinners just `try_lock`).
    pub(crate) fn is_locked_hint(&self) -> bool {
        #[cfg(target_env = "gnu")]
        {
            // SAFETY: the first field of glibc's pthread_mutex_t is an aligned int that glibc
            // only modifies atomically; a relaxed atomic load of it is a plain read.
            let word = unsafe { &*(self.0.get() as *const std::sync::atomic::AtomicI32) };
            word.load(std::sync::atomic::Ordering::Relaxed) != 0
        }
        #[cfg(not(target_env = "gnu"))]
        {
            false
        }
    }
}

/// Sets the calling thread's name (for the main thread, what `ps -o comm` and `pgrep` show);
/// truncated to 15 bytes by the kernel.
pub(crate) fn set_process_name(name: &str) {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from buf.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

// ---------------------------------------------------------------------------------------------
// Pool support: a clock shared by processes, atomics in a mapping, epoll, non-blocking recvmsg
// ---------------------------------------------------------------------------------------------

/// `CLOCK_MONOTONIC` in nanoseconds: the same clock in every process of the machine, so a time
/// written by one process can be compared with another's.
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Mapping {
    /// The `i`-th aligned `u64` of the mapping as an atomic (panics if out of range).
    pub(crate) fn atomic_u64(&self, i: usize) -> &std::sync::atomic::AtomicU64 {
        assert!(
            (i + 1) * 8 <= self.len,
            "atomic_u64 index out of the mapping"
        );
        // SAFETY: the mapping is page aligned, so offset i*8 is 8-aligned; it is in range (checked
        // above) and lives as long as &self. Shared memory is only ever accessed atomically
        // through this view by the pool (worker and parent).
        unsafe { &*(self.ptr.add(i * 8) as *const std::sync::atomic::AtomicU64) }
    }
}

/// Duplicates a raw descriptor that belongs to a live value (a handle being serialized), so the
/// copy outlives that value (close-on-exec).
pub(crate) fn dup_raw(fd: RawFd) -> Result<OwnedFd> {
    // SAFETY: callers pass descriptors collected by `codec::encode_into` from handles that are
    // alive for this call; borrowing one for the duration of `dup` is sound.
    let b = unsafe { BorrowedFd::borrow_raw(fd) };
    dup(b)
}

/// An epoll instance (close-on-exec): a readiness set kept across waits, so waiting costs one
/// cheap system call whatever the number of descriptors.
pub(crate) fn epoll_create() -> Result<OwnedFd> {
    // SAFETY: epoll_create1 takes only flags.
    let r = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
    // SAFETY: the fd was just created.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// An epoll event record.
pub(crate) type EpollEvent = libc::epoll_event;

/// Readiness flags for [`epoll_ctl`].
pub(crate) const EPOLLIN: u32 = libc::EPOLLIN as u32;
/// See [`EPOLLIN`].
pub(crate) const EPOLLOUT: u32 = libc::EPOLLOUT as u32;

/// What [`epoll_ctl`] does.
#[derive(Clone, Copy, Debug)]
pub(crate) enum EpollOp {
    Add,
    Modify,
    Delete,
}

/// Adds, changes or removes `fd` in the set, with `events` and the token `data`.
pub(crate) fn epoll_ctl(
    ep: BorrowedFd<'_>,
    op: EpollOp,
    fd: BorrowedFd<'_>,
    events: u32,
    data: u64,
) -> Result<()> {
    let op = match op {
        EpollOp::Add => libc::EPOLL_CTL_ADD,
        EpollOp::Modify => libc::EPOLL_CTL_MOD,
        EpollOp::Delete => libc::EPOLL_CTL_DEL,
    };
    let mut ev = libc::epoll_event { events, u64: data };
    // SAFETY: ev is a valid epoll_event for the call; both fds are valid.
    cvt(unsafe { libc::epoll_ctl(ep.as_raw_fd(), op, fd.as_raw_fd(), &mut ev) })?;
    Ok(())
}

/// Waits for readiness (`timeout_ms < 0`: forever); fills `out` and returns how many entries.
/// `EINTR` counts as nothing ready.
pub(crate) fn epoll_wait(
    ep: BorrowedFd<'_>,
    out: &mut [EpollEvent],
    timeout_ms: i32,
) -> Result<usize> {
    // SAFETY: out is a valid, writable array of epoll_event of the given length.
    let r = unsafe {
        libc::epoll_wait(
            ep.as_raw_fd(),
            out.as_mut_ptr(),
            out.len().min(i32::MAX as usize) as i32,
            timeout_ms,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e.into());
    }
    Ok(r as usize)
}

/// [`recv_with_fds`] that never blocks: `WouldBlock` when nothing is there.
pub(crate) fn recv_with_fds_nowait(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    recvmsg_fds(fd, buf, fds, libc::MSG_DONTWAIT)
}

/// Closes a descriptor by number: for a forked child dropping its copy of a descriptor whose
/// owner lives in the parent.
pub(crate) fn close_raw(fd: RawFd) {
    // SAFETY: the caller names a descriptor this process has a copy of and never uses again.
    unsafe { libc::close(fd) };
}
// Socket options (connections)
// ---------------------------------------------------------------------------------------------

/// Asks for a send buffer of `bytes` on a socket (the kernel caps it at
/// `net.core.wmem_max` and doubles it for its bookkeeping). Best effort: large messages cross a
/// Unix stream socket in fewer, larger steps with a larger buffer.
pub(crate) fn set_send_buffer(fd: BorrowedFd<'_>, bytes: usize) -> Result<()> {
    let v: libc::c_int = bytes.min(libc::c_int::MAX as usize) as libc::c_int;
    // SAFETY: setsockopt reads exactly size_of::<c_int>() bytes from &v, which lives across the
    // call.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Receives up to `max` bytes from a socket (or reads from another descriptor), appending them
/// to `out` without zero-filling its spare capacity first. Returns the byte count (0 at end of
/// file). Ancillary data (descriptors) is not collected: this is for the body of a frame, whose
/// sender attaches none.
pub(crate) fn recv_append(fd: BorrowedFd<'_>, out: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    out.reserve(max);
    let spare = out.spare_capacity_mut();
    let want = max.min(spare.len());
    let ptr = spare.as_mut_ptr().cast::<libc::c_void>();
    let n = retry(|| {
        // SAFETY: `ptr` points to `want` bytes of spare capacity owned by `out`, writable and
        // not aliased during the call; the kernel writes at most `want` bytes there.
        let r = unsafe { libc::recv(fd.as_raw_fd(), ptr, want, 0) };
        if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOTSOCK) {
            // SAFETY: as above, for read(2).
            let r = unsafe { libc::read(fd.as_raw_fd(), ptr, want) };
            return cvt_long(r as libc::c_long).map(|n| n as usize);
        }
        cvt_long(r as libc::c_long).map(|n| n as usize)
    })?;
    // SAFETY: the kernel initialised the first `n <= want` bytes of the spare capacity.
    unsafe { out.set_len(out.len() + n) };
    Ok(n)
}

// ---------------------------------------------------------------------------------------------
// Managers: where a spinning thread runs, and a process id that costs no system call
// ---------------------------------------------------------------------------------------------

/// The CPU the calling thread runs on now (a hint: it may move at once), or `None` if the
/// system cannot say. Cheap: glibc reads it from the thread's rseq area or the vDSO.
pub(crate) fn current_cpu() -> Option<u32> {
    // SAFETY: sched_getcpu has no preconditions.
    let r = unsafe { libc::sched_getcpu() };
    u32::try_from(r).ok()
}

/// The calling process's id without a system call in the common case: cached in a page the
/// kernel wipes in a child made by any `fork` (`MADV_WIPEONFORK`), so a child never sees its
/// parent's pid. Falls back to `getpid` each time if such a page cannot be made.
///
/// The page is made lock-free (see [`pid_page`]): no `OnceLock`, whose "being initialised"
/// state a child forked at that moment would inherit with nobody left to finish it.
pub(crate) fn cached_pid() -> u32 {
    static PAGE: AtomicUsize = AtomicUsize::new(0);
    cached_pid_in(&PAGE)
}

/// A [`cached_pid`] slot's value when no page could be made (pages are 4096-aligned, so no
/// page has this address).
const NO_PID_PAGE: usize = 1;

/// [`cached_pid`] with its page address kept in `slot` (0: not made yet).
fn cached_pid_in(slot: &AtomicUsize) -> u32 {
    let mut page = slot.load(Ordering::Acquire);
    if page == 0 {
        page = pid_page(slot);
    }
    if page == NO_PID_PAGE {
        return getpid();
    }
    // SAFETY: `page` is a live, page-aligned, read-write mapping of 4096 bytes, published in
    // `slot` and never unmapped, only ever accessed through this atomic view.
    let word = unsafe { &*(page as *const AtomicU32) };
    match word.load(Ordering::Relaxed) {
        0 => {
            let pid = getpid();
            word.store(pid, Ordering::Relaxed);
            pid
        }
        pid => pid,
    }
}

/// Makes the wipe-on-fork page and publishes it in `slot` with one compare-exchange: threads
/// that race each make a page, the first to publish wins and the others unmap theirs. Nobody
/// ever waits, so a child forked in the middle (which inherits only the forking thread) finds
/// either nothing published (and makes its own page) or a published, wiped page.
fn pid_page(slot: &AtomicUsize) -> usize {
    // SAFETY: a fresh anonymous private mapping chosen by the kernel; nothing else is
    // affected.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    let mine = if p == libc::MAP_FAILED {
        NO_PID_PAGE
    // SAFETY: p is the page just mapped.
    } else if unsafe { libc::madvise(p, 4096, libc::MADV_WIPEONFORK) } != 0 {
        // SAFETY: p/4096 is the mapping made above, unused by anyone else.
        unsafe { libc::munmap(p, 4096) };
        NO_PID_PAGE
    } else {
        p as usize
    };
    match slot.compare_exchange(0, mine, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => mine,
        Err(theirs) => {
            if mine != NO_PID_PAGE {
                // SAFETY: our page was never published: nobody else knows its address.
                unsafe { libc::munmap(mine as *mut libc::c_void, 4096) };
            }
            theirs
        }
    }
}

/// Dead-peer detection on a TCP socket: keepalive probes after `idle` without traffic, every
/// `interval`, `count` of them unanswered closing the connection; and the same bound
/// (`idle + interval * count`) on data sent but never acknowledged (`TCP_USER_TIMEOUT`). A
/// peer whose machine vanished (no FIN, no RST) then gives an error instead of an endless wait.
pub(crate) fn set_tcp_keepalive(
    fd: BorrowedFd<'_>,
    idle: Duration,
    interval: Duration,
    count: u32,
) -> Result<()> {
    let secs = |d: Duration| d.as_secs().clamp(1, i32::MAX as u64) as libc::c_int;
    let user_ms = (idle + interval * count)
        .as_millis()
        .min(libc::c_int::MAX as u128) as libc::c_int;
    let opts = [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs(idle)),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, secs(interval)),
        (
            libc::IPPROTO_TCP,
            libc::TCP_KEEPCNT,
            count.clamp(1, i32::MAX as u32) as libc::c_int,
        ),
        (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, user_ms),
    ];
    for (level, name, v) in opts {
        // SAFETY: setsockopt reads exactly size_of::<c_int>() bytes from &v, which lives
        // across the call.
        cvt(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                name,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        })?;
    }
    Ok(())
}

/// Reads back what [`set_tcp_keepalive`] sets: `(SO_KEEPALIVE, TCP_KEEPIDLE s, TCP_KEEPINTVL s,
/// TCP_KEEPCNT, TCP_USER_TIMEOUT ms)`.
pub(crate) fn tcp_keepalive(fd: BorrowedFd<'_>) -> Result<(bool, i32, i32, i32, i32)> {
    let get = |level: libc::c_int, name: libc::c_int| -> Result<i32> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes to &mut v and updates len; both live
        // across the call.
        cvt(unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                level,
                name,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        })?;
        Ok(v)
    };
    Ok((
        get(libc::SOL_SOCKET, libc::SO_KEEPALIVE)? != 0,
        get(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE)?,
        get(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL)?,
        get(libc::IPPROTO_TCP, libc::TCP_KEEPCNT)?,
        get(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT)?,
    ))
}

/// A memfd of `size` bytes (zero-filled, close-on-exec) whose size is sealed: it can neither
/// shrink nor grow, and the seals cannot be changed. Whoever it is shared with can map it
/// without fearing a `SIGBUS` from a peer that shrinks it.
pub(crate) fn memfd_fixed_size(name: &CStr, size: usize) -> Result<OwnedFd> {
    let fd = memfd_sealable(name, size)?;
    add_seals(
        fd.as_fd_ref(),
        libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
    )?;
    Ok(fd)
}

/// A memfd of `size` bytes (zero-filled, close-on-exec) that may be sealed later
/// ([`add_seals`]) but is not sealed yet.
pub(crate) fn memfd_sealable(name: &CStr, size: usize) -> Result<OwnedFd> {
    // SAFETY: name is NUL-terminated; flags are valid.
    let r = cvt(unsafe {
        libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
    })?;
    // SAFETY: the fd was just created.
    let fd = unsafe { OwnedFd::from_raw_fd(r) };
    ftruncate(fd.as_fd_ref(), size)?;
    Ok(fd)
}

/// `fcntl(F_ADD_SEALS)`: adds `seals` (`F_SEAL_*` bits) to a sealable memfd.
pub(crate) fn add_seals(fd: BorrowedFd<'_>, seals: libc::c_int) -> Result<()> {
    // SAFETY: fcntl on a valid fd with an int argument.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) })?;
    Ok(())
}

/// True when the file behind `fd` is sealed against shrinking (see [`memfd_fixed_size`]).
pub(crate) fn size_sealed(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: fcntl on a valid fd; F_GET_SEALS takes no argument.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    r >= 0 && r & libc::F_SEAL_SHRINK != 0
}

/// Replaces each of `fds` in place by a descriptor of `/dev/null` (close-on-exec): the objects
/// that own those numbers stay valid, but what they referred to is no longer held open here.
/// For a forked child dropping its hold on the parent's sockets. Best effort: an `fd` that
/// cannot be covered is left as it was.
pub(crate) fn cover_with_dev_null(fds: &[RawFd]) {
    if fds.is_empty() {
        return;
    }
    // SAFETY: a constant NUL-terminated path; the flags ask for a new descriptor we own.
    let null = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if null < 0 {
        return;
    }
    for &fd in fds {
        if fd != null {
            // SAFETY: dup3 atomically makes `fd` refer to /dev/null; `fd` is a number some
            // object of ours owns, which stays owned (now by a /dev/null descriptor).
            unsafe { libc::dup3(null, fd, libc::O_CLOEXEC) };
        }
    }
    // SAFETY: `null` was opened above and is closed once.
    unsafe { libc::close(null) };
}

#[cfg(test)]
mod manager_support_tests {
    use super::*;

    #[test]
    fn cached_pid_is_the_pid_and_a_forked_child_sees_its_own() {
        assert_eq!(cached_pid(), std::process::id());
        // SAFETY: the child only calls cached_pid (its page is already made, so no lock is
        // taken), getpid and _exit: no allocation, nothing another thread could hold.
        let child = unsafe { libc::fork() };
        assert!(child >= 0);
        if child == 0 {
            // SAFETY: getpid and _exit are async-signal-safe.
            let ok = cached_pid() == unsafe { libc::getpid() } as u32;
            // SAFETY: as above.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked; status is a valid out-pointer.
        let r = unsafe { libc::waitpid(child, &mut status, 0) };
        assert_eq!(r, child);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        assert_eq!(cached_pid(), std::process::id());
    }

    /// Threads race to make a fresh slot's page while children are forked: every caller, in
    /// the parent and in each child, gets its own pid, and no child waits for a page that a
    /// thread it did not inherit was making.
    #[test]
    fn cached_pid_pages_are_made_without_locks_even_across_fork() {
        let me = std::process::id();
        for _ in 0..100 {
            // Leaked: a published page is never unmapped, so its slot must outlive it.
            let slot: &'static AtomicUsize = Box::leak(Box::new(AtomicUsize::new(0)));
            let racers: Vec<_> = (0..2)
                .map(|_| std::thread::spawn(move || cached_pid_in(slot)))
                .collect();
            // SAFETY: the child only calls cached_pid_in (mmap, madvise, munmap, getpid and
            // atomics: no allocation, no lock another thread could hold) and _exit.
            let child = unsafe { libc::fork() };
            assert!(child >= 0);
            if child == 0 {
                let ok = cached_pid_in(slot) == getpid();
                // SAFETY: _exit is async-signal-safe.
                unsafe { libc::_exit(if ok { 0 } else { 1 }) };
            }
            for r in racers {
                assert_eq!(r.join().unwrap(), me);
            }
            assert_eq!(cached_pid_in(slot), me);
            let t0 = std::time::Instant::now();
            let mut status = 0;
            loop {
                // SAFETY: polls the child just forked; status is a valid out-pointer.
                let r = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
                if r == child {
                    break;
                }
                assert_eq!(r, 0);
                if t0.elapsed() > Duration::from_secs(10) {
                    // SAFETY: kills and reaps our own child.
                    unsafe {
                        libc::kill(child, libc::SIGKILL);
                        libc::waitpid(child, &mut status, 0);
                    }
                    panic!("a forked child hangs in cached_pid");
                }
                std::thread::yield_now();
            }
            assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        }
    }

    #[test]
    fn current_cpu_is_one_of_ours() {
        let c = current_cpu().expect("Linux knows the CPU");
        assert!((c as usize) < 4096);
    }

    #[test]
    fn a_fixed_size_memfd_cannot_shrink() {
        let fd = memfd_fixed_size(c"fixed", 8192).unwrap();
        assert!(size_sealed(fd.as_fd_ref()));
        assert!(ftruncate(fd.as_fd_ref(), 4096).is_err());
        assert_eq!(fstat_size(fd.as_fd_ref()).unwrap(), 8192);
        assert!(!size_sealed(memfd(c"plain", 4096).unwrap().as_fd_ref()));
    }

    #[test]
    fn tcp_keepalive_options_are_set() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let fd = std::os::fd::AsFd::as_fd(&c);
        assert!(!tcp_keepalive(fd).unwrap().0);
        set_tcp_keepalive(fd, Duration::from_secs(10), Duration::from_secs(5), 4).unwrap();
        assert_eq!(tcp_keepalive(fd).unwrap(), (true, 10, 5, 4, 30_000));
    }
}
