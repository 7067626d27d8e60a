//! Pool: every method against a sequential oracle, and every failure the SPEC names.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use multiproc::{Error, ExitStatus, Pool, StartMethod, get_context};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

fn sq(x: i64) -> i64 {
    x * x
}
fn add((x, y, z): (i64, i64, i64)) -> i64 {
    x + y + z
}
fn pid_of(_: u32) -> u32 {
    std::process::id()
}
fn panic_on_7(x: i64) -> i64 {
    if x % 10 == 7 {
        panic!("seven: {x}");
    }
    x
}
fn do_abort(_: ()) -> u8 {
    std::process::abort()
}
fn do_exit(_: ()) -> u8 {
    std::process::exit(3)
}
fn do_segfault(_: ()) -> u8 {
    // SAFETY: not safe at all, on purpose: this writes through a null pointer to make the worker
    // die of SIGSEGV, which the pool must report as the task's WorkerLost.
    unsafe { std::ptr::null_mut::<u8>().write_volatile(1) };
    0
}
fn sleep_ms(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}
fn busy_ms(ms: u64) -> u64 {
    let t = Instant::now();
    let mut x = 0u64;
    while t.elapsed() < Duration::from_millis(ms) {
        x = x.wrapping_add(std::hint::black_box(1));
    }
    std::hint::black_box(x);
    ms
}

/// One pool shared by the oracle tests (creating pools is not what they test).
fn shared() -> &'static Pool {
    static P: OnceLock<Pool> = OnceLock::new();
    P.get_or_init(|| Pool::new(2).unwrap())
}

fn oracle(v: &[i64]) -> Vec<i64> {
    v.iter().map(|&x| sq(x)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn map_family_matches_sequential(v in proptest::collection::vec(-1000i64..1000, 0..300),
                                     cs in 1usize..40) {
        let p = shared();
        let want = oracle(&v);
        prop_assert_eq!(&p.map(sq, v.clone()).unwrap(), &want);
        prop_assert_eq!(&p.map_chunksize(sq, v.clone(), cs).unwrap(), &want);
        prop_assert_eq!(&p.map_async(sq, v.clone()).unwrap().get().unwrap(), &want);
        prop_assert_eq!(&p.map_async_chunksize(sq, v.clone(), cs).unwrap().get().unwrap(), &want);
        let t: Vec<(i64, i64, i64)> = v.iter().map(|&x| (x, 2 * x, 1)).collect();
        let want_t: Vec<i64> = t.iter().map(|&a| add(a)).collect();
        prop_assert_eq!(&p.starmap(add, t.clone()).unwrap(), &want_t);
        prop_assert_eq!(&p.starmap_chunksize(add, t.clone(), cs).unwrap(), &want_t);
        prop_assert_eq!(&p.starmap_async(add, t.clone()).unwrap().get().unwrap(), &want_t);
        prop_assert_eq!(&p.starmap_async_chunksize(add, t, cs).unwrap().get().unwrap(), &want_t);
    }

    #[test]
    fn imap_family_matches_sequential(v in proptest::collection::vec(-1000i64..1000, 0..300),
                                      cs in 1usize..40) {
        let p = shared();
        let want = oracle(&v);
        let got: Vec<i64> = p.imap(sq, v.clone()).unwrap().map(Result::unwrap).collect();
        prop_assert_eq!(&got, &want);
        let got: Vec<i64> = p.imap_chunksize(sq, v.clone(), cs).unwrap().map(Result::unwrap).collect();
        prop_assert_eq!(&got, &want);
        let mut got: Vec<i64> = p.imap_unordered(sq, v.clone()).unwrap().map(Result::unwrap).collect();
        let mut w = want.clone();
        got.sort();
        w.sort();
        prop_assert_eq!(&got, &w);
        let mut got: Vec<i64> =
            p.imap_unordered_chunksize(sq, v.clone(), cs).unwrap().map(Result::unwrap).collect();
        got.sort();
        prop_assert_eq!(&got, &w);
    }

    #[test]
    fn apply_matches_sequential(x in any::<i32>()) {
        let p = shared();
        let x = x as i64;
        prop_assert_eq!(p.apply(sq, x).unwrap(), sq(x));
        prop_assert_eq!(p.apply_async(sq, x).unwrap().get().unwrap(), sq(x));
    }
}

#[test]
fn every_start_method_works() {
    for m in StartMethod::ALL {
        let pool = get_context(m).pool(2).unwrap();
        assert_eq!(
            pool.map(sq, 0..50).unwrap(),
            oracle(&(0..50).collect::<Vec<_>>())
        );
        pool.close();
        pool.join().unwrap();
    }
}

#[test]
fn panics_are_task_errors_map_gives_first_imap_gives_each() {
    let p = shared();
    match p.map_chunksize(panic_on_7, 0..30, 4) {
        Err(Error::Panicked { message, .. }) => assert!(message.contains("seven: 7"), "{message}"),
        other => panic!("{other:?}"),
    }
    let got: Vec<Result<i64, Error>> = p.imap_chunksize(panic_on_7, 0..30, 4).unwrap().collect();
    assert_eq!(got.len(), 30);
    for (i, r) in got.iter().enumerate() {
        match r {
            Ok(v) => assert_eq!(*v, i as i64),
            Err(Error::Panicked { message, .. }) => {
                assert_eq!(i % 10, 7);
                assert!(message.contains(&format!("seven: {i}")));
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(got.iter().filter(|r| r.is_err()).count(), 3);
    // Still answers.
    assert_eq!(p.apply(sq, 3).unwrap(), 9);
}

#[test]
fn imap_is_lazy_on_endless_input() {
    let p = shared();
    let pulled = AtomicUsize::new(0);
    let it = (0i64..).inspect(|_| {
        pulled.fetch_add(1, Ordering::Relaxed);
    });
    let first: Vec<i64> = p
        .imap(sq, it)
        .unwrap()
        .take(1000)
        .map(Result::unwrap)
        .collect();
    assert_eq!(first, oracle(&(0..1000).collect::<Vec<_>>()));
    let n = pulled.load(Ordering::Relaxed);
    assert!(
        n < 5000,
        "imap read {n} items of an endless input for 1000 results"
    );
}

#[test]
fn imap_unordered_yields_everything_once() {
    let p = shared();
    let mut got: Vec<u64> = p
        .imap_unordered(sleep_ms, vec![30, 1, 1, 1, 20, 1])
        .unwrap()
        .map(Result::unwrap)
        .collect();
    got.sort();
    assert_eq!(got, vec![1, 1, 1, 1, 20, 30]);
}

fn lost(r: Result<u8, Error>) -> (u32, ExitStatus) {
    match r {
        Err(Error::WorkerLost { pid, status }) => (pid, status),
        other => panic!("expected WorkerLost, got {other:?}"),
    }
}

#[test]
fn abort_segfault_and_exit_fail_only_their_task() {
    let pool = Pool::new(2).unwrap();
    let before = pool.worker_pids();
    let (pid, st) = lost(pool.apply(do_abort, ()));
    assert!(before.contains(&pid));
    assert_eq!(st, ExitStatus::Signaled(libc::SIGABRT));
    let (_, st) = lost(pool.apply(do_segfault, ()));
    assert_eq!(st, ExitStatus::Signaled(libc::SIGSEGV));
    let (_, st) = lost(pool.apply(do_exit, ()));
    assert_eq!(st, ExitStatus::Exited(3));
    // Replaced at once, and still answering.
    assert_eq!(pool.map(sq, 0..20).unwrap().len(), 20);
    assert_eq!(pool.worker_pids().len(), 2);
    assert!(!pool.worker_pids().contains(&pid));
    // The dead workers were reaped: no zombie is left.
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}

fn proc_state(pid: u32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit(')').next()?.trim().chars().next()
}

fn set_comm(name: &std::ffi::CStr) {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes, which `name` is.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
}

/// Busy for `ms` with the process renamed `mp-busy` meanwhile: the test sees from outside
/// exactly when a worker is inside this task.
fn busy_named(ms: u64) -> u64 {
    set_comm(c"mp-busy");
    let r = busy_ms(ms);
    set_comm(c"mp-idle");
    r
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default()
}

#[test]
fn sigkill_in_the_middle_of_map_100_times() {
    let pool = Pool::builder().processes(2).build().unwrap();
    let mut lost_seen = 0;
    for run in 0..100 {
        // Start from idle workers (a replacement still starting up is not running a task).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pool
            .worker_pids()
            .iter()
            .all(|&p| proc_state(p) == Some('S'))
        {
            assert!(Instant::now() < deadline, "run {run}: workers never idle");
            std::thread::yield_now();
        }
        let pids = pool.worker_pids();
        let r = pool
            .map_async_chunksize(busy_named, vec![8u64; 4], 1)
            .unwrap();
        // Wait (bounded) until a worker is inside a task, then kill it.
        let deadline = Instant::now() + Duration::from_secs(10);
        let victim = loop {
            if let Some(p) = pids.iter().find(|&&p| comm(p).trim() == "mp-busy") {
                break *p;
            }
            assert!(Instant::now() < deadline, "run {run}: no worker ever ran");
            std::thread::yield_now();
        };
        // SAFETY: kill(2) has no memory arguments; the pid is one of our own workers.
        assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
        match r.get_timeout(Duration::from_secs(20)) {
            Err(Error::WorkerLost { pid, status }) => {
                assert_eq!(pid, victim, "run {run}");
                assert_eq!(status, ExitStatus::Signaled(libc::SIGKILL));
                lost_seen += 1;
            }
            Ok(v) => assert_eq!(v, vec![8; 4], "run {run}"),
            Err(e) => panic!("run {run}: {e:?}"),
        }
        assert_eq!(pool.apply(sq, run).unwrap(), run * run, "run {run}");
    }
    assert!(
        lost_seen >= 99,
        "only {lost_seen} of 100 kills hit a running task"
    );
    assert_eq!(pool.worker_pids().len(), 2);
}

#[test]
fn timeout_kills_and_replaces_the_worker() {
    let pool = Pool::builder()
        .processes(1)
        .task_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let before = pool.worker_pids();
    let t = Instant::now();
    assert!(matches!(pool.apply(sleep_ms, 20_000), Err(Error::Timeout)));
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(pool.apply(sleep_ms, 1).unwrap(), 1);
    assert_ne!(pool.worker_pids(), before);
    // Short tasks are not affected.
    assert_eq!(
        pool.map_chunksize(sleep_ms, vec![1; 10], 1).unwrap(),
        vec![1; 10]
    );
}

fn crash_once(path: String) -> u8 {
    if std::fs::metadata(&path).is_err() {
        std::fs::write(&path, b"x").unwrap();
        std::process::abort();
    }
    7
}

fn marker(name: &str) -> String {
    let p = std::env::temp_dir().join(format!("multiproc-pool-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p.to_string_lossy().into_owned()
}

#[test]
fn retries_rerun_lost_tasks() {
    let pool = Pool::builder().processes(1).retries(1).build().unwrap();
    let m = marker("retry");
    assert_eq!(pool.apply(crash_once, m.clone()).unwrap(), 7);
    let _ = std::fs::remove_file(&m);
    let pool = Pool::builder().processes(1).retries(0).build().unwrap();
    let m = marker("noretry");
    assert!(matches!(
        pool.apply(crash_once, m.clone()),
        Err(Error::WorkerLost { .. })
    ));
    let _ = std::fs::remove_file(&m);
    // A retried timeout is still a timeout when it keeps timing out.
    let pool = Pool::builder()
        .processes(1)
        .retries(2)
        .task_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    assert!(matches!(pool.apply(sleep_ms, 10_000), Err(Error::Timeout)));
}

#[test]
fn maxtasksperchild_recycles_workers() {
    let pool = Pool::builder()
        .processes(1)
        .maxtasksperchild(2)
        .build()
        .unwrap();
    let pids = pool.map_chunksize(pid_of, 0..6, 1).unwrap();
    let mut distinct = pids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "{pids:?}");
    assert_eq!(pids[0], pids[1]);
    assert_ne!(pids[1], pids[2]);
}

#[test]
fn terminate_in_the_middle_returns_promptly() {
    let pool = Pool::new(2).unwrap();
    let pids = pool.worker_pids();
    let r = pool
        .map_async_chunksize(sleep_ms, vec![5_000; 6], 1)
        .unwrap();
    let a = pool.apply_async(sleep_ms, 5_000).unwrap();
    let t = Instant::now();
    pool.terminate();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(matches!(r.get(), Err(Error::PoolTerminated)));
    assert!(matches!(a.get(), Err(Error::PoolTerminated)));
    for p in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{p}")).exists(),
            "worker {p} left"
        );
    }
    assert!(pool.apply(sq, 1).is_err());
    pool.join().unwrap();
}

#[test]
fn drop_in_the_middle_terminates() {
    let pool = Pool::new(2).unwrap();
    let pids = pool.worker_pids();
    let r = pool
        .map_async_chunksize(sleep_ms, vec![5_000; 4], 1)
        .unwrap();
    let t = Instant::now();
    drop(pool);
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(matches!(r.get(), Err(Error::PoolTerminated)));
    for p in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{p}")).exists(),
            "worker {p} left"
        );
    }
}

fn bad_init(_: ()) {
    panic!("cannot initialize");
}
fn good_init(n: u32) {
    assert_eq!(n, 5);
}

#[test]
fn failing_initializer_fails_creation() {
    let t = Instant::now();
    match Pool::builder()
        .processes(2)
        .initializer(bad_init, ())
        .build()
    {
        Err(Error::Panicked { message, .. }) => assert!(message.contains("cannot initialize")),
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(10));
    let pool = Pool::builder()
        .processes(2)
        .initializer(good_init, 5)
        .build()
        .unwrap();
    assert_eq!(pool.apply(sq, 2).unwrap(), 4);
}

/// A value whose odd numbers do not deserialize.
#[derive(Debug, PartialEq)]
struct Even(u32);
impl Serialize for Even {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}
impl<'de> Deserialize<'de> for Even {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u32::deserialize(d)?;
        if v % 2 == 1 {
            return Err(serde::de::Error::custom("odd"));
        }
        Ok(Even(v))
    }
}
fn to_even(x: u32) -> Even {
    Even(x)
}
fn from_even(e: Even) -> u32 {
    e.0
}

#[test]
fn undecodable_arguments_and_results_are_task_errors() {
    let p = shared();
    assert!(matches!(p.apply(to_even, 3), Err(Error::Decode(_))));
    assert_eq!(p.apply(to_even, 4).unwrap(), Even(4));
    assert!(matches!(p.apply(from_even, Even(3)), Err(Error::Decode(_))));
    let got: Vec<Result<Even, Error>> = p.imap(to_even, 0..4).unwrap().collect();
    assert!(got[0].is_ok() && got[1].is_err() && got[2].is_ok() && got[3].is_err());
    assert_eq!(p.apply(sq, 5).unwrap(), 25);
}

#[test]
fn async_result_api() {
    let p = shared();
    let r = p.apply_async(sleep_ms, 300).unwrap();
    assert!(!r.ready());
    assert!(r.successful().is_err());
    assert!(matches!(
        r.get_timeout(Duration::from_millis(10)),
        Err(Error::Timeout)
    ));
    assert!(!r.wait_timeout(Duration::from_millis(1)));
    r.wait();
    assert!(r.ready());
    assert!(r.successful().unwrap());
    assert_eq!(r.get().unwrap(), 300);

    let r = p.apply_async(panic_on_7, 7).unwrap();
    r.wait();
    assert!(!r.successful().unwrap());

    let (tx, rx) = std::sync::mpsc::channel();
    let tx2 = tx.clone();
    let _ok = p
        .map_async(sq, vec![1, 2, 3])
        .unwrap()
        .callback(move |v| tx.send(Ok(v.clone())).unwrap());
    let _err = p
        .apply_async(panic_on_7, 17)
        .unwrap()
        .error_callback(move |e| tx2.send(Err(e.to_string())).unwrap());
    let mut got = [
        rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        rx.recv_timeout(Duration::from_secs(10)).unwrap(),
    ];
    got.sort_by_key(|r| r.is_err());
    assert_eq!(got[0], Ok(vec![1, 4, 9]));
    assert!(got[1].as_ref().unwrap_err().contains("seven"));
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        assert!(Instant::now() < deadline, "future never completed");
        std::thread::park_timeout(Duration::from_millis(100));
    }
}

#[test]
fn async_result_is_a_future() {
    let p = shared();
    let v = block_on(async {
        let a = p.apply_async(sleep_ms, 50).unwrap().await.unwrap();
        let b = p.map_async(sq, vec![4, 5]).unwrap().await.unwrap();
        (a, b)
    });
    assert_eq!(v, (50, vec![16, 25]));
}

#[test]
fn close_refuses_new_work_and_join_waits() {
    let pool = Pool::new(2).unwrap();
    let r = pool.map_async_chunksize(sleep_ms, vec![50; 4], 1).unwrap();
    assert!(
        pool.join().is_err(),
        "join before close is an error, as in Python"
    );
    pool.close();
    assert!(pool.apply(sq, 1).is_err());
    pool.join().unwrap();
    assert_eq!(r.get().unwrap(), vec![50; 4]);
}

#[test]
fn zero_processes_is_an_error() {
    assert!(Pool::new(0).is_err());
}
