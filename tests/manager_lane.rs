//! Managers' fast lane (requests and replies through shared memory on Unix connections): a
//! manager killed while clients spin on it, many clients at once, messages larger than the
//! lane's slot, clients and servers that fall asleep between calls, a lane-less (TCP)
//! connection beside lane ones; and the per-process connection cache: connections to managers
//! that went away are not kept, and managers or lock guards dropped by thread-local
//! destructors do not abort the process.
//!
//! The descriptor counts below are per process: nextest runs each test in its own.

use std::cell::RefCell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use multiproc::managers::{DictProxy, LockGuard, LockProxy, Manager, QueueProxy};

const T: Duration = Duration::from_secs(10);

/// Sets `(id, n)` in a tight loop until a call fails; returns how many succeeded.
fn hammer((d, id): (DictProxy<(u32, u32), u32>, u32)) -> u32 {
    let mut n = 0;
    while d.set(&(id, n), &n).is_ok() {
        n += 1;
    }
    n
}

#[test]
fn a_manager_killed_while_clients_spin_fails_them_all_promptly() {
    let m = Manager::start().unwrap();
    let d = m.dict::<(u32, u32), u32>().unwrap();
    let kids: Vec<_> = (0..3)
        .map(|id| multiproc::spawn(hammer, (d.clone(), id)).unwrap())
        .collect();
    let dt = d.clone();
    let thread = std::thread::spawn(move || hammer((dt, 99)));
    // Every client is in its loop (each call spins on the lane for its reply) before the kill.
    let t0 = Instant::now();
    let all_in = || {
        [0, 1, 2, 99]
            .iter()
            .all(|&id| d.contains(&(id, 5)).unwrap())
    };
    while !all_in() && t0.elapsed() < T {}
    assert!(all_in());
    kill9(m.server_pid().unwrap());
    for k in kids {
        let n = k
            .join_timeout(T)
            .expect("the child ends (with an error), not hangs");
        assert!(n > 0);
    }
    assert!(thread.join().unwrap() > 0);
    assert!(d.get(&(0, 0)).is_err());
}

/// Writes its own keys and reads each back at once (read-your-writes), then checks them all.
fn writer((d, id, n): (DictProxy<(u32, u32), u64>, u32, u32)) -> Result<u32, String> {
    for i in 0..n {
        let v = u64::from(id) << 32 | u64::from(i);
        d.set(&(id, i), &v).map_err(|e| e.to_string())?;
        let back = d.get(&(id, i)).map_err(|e| e.to_string())?;
        if back != Some(v) {
            return Err(format!("({id}, {i}) read back {back:?}"));
        }
    }
    for i in 0..n {
        let v = d.get(&(id, i)).map_err(|e| e.to_string())?;
        if v != Some(u64::from(id) << 32 | u64::from(i)) {
            return Err(format!("({id}, {i}) later read {v:?}"));
        }
    }
    Ok(n)
}

#[test]
fn many_processes_and_threads_keep_one_dict_consistent() {
    let m = Manager::start().unwrap();
    let d = m.dict::<(u32, u32), u64>().unwrap();
    let n = 500;
    let kids: Vec<_> = (0..4)
        .map(|id| multiproc::spawn(writer, (d.clone(), id, n)).unwrap())
        .collect();
    let threads: Vec<_> = (10..13)
        .map(|id| {
            let d = d.clone();
            std::thread::spawn(move || writer((d, id, n)))
        })
        .collect();
    for k in kids {
        assert_eq!(k.join_timeout(T).unwrap(), Ok(n));
    }
    for t in threads {
        assert_eq!(t.join().unwrap(), Ok(n));
    }
    assert_eq!(d.len().unwrap(), 7 * n as usize);
    let mut items = d.items().unwrap();
    items.sort();
    assert_eq!(items.len(), 7 * n as usize);
    assert!(
        items
            .iter()
            .all(|((id, i), v)| *v == u64::from(*id) << 32 | u64::from(*i))
    );
}

fn big_round_trip((d, len): (DictProxy<u8, Vec<u8>>, usize)) -> bool {
    let v: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    d.set(&1, &v).unwrap();
    // Small calls before and after: the lane carries on in step after a large message.
    d.set(&2, &vec![7]).unwrap();
    d.get(&1).unwrap() == Some(v) && d.get(&2).unwrap() == Some(vec![7])
}

#[test]
fn messages_larger_than_the_lane_slot_cross_both_ways() {
    let m = Manager::start().unwrap();
    let d = m.dict::<u8, Vec<u8>>().unwrap();
    // Around and well beyond the 64 KiB slot, from a child and from here.
    for len in [60_000, 70_000, 300_000] {
        assert!(
            multiproc::spawn(big_round_trip, (d.clone(), len))
                .unwrap()
                .join_timeout(T)
                .unwrap()
        );
        assert!(big_round_trip((d.clone(), len)));
    }
    // A reply built from many small values (the item list) larger than the slot.
    let m2 = m.dict::<u32, u64>().unwrap();
    let kv: Vec<(u32, u64)> = (0..20_000).map(|i| (i, u64::from(i) * 3)).collect();
    m2.update(&kv).unwrap();
    let mut items = m2.items().unwrap();
    items.sort();
    assert_eq!(items, kv);
}

fn get_one(q: QueueProxy<u32>) -> u32 {
    q.get().unwrap()
}

#[test]
fn clients_and_servers_that_fall_asleep_are_woken() {
    let m = Manager::start().unwrap();
    let d = m.dict::<u32, u32>().unwrap();
    // Pauses longer than any spin: the server's connection thread sleeps on its socket
    // between these calls and must be rung awake.
    for i in 0..20 {
        d.set(&i, &i).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(d.get(&i).unwrap(), Some(i));
    }
    // A child blocked in a call sleeps on its socket for the reply; the put wakes it.
    let q = m.queue::<u32>(0).unwrap();
    for v in 0..3 {
        let h = multiproc::spawn(get_one, q.clone()).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        q.put(&v).unwrap();
        assert_eq!(h.join_timeout(T).unwrap(), v);
    }
}

fn use_remote((addr, key): (String, Vec<u8>)) -> u32 {
    let m = Manager::connect(addr.as_str(), &key).unwrap();
    let d = m.named("d").dict::<u32, u32>().unwrap();
    for i in 0..200 {
        d.set(&i, &(i + 1)).unwrap();
    }
    (0..200).map(|i| d.get(&i).unwrap().unwrap()).sum()
}

#[test]
fn lane_and_tcp_clients_share_one_server() {
    // One server listening on TCP: its clients have no lane. A second, on an abstract Unix
    // address, gives its clients lanes. Both serve the same way.
    let l = multiproc::connection::Listener::bind("127.0.0.1:0", b"k").unwrap();
    let tcp = l.address().to_string();
    let server = std::thread::spawn(move || Manager::serve_listener(l, |_| {}));
    let unix = multiproc::connection::Address::unique_abstract().unwrap();
    let ul = multiproc::connection::Listener::bind(&unix, b"k").unwrap();
    let unix_s = ul.address().to_string();
    let server2 = std::thread::spawn(move || Manager::serve_listener(ul, |_| {}));
    let want: u32 = (1..=200).sum();
    for addr in [tcp, unix_s] {
        let h = multiproc::spawn(use_remote, (addr.clone(), b"k".to_vec())).unwrap();
        assert_eq!(h.join_timeout(T).unwrap(), want);
        assert_eq!(use_remote((addr.clone(), b"k".to_vec())), want);
        let mut m = Manager::connect(addr.as_str(), b"k").unwrap();
        m.shutdown().unwrap();
    }
    server.join().unwrap().unwrap();
    server2.join().unwrap().unwrap();
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn lane_mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains("multiproc-manager-lane"))
        .count()
}

/// Long-lived threads that each make one call when handed a proxy (and keep their last
/// connection cached, as every thread does).
struct Callers {
    txs: Vec<mpsc::Sender<DictProxy<u32, u32>>>,
    acks: mpsc::Receiver<()>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Callers {
    fn new(n: usize) -> Callers {
        let (ack_tx, acks) = mpsc::channel();
        let mut txs = Vec::new();
        let mut threads = Vec::new();
        for _ in 0..n {
            let (tx, rx) = mpsc::channel::<DictProxy<u32, u32>>();
            let ack = ack_tx.clone();
            threads.push(std::thread::spawn(move || {
                while let Ok(d) = rx.recv() {
                    d.set(&1, &1).unwrap();
                    ack.send(()).unwrap();
                }
            }));
            txs.push(tx);
        }
        Callers { txs, acks, threads }
    }

    /// Every thread calls `d` once.
    fn call_all(&self, d: &DictProxy<u32, u32>) {
        for t in &self.txs {
            t.send(d.clone()).unwrap();
        }
        for _ in 0..self.txs.len() {
            self.acks.recv_timeout(T).unwrap();
        }
    }

    fn end(self) {
        drop(self.txs);
        for t in self.threads {
            t.join().unwrap();
        }
    }
}

/// SIGKILLs process `pid`.
fn kill9(pid: u32) {
    let st = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// Runs `round` twice to warm up, then ten times: this process's descriptors may grow by at
/// most `slack_fds` and its lane mappings not at all over the ten. Keeping every displaced
/// connection, the leak this guards against, costs 4 to 5 of each a round (40 to 50 over the
/// ten). Exact, as long as each round's manager is gone for good (every thread of its process
/// exited, see [`wait_dead`]) before the next round displaces the connections to it: one that
/// comes back while its server's sockets are still open is pooled, and stays there until the
/// next hung-up connection comes back.
fn assert_no_pile_up(mut round: impl FnMut(), slack_fds: usize) {
    round();
    round();
    let (f0, m0) = (open_fds(), lane_mappings());
    for _ in 0..10 {
        round();
    }
    let (f1, m1) = (open_fds(), lane_mappings());
    assert!(
        f1 <= f0 + slack_fds && m1 <= m0,
        "descriptors {f0} -> {f1}, lane mappings {m0} -> {m1} over 10 managers"
    );
}

#[test]
fn connections_to_shut_down_managers_do_not_pile_up() {
    // Each round: a manager starts, every thread calls it (displacing its cached connection
    // to the previous one, which was shut down meanwhile), and it is shut down. Kept, every
    // displaced connection would cost a socket and a lane mapping per thread per round.
    let callers = Callers::new(4);
    let round = || {
        let m = Manager::start().unwrap();
        callers.call_all(&m.dict::<u32, u32>().unwrap());
        drop(m);
    };
    assert_no_pile_up(round, 0);
    callers.end();
}

/// Waits (bounded) until process `pid` has exited with all its threads: only then are its
/// descriptors closed. A zombie main thread is not enough: `/proc/PID/stat` shows `Z` as soon
/// as the main thread has exited, while the others (a manager runs one per connection) may
/// still be exiting with the process's sockets open. A pidfd becomes readable only once the
/// whole thread group has exited.
fn wait_dead(pid: u32) {
    // SAFETY: pidfd_open takes a pid and flags; it returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    assert!(
        fd >= 0,
        "pidfd_open({pid}): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let t0 = Instant::now();
    loop {
        let left = T.saturating_sub(t0.elapsed());
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid, writable pollfd, for the duration of the call.
        let r = unsafe { libc::poll(&mut p, 1, left.as_millis() as libc::c_int) };
        if r == 1 {
            return;
        }
        assert_ne!(r, 0, "process {pid} still running {T:?} after SIGKILL");
        let e = std::io::Error::last_os_error();
        assert_eq!(e.kind(), std::io::ErrorKind::Interrupted, "poll: {e}");
    }
}

#[test]
fn connections_to_killed_managers_do_not_pile_up() {
    // As above, but each manager is killed from outside and its `Manager` kept: nobody tells
    // this process the manager went away, so only the hang-up of its sockets can.
    let callers = Callers::new(4);
    let mut kept = Vec::new();
    let round = || {
        let m = Manager::start().unwrap();
        callers.call_all(&m.dict::<u32, u32>().unwrap());
        let pid = m.server_pid().unwrap();
        kill9(pid);
        wait_dead(pid);
        kept.push(m);
    };
    // Each kept `Manager` holds its server's process handle (a pidfd): one descriptor a round.
    assert_no_pile_up(round, 10);
    callers.end();
    drop(kept);
}

thread_local! {
    static KEEP_GUARD: RefCell<Option<LockGuard<'static>>> = const { RefCell::new(None) };
    static KEEP_MANAGER: RefCell<Option<Manager>> = const { RefCell::new(None) };
}

/// In a thread, keeps a manager and a held lock's guard in thread-locals that are destroyed
/// after the thread's connection cache: both then call their manager from a destructor.
fn drop_from_thread_locals(_: ()) -> bool {
    let m = Manager::start().unwrap();
    let lock: &'static LockProxy = Box::leak(Box::new(m.lock().unwrap()));
    let t = std::thread::spawn(move || {
        // Thread-locals are destroyed in the reverse order of their first use: touch ours
        // before the first call sets up the connection cache.
        KEEP_GUARD.with(|_| ());
        KEEP_MANAGER.with(|k| *k.borrow_mut() = Some(Manager::start().unwrap()));
        let g = lock.acquire().unwrap();
        KEEP_GUARD.with(|k| *k.borrow_mut() = Some(g));
        KEEP_MANAGER.with(|k| {
            let k = k.borrow();
            k.as_ref()
                .unwrap()
                .dict::<u32, u32>()
                .unwrap()
                .set(&1, &1)
                .unwrap();
        });
    });
    t.join().is_ok() && !lock.locked().unwrap()
}

#[test]
fn a_manager_and_a_lock_guard_dropped_by_thread_local_destructors() {
    // In a child: before the fix the destructors' calls aborted the whole process.
    let h = multiproc::spawn(drop_from_thread_locals, ()).unwrap();
    assert!(h.join_timeout(T).expect("the child survives"));
}
