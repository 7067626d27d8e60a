//! The raw limits: the operation a row measures, done with bare system calls and nothing else.
//!
//! * [`fork_wait`]: `fork` + `_exit(0)` in the child + `waitpid` (the floor of `start_fork` and
//!   `start_forkserver`).
//! * [`fork_exec_wait`]: `fork` + `execve` of this same binary, which exits at once, + `waitpid`
//!   (the floor of `start_spawn`). The exec'd copy exits from the executable's `.init_array`,
//!   before `main`, at the point where a spawned child would start reading its task; programs
//!   may also call [`exit_if_raw_child`] first thing in `main` (a no-op after the hook).
//! * [`pipe_rtt`]: one byte ping-pong between two processes over two pipes.
//! * [`pipe_stream`]: one process writes `n` messages of `size` bytes, one `write` each, the
//!   other reads them, one `read` each.
//! * [`memcpy_bandwidth`]: copying a buffer in memory, the ceiling of any large-message path.
//!
//! Every forked child here only calls `read`, `write`, `execve` and `_exit` (async-signal-safe),
//! so the functions may be called from a multithreaded program.

use std::os::fd::AsFd;
use std::time::Instant;

use crate::error::{Error, ExitStatus, Result};
use crate::platform::{self, ExecArgs, Forked};

use super::median;

/// The environment variable that makes a program calling [`exit_if_raw_child`] exit at once.
pub const RAW_EXIT_ENV: &str = "__MULTIPROC_BENCH_RAW_EXIT";

/// Exits at once (status 0, no destructors, no `atexit`) if this process is the exec'd child of
/// [`fork_exec_wait`]. Call it first thing in `main` of any program that measures that limit.
pub fn exit_if_raw_child() {
    if std::env::var_os(RAW_EXIT_ENV).is_some() {
        platform::exit_now(0);
    }
}

/// Runs before `main` in every program that links multiproc: one environment look-up, so that
/// the exec'd copy of [`fork_exec_wait`] costs exactly an exec of this binary and no more.
extern "C" fn raw_exit_on_load() {
    exit_if_raw_child();
}

// SAFETY: `.init_array` holds `extern "C" fn()` pointers that the loader calls once, before
// `main`, with no arguments; `raw_exit_on_load` has that type and does not unwind (it reads the
// environment and returns, or exits).
#[used]
#[unsafe(link_section = ".init_array")]
static RAW_EXIT_ON_LOAD: extern "C" fn() = raw_exit_on_load;

fn expect_clean_exit(status: Option<ExitStatus>, what: &str) -> Result<()> {
    match status {
        Some(ExitStatus::Exited(0)) => Ok(()),
        other => Err(Error::state(format!("{what}: child ended with {other:?}"))),
    }
}

/// Median seconds of `n` rounds of `fork` + child `_exit(0)` + `waitpid`.
pub fn fork_wait(n: usize) -> Result<f64> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let t = Instant::now();
        // SAFETY: the child only calls _exit.
        match unsafe { platform::fork() }? {
            Forked::Child => platform::exit_now(0),
            Forked::Parent(pid) => expect_clean_exit(platform::reap_pid(pid), "fork+waitpid")?,
        }
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

/// Median seconds of `n` rounds of `fork` + `execve("/proc/self/exe")` with [`RAW_EXIT_ENV`]
/// set + `waitpid`. Fails if the exec'd program does not exit with 0 (it must call
/// [`exit_if_raw_child`]).
pub fn fork_exec_wait(n: usize) -> Result<f64> {
    let args = ExecArgs::new(
        "multiproc",
        |k| k != RAW_EXIT_ENV,
        format!("{RAW_EXIT_ENV}=1"),
    )?;
    let mut times = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let t = Instant::now();
        // SAFETY: the child only calls execve and _exit on data allocated before the fork.
        match unsafe { platform::fork() }? {
            Forked::Child => {
                let _ = platform::execve(c"/proc/self/exe", &args.argv, &args.envp);
                platform::exit_now(127)
            }
            Forked::Parent(pid) => expect_clean_exit(platform::reap_pid(pid), "fork+exec+waitpid")?,
        }
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

/// Median seconds of a one-byte round trip between this process and a child over two pipes,
/// over `n` round trips (after 100 unmeasured ones).
pub fn pipe_rtt(n: usize) -> Result<f64> {
    let (a_r, a_w) = platform::pipe()?;
    let (b_r, b_w) = platform::pipe()?;
    let warm = 100;
    let total = n.max(1) + warm;
    // SAFETY: the child only closes descriptors, reads, writes and calls _exit.
    let pid = match unsafe { platform::fork() }? {
        Forked::Child => {
            drop(a_w);
            drop(b_r);
            let mut byte = [0u8; 1];
            for _ in 0..total {
                if !matches!(platform::read_exact(a_r.as_fd(), &mut byte), Ok(true))
                    || platform::write(b_w.as_fd(), &byte).is_err()
                {
                    platform::exit_now(1);
                }
            }
            platform::exit_now(0)
        }
        Forked::Parent(pid) => pid,
    };
    drop(a_r);
    drop(b_w);
    let mut times = Vec::with_capacity(total);
    let mut byte = [b'x'; 1];
    let mut failed = false;
    for _ in 0..total {
        let t = Instant::now();
        if platform::write(a_w.as_fd(), &byte).is_err()
            || !matches!(platform::read_exact(b_r.as_fd(), &mut byte), Ok(true))
        {
            failed = true;
            break;
        }
        times.push(t.elapsed().as_secs_f64());
    }
    drop(a_w);
    let status = platform::reap_pid(pid);
    if failed {
        return Err(Error::state("pipe ping-pong: the child stopped answering"));
    }
    expect_clean_exit(status, "pipe ping-pong")?;
    Ok(median(times.split_off(warm)))
}

/// Messages per second from a child writing `n` messages of `size` bytes into a pipe, one
/// `write` each, to this process reading them, one `read` of `size` bytes each. Timed from the
/// go signal to the last byte.
pub fn pipe_stream(n: usize, size: usize) -> Result<f64> {
    let (data_r, data_w) = platform::pipe()?;
    let (go_r, go_w) = platform::pipe()?;
    let n = n.max(1);
    let msg = vec![b'x'; size.max(1)];
    // SAFETY: the child only closes descriptors, reads, writes and calls _exit (the message
    // buffer was allocated before the fork).
    let pid = match unsafe { platform::fork() }? {
        Forked::Child => {
            drop(data_r);
            drop(go_w);
            let mut go = [0u8; 1];
            if !matches!(platform::read_exact(go_r.as_fd(), &mut go), Ok(true)) {
                platform::exit_now(1);
            }
            for _ in 0..n {
                let mut m = &msg[..];
                while !m.is_empty() {
                    match platform::write(data_w.as_fd(), m) {
                        Ok(k) if k > 0 => m = &m[k..],
                        _ => platform::exit_now(1),
                    }
                }
            }
            platform::exit_now(0)
        }
        Forked::Parent(pid) => pid,
    };
    drop(data_w);
    drop(go_r);
    let mut buf = msg;
    let t = Instant::now();
    let mut ok = platform::write(go_w.as_fd(), b"g").is_ok();
    for _ in 0..n {
        if !ok || !matches!(platform::read_exact(data_r.as_fd(), &mut buf), Ok(true)) {
            ok = false;
            break;
        }
    }
    let dt = t.elapsed().as_secs_f64();
    drop(go_w);
    drop(data_r);
    let status = platform::reap_pid(pid);
    if !ok {
        return Err(Error::state("pipe stream: the writer stopped early"));
    }
    expect_clean_exit(status, "pipe stream")?;
    Ok(n as f64 / dt)
}

/// Bytes per second of copying a `size`-byte buffer `n` times (after one unmeasured copy).
pub fn memcpy_bandwidth(size: usize, n: usize) -> f64 {
    let src = vec![0x5au8; size.max(1)];
    let mut dst = vec![0u8; size.max(1)];
    dst.copy_from_slice(&src);
    let t = Instant::now();
    for _ in 0..n.max(1) {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
    }
    (size.max(1) * n.max(1)) as f64 / t.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Functional checks only: each limit runs and reports a sane figure (no timing asserted).

    #[test]
    fn fork_and_exec_limits_run_their_children_cleanly() {
        assert!(fork_wait(3).unwrap() > 0.0);
        // The exec'd copy of this test binary exits from the .init_array hook with 0.
        assert!(fork_exec_wait(2).unwrap() > 0.0);
    }

    #[test]
    fn pipe_limits_move_every_byte() {
        assert!(pipe_rtt(10).unwrap() > 0.0);
        assert!(pipe_stream(1000, 8).unwrap() > 0.0);
        assert!(pipe_stream(3, 100_000).unwrap() > 0.0);
        assert!(memcpy_bandwidth(4096, 10) > 0.0);
    }
}
