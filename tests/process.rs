//! Process, spawn and start-method behaviour, under every start method.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use multiproc::{Error, ExitStatus, Process, StartMethod, get_context};

fn noop(_: ()) {}
fn exit3(_: ()) {
    std::process::exit(3)
}
fn abort(_: ()) {
    std::process::abort()
}
fn sleep_forever(_: ()) {
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}
fn panics(msg: String) -> u32 {
    panic!("{msg}")
}
fn add((a, b): (i64, i64)) -> i64 {
    a + b
}
fn my_pid(_: ()) -> u32 {
    std::process::id()
}
fn identity(_: ()) -> (String, u32, Option<u32>, bool) {
    let me = multiproc::current_process();
    let parent = multiproc::parent_process().map(|p| p.pid());
    (me.name().to_string(), me.pid(), parent, me.daemon())
}

fn each_method(mut f: impl FnMut(StartMethod)) {
    for m in StartMethod::ALL {
        f(m)
    }
}

#[test]
fn start_join_exitcode_each_method() {
    each_method(|m| {
        let mut p = Process::new(noop, ()).context(get_context(m));
        assert_eq!(p.exitcode(), None);
        assert!(!p.is_alive());
        assert!(p.join().is_err(), "join before start is an error");
        p.start().unwrap();
        assert!(p.pid().is_some());
        assert!(p.start().is_err(), "{m}: start twice must fail");
        assert_eq!(p.join().unwrap(), ExitStatus::Exited(0));
        assert_eq!(p.exitcode(), Some(0), "{m}");
        assert!(!p.is_alive());
        p.close().unwrap();
        assert!(p.start().is_err(), "a closed process cannot start");
    });
}

#[test]
fn exit_codes_follow_python() {
    each_method(|m| {
        let ctx = get_context(m);
        let mut p = Process::new(exit3, ()).context(ctx);
        p.start().unwrap();
        p.join().unwrap();
        assert_eq!(p.exitcode(), Some(3), "{m}: exit(3)");

        let mut p = Process::new(abort, ()).context(ctx);
        p.start().unwrap();
        p.join().unwrap();
        assert_eq!(p.exitcode(), Some(-libc::SIGABRT), "{m}: abort");

        let mut p = Process::new(sleep_forever, ()).context(ctx);
        p.start().unwrap();
        assert!(p.is_alive());
        p.kill().unwrap();
        p.join().unwrap();
        assert_eq!(p.exitcode(), Some(-9), "{m}: SIGKILL");

        let mut p = Process::new(sleep_forever, ()).context(ctx);
        p.start().unwrap();
        p.terminate().unwrap();
        assert_eq!(
            p.join().unwrap(),
            ExitStatus::Signaled(libc::SIGTERM),
            "{m}"
        );
        assert_eq!(p.exitcode(), Some(-15));
    });
}

#[test]
fn panic_in_process_gives_exitcode_1() {
    each_method(|m| {
        let mut p = Process::new(panics, "expected test panic".to_string()).context(get_context(m));
        p.start().unwrap();
        p.join().unwrap();
        assert_eq!(p.exitcode(), Some(1), "{m}");
    });
}

#[test]
fn join_timeout_and_close_while_running() {
    each_method(|m| {
        let mut p = Process::new(sleep_forever, ()).context(get_context(m));
        p.start().unwrap();
        let t = Instant::now();
        assert_eq!(p.join_timeout(Duration::from_millis(50)).unwrap(), None);
        assert!(t.elapsed() >= Duration::from_millis(50));
        assert!(p.close().is_err(), "close while running must fail");
        p.kill().unwrap();
        assert_eq!(
            p.join_timeout(Duration::from_secs(5)).unwrap(),
            Some(ExitStatus::Signaled(9))
        );
    });
}

#[test]
fn spawn_returns_value_and_panics() {
    each_method(|m| {
        let ctx = get_context(m);
        let h = multiproc::spawn_in(ctx, add, (40, 2)).unwrap();
        assert_eq!(h.join().unwrap(), 42);
        let h = multiproc::spawn_in(ctx, panics, "boom 17".to_string()).unwrap();
        match h.join() {
            Err(Error::Panicked { message, backtrace }) => {
                assert!(message.contains("boom 17"), "{m}: {message}");
                assert!(!backtrace.is_empty(), "{m}: backtrace captured");
            }
            other => panic!("{m}: expected a panic, got {other:?}"),
        }
        let h = multiproc::spawn_in(ctx, abort, ()).unwrap();
        match h.join() {
            Err(Error::WorkerLost { status, .. }) => {
                assert_eq!(status, ExitStatus::Signaled(libc::SIGABRT))
            }
            other => panic!("{m}: expected WorkerLost, got {other:?}"),
        }
    });
}

#[test]
fn spawn_join_timeout() {
    let h = multiproc::spawn(sleep_forever, ()).unwrap();
    let pid = h.pid();
    assert!(matches!(
        h.join_timeout(Duration::from_millis(30)),
        Err(Error::Timeout)
    ));
    // SAFETY: plain kill of the child we started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

#[test]
fn children_are_real_children_with_identity() {
    each_method(|m| {
        let h = multiproc::spawn_in(get_context(m), my_pid, ()).unwrap();
        let pid = h.pid();
        assert_eq!(h.join().unwrap(), pid, "{m}");
        let (name, _pid, parent, daemon) = multiproc::spawn_in(get_context(m), identity, ())
            .unwrap()
            .join()
            .unwrap();
        assert!(name.starts_with("Process-"), "{m}: {name}");
        assert_eq!(parent, Some(std::process::id()), "{m}");
        assert!(!daemon);
    });
}

#[test]
fn named_process_and_worker_trait() {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct W {
        code: i32,
    }
    impl multiproc::Worker for W {
        fn run(self) {
            assert_eq!(multiproc::current_process().name(), "custom");
            std::process::exit(self.code)
        }
    }
    each_method(|m| {
        let mut p = Process::from_worker(W { code: 7 })
            .name("custom")
            .context(get_context(m));
        assert_eq!(p.get_name(), "custom");
        p.start().unwrap();
        p.join().unwrap();
        assert_eq!(p.exitcode(), Some(7), "{m}");
    });
}

#[test]
fn closure_needs_fork() {
    let captured = String::from("123");
    let mut p = Process::from_closure(move || {
        assert_eq!(captured.len(), 3);
        std::process::exit(5)
    });
    p.start().unwrap();
    p.join().unwrap();
    assert_eq!(p.exitcode(), Some(5));
    let mut p = Process::from_closure(|| {}).context(get_context(StartMethod::Spawn));
    assert!(matches!(p.start(), Err(Error::InvalidArgument(_))));
}

#[test]
fn active_children_tracks_and_reaps() {
    let mut p = Process::new(sleep_forever, ()).name("sleeper");
    p.start().unwrap();
    let pid = p.pid().unwrap();
    assert!(
        multiproc::active_children()
            .iter()
            .any(|c| c.pid == pid && c.name == "sleeper")
    );
    p.kill().unwrap();
    p.join().unwrap();
    assert!(!multiproc::active_children().iter().any(|c| c.pid == pid));
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn zombie_children() -> Vec<u32> {
    let me = std::process::id();
    let mut z = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let mut it = rest.split_whitespace();
        let state = it.next().unwrap();
        let ppid: u32 = it.next().unwrap().parse().unwrap();
        if ppid == me && state == "Z" {
            z.push(pid);
        }
    }
    z
}

#[test]
fn many_cycles_leave_no_zombie_and_no_fd() {
    for (m, n) in [
        (StartMethod::ForkServer, 1000),
        (StartMethod::Fork, 300),
        (StartMethod::Spawn, 100),
    ] {
        let ctx = get_context(m);
        // Warm up: the fork server's socket is opened once.
        let mut p = Process::new(noop, ()).context(ctx);
        p.start().unwrap();
        p.join().unwrap();
        drop(p);
        let fds = open_fds();
        for _ in 0..n {
            let mut p = Process::new(noop, ()).context(ctx);
            p.start().unwrap();
            p.join().unwrap();
        }
        // spawn() handles too, some dropped without join.
        for i in 0..20 {
            let h = multiproc::spawn_in(ctx, add, (i, 1)).unwrap();
            if i % 2 == 0 {
                assert_eq!(h.join().unwrap(), i + 1);
            }
        }
        // The dropped handles' children are reaped by the reaper within a bounded time.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !zombie_children().is_empty() {
            assert!(
                Instant::now() < deadline,
                "{m}: zombies left: {:?}",
                zombie_children()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while open_fds() > fds {
            assert!(
                Instant::now() < deadline,
                "{m}: leaked descriptors: {} before, {} after",
                fds,
                open_fds()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn pidfd_of(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open with a pid and no flags.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as i32, 0) };
    // SAFETY: a fresh descriptor on success.
    (r >= 0).then(|| unsafe { OwnedFd::from_raw_fd(r as i32) })
}

fn wait_exit(fd: &OwnedFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) == 1 }
}

#[test]
fn daemon_child_dies_with_sigkilled_parent() {
    each_method(|m| {
        let (mut here, there) = UnixStream::pair().unwrap();
        here.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // The intermediate parent: a forked copy that starts a daemon grandchild with method `m`
        // and reports its pid, then waits to be killed.
        let mut parent = Process::from_closure(move || {
            let mut there = there;
            let mut d = Process::new(sleep_forever, ())
                .daemon(true)
                .context(get_context(m));
            d.start().unwrap();
            there.write_all(&d.pid().unwrap().to_le_bytes()).unwrap();
            sleep_forever(());
        });
        parent.start().unwrap();
        let mut buf = [0u8; 4];
        here.read_exact(&mut buf).unwrap();
        let daemon = u32::from_le_bytes(buf);
        let pidfd = pidfd_of(daemon).expect("daemon is running");
        parent.kill().unwrap();
        parent.join().unwrap();
        assert!(
            wait_exit(&pidfd, Duration::from_secs(1)),
            "{m}: daemon {daemon} still alive 1 s after its parent was SIGKILLed"
        );
    });
}

#[test]
fn daemon_flag_reaches_child() {
    fn is_daemon(_: ()) {
        std::process::exit(if multiproc::current_process().daemon() {
            0
        } else {
            9
        })
    }
    each_method(|m| {
        let mut p = Process::new(is_daemon, ())
            .daemon(true)
            .context(get_context(m));
        p.start().unwrap();
        p.join().unwrap();
        assert_eq!(p.exitcode(), Some(0), "{m}");
    });
}

#[test]
fn child_of_different_build_refuses() {
    let exe = std::fs::read("/proc/self/exe").unwrap();
    let id = multiproc::build_id();
    let mut patched = exe.clone();
    match exe.windows(id.len()).position(|w| w == id) {
        Some(at) => patched[at] ^= 0xff,
        None => patched.push(0), // no GNU build-id note: the id is a hash of the file
    }
    let dir = std::env::temp_dir().join(format!("multiproc-buildid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("other-build");
    std::fs::write(&path, &patched).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    multiproc::set_executable(Some(&path)).unwrap();
    let r = multiproc::spawn_in(get_context(StartMethod::Spawn), add, (1, 2))
        .unwrap()
        .join();
    multiproc::set_executable(None).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    match r {
        Err(Error::BuildIdMismatch { parent, child }) => {
            assert_ne!(parent, child);
            let msg = Error::BuildIdMismatch { parent, child }.to_string();
            assert!(msg.contains("different build"), "{msg}");
        }
        other => panic!("expected BuildIdMismatch, got {other:?}"),
    }
}

#[test]
fn arguments_that_fail_to_serialize_fail_at_start() {
    struct Bad;
    impl serde::Serialize for Bad {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("refuses to serialize"))
        }
    }
    impl<'de> serde::Deserialize<'de> for Bad {
        fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
            Ok(Bad)
        }
    }
    fn take(_: Bad) {}
    let mut p = Process::new(take, Bad);
    assert!(matches!(p.start(), Err(Error::Encode(_))));
    assert!(multiproc::spawn(take, Bad).is_err());
}

#[test]
fn cpu_counts() {
    assert!(multiproc::cpu_count() >= 1);
    assert!(multiproc::process_cpu_count() >= 1);
    assert!(multiproc::process_cpu_count() <= multiproc::cpu_count());
}

#[test]
fn daemon_started_from_a_short_lived_thread_outlives_the_thread() {
    // PR_SET_PDEATHSIG follows the creating *thread*: children must be made from a thread that
    // lives as long as the process, whichever thread asks (and the fork server must be started
    // from one too, since its children inherit its parent thread).
    each_method(|m| {
        let p = std::thread::spawn(move || {
            let mut p = Process::new(sleep_forever, ())
                .daemon(true)
                .context(get_context(m));
            p.start().unwrap();
            p
        })
        .join()
        .unwrap();
        assert_eq!(
            p.join_timeout(Duration::from_millis(300)).unwrap(),
            None,
            "{m}: the daemon died with the thread that started it"
        );
        p.kill().unwrap();
        p.join().unwrap();
    });
}

/// The child forks a grandchild (which keeps a copy of the boot socket) and aborts. The
/// grandchild sends its pid on `hold` and lives until the test kills it.
fn abort_leaving_grandchild(mut hold: multiproc::Connection<u32>) {
    // SAFETY: fork in a child process; the copy only sends on a socket, waits and exits.
    if unsafe { libc::fork() } == 0 {
        // Hold no copy of the test's output pipes (the harness waits for them to close).
        if let Ok(null) = std::fs::File::open("/dev/null") {
            // SAFETY: dup2 on descriptors this process owns.
            unsafe {
                libc::dup2(null.as_raw_fd(), 1);
                libc::dup2(null.as_raw_fd(), 2);
            }
        }
        let _ = hold.send(&std::process::id());
        std::thread::sleep(Duration::from_secs(60));
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(0) }
    }
    std::process::abort()
}

#[test]
fn join_sees_a_dead_child_whose_grandchild_holds_the_boot_socket() {
    each_method(|m| {
        let (mut keep, hold) = multiproc::Pipe::<u32>::new(true).unwrap();
        let h = multiproc::spawn_in(get_context(m), abort_leaving_grandchild, hold).unwrap();
        let joined = h.join_timeout(Duration::from_secs(10));
        let grandchild = keep.recv_timeout(Duration::from_secs(10)).unwrap();
        // SAFETY: kill takes a pid and a signal number.
        unsafe { libc::kill(grandchild as libc::pid_t, libc::SIGKILL) };
        match joined {
            Err(Error::WorkerLost { status, .. }) => {
                assert_eq!(status, ExitStatus::Signaled(libc::SIGABRT), "{m}")
            }
            other => panic!("{m}: expected WorkerLost, got {other:?}"),
        }
    });
}

#[test]
fn a_killed_fork_server_is_replaced() {
    let ctx = get_context(StartMethod::ForkServer);
    let mut p = Process::new(noop, ()).context(ctx);
    p.start().unwrap();
    p.join().unwrap();
    let server = multiproc::forkserver_pid().expect("the fork server runs");
    // SAFETY: kill of our own fork server.
    unsafe { libc::kill(server as i32, libc::SIGKILL) };
    let mut p = Process::new(exit3, ()).context(ctx);
    p.start().unwrap();
    p.join().unwrap();
    assert_eq!(p.exitcode(), Some(3));
    let replacement = multiproc::forkserver_pid().expect("a new fork server runs");
    assert_ne!(replacement, server);
    assert!(
        !zombie_children().contains(&server),
        "the dead server was not reaped"
    );
}
