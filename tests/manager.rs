//! Managers: every object type, proxies in children under every start method, concurrency,
//! a dead manager, shutdown under load, a dead lock holder, remote serve/connect, user types.

use std::time::{Duration, Instant};

use multiproc::managers::{
    DictProxy, EventProxy, ListProxy, LockProxy, Manager, QueueProxy, Registry, SharedObject,
    ValueProxy, args, reply,
};
use multiproc::{Error, Process, StartMethod, get_context};

const T: Duration = Duration::from_secs(10);

#[test]
fn every_object_type_works() {
    let m = Manager::start().unwrap();

    let d = m.dict::<String, Vec<u32>>().unwrap();
    d.set(&"a".into(), &vec![1]).unwrap();
    d.update(&[("b".into(), vec![2]), ("c".into(), vec![3])])
        .unwrap();
    assert_eq!(d.len().unwrap(), 3);
    assert_eq!(d.get(&"b".into()).unwrap(), Some(vec![2]));
    assert!(d.contains(&"c".into()).unwrap());
    assert_eq!(d.pop(&"c".into()).unwrap(), Some(vec![3]));
    assert_eq!(d.setdefault(&"a".into(), &vec![9]).unwrap(), vec![1]);
    let mut keys = d.keys().unwrap();
    keys.sort();
    assert_eq!(keys, vec!["a", "b"]);
    d.clear().unwrap();
    assert!(d.is_empty().unwrap());

    let l = m.list::<i32>().unwrap();
    l.extend(&[1, 2, 3]).unwrap();
    l.append(&4).unwrap();
    l.insert(0, &0).unwrap();
    l.set(-1, &40).unwrap();
    assert_eq!(l.to_vec().unwrap(), vec![0, 1, 2, 3, 40]);
    assert_eq!(l.pop().unwrap(), 40);
    assert_eq!(l.pop_at(0).unwrap(), 0);
    assert_eq!(l.index(&3).unwrap(), Some(2));
    l.remove(&2).unwrap();
    assert_eq!(l.count(&1).unwrap(), 1);
    assert!(matches!(l.get(10), Err(Error::InvalidArgument(_))));

    let ns = m.namespace().unwrap();
    ns.set("x", &1u8).unwrap();
    ns.set("name", "bob").unwrap();
    assert_eq!(ns.get::<String>("name").unwrap().as_deref(), Some("bob"));
    assert_eq!(ns.names().unwrap(), vec!["name", "x"]);
    assert!(ns.del("x").unwrap());
    assert_eq!(ns.get::<u8>("x").unwrap(), None);

    let q = m.queue::<u64>(2).unwrap();
    q.put(&1).unwrap();
    q.put(&2).unwrap();
    assert!(q.full().unwrap());
    assert!(matches!(
        q.put_timeout(&3, Duration::from_millis(20)),
        Err(Error::Full)
    ));
    assert_eq!(q.get().unwrap(), 1);
    assert_eq!(q.try_get().unwrap(), 2);
    assert!(matches!(q.try_get(), Err(Error::Empty)));
    assert!(matches!(
        q.join_timeout(Duration::from_millis(20)),
        Err(Error::Timeout)
    ));
    q.task_done().unwrap();
    q.task_done().unwrap();
    q.join_timeout(T).unwrap();

    let lk = m.lock().unwrap();
    {
        let _g = lk.acquire().unwrap();
        assert!(lk.locked().unwrap());
        assert!(
            lk.acquire_timeout(Duration::from_millis(20))
                .unwrap()
                .is_none()
        );
    }
    assert!(!lk.locked().unwrap());

    let v = m.value(&(1u8, "one".to_string())).unwrap();
    assert_eq!(v.get().unwrap(), (1, "one".to_string()));
    v.set(&(2, "two".into())).unwrap();
    assert_eq!(v.get().unwrap().0, 2);

    let e = m.event().unwrap();
    assert!(!e.is_set().unwrap());
    assert!(!e.wait_timeout(Duration::from_millis(10)).unwrap());
    e.set().unwrap();
    e.wait().unwrap();
    e.clear().unwrap();
    assert!(!e.is_set().unwrap());

    let b = m.barrier(1).unwrap();
    assert_eq!(b.wait().unwrap(), 0);
    let b2 = m.barrier(2).unwrap();
    assert!(matches!(
        b2.wait_timeout(Duration::from_millis(20)),
        Err(Error::BrokenBarrier)
    ));
    assert!(b2.broken().unwrap());
    b2.reset().unwrap();
    assert!(!b2.broken().unwrap());
    assert_eq!(b2.parties().unwrap(), 2);
}

fn child_fills((d, l, q, i): (DictProxy<u32, String>, ListProxy<u32>, QueueProxy<u32>, u32)) {
    d.set(&i, &format!("child {i}")).unwrap();
    l.append(&i).unwrap();
    q.put(&(i * 10)).unwrap();
}

#[test]
fn proxies_work_in_children_under_every_start_method() {
    let m = Manager::start().unwrap();
    for (k, method) in StartMethod::ALL.into_iter().enumerate() {
        let d = m.dict::<u32, String>().unwrap();
        let l = m.list::<u32>().unwrap();
        let q = m.queue::<u32>(0).unwrap();
        let ctx = get_context(method);
        let hs: Vec<_> = (0..3)
            .map(|i| {
                multiproc::spawn_in(ctx, child_fills, (d.clone(), l.clone(), q.clone(), i)).unwrap()
            })
            .collect();
        let mut p = Process::new(child_fills, (d.clone(), l.clone(), q.clone(), 3)).context(ctx);
        p.start().unwrap();
        for h in hs {
            h.join().unwrap();
        }
        p.join_timeout(T).unwrap().expect("ended");
        assert_eq!(p.exitcode(), Some(0), "{method}");
        assert_eq!(d.len().unwrap(), 4, "{method} {k}");
        assert_eq!(d.get(&3).unwrap().unwrap(), "child 3");
        let mut got = l.to_vec().unwrap();
        got.sort();
        assert_eq!(got, vec![0, 1, 2, 3]);
        let mut qs: Vec<u32> = (0..4).map(|_| q.get_timeout(T).unwrap()).collect();
        qs.sort();
        assert_eq!(qs, vec![0, 10, 20, 30]);
    }
}

fn add_under_lock((v, lk, n): (ValueProxy<u64>, LockProxy, u64)) {
    for _ in 0..n {
        let _g = lk.acquire().unwrap();
        let x = v.get().unwrap();
        v.set(&(x + 1)).unwrap();
    }
}

#[test]
fn concurrent_clients_see_consistent_results() {
    let m = Manager::start().unwrap();
    let v = m.value(&0u64).unwrap();
    let lk = m.lock().unwrap();
    let hs: Vec<_> = (0..4)
        .map(|_| multiproc::spawn(add_under_lock, (v.clone(), lk.clone(), 100)).unwrap())
        .collect();
    // And threads of this process at the same time.
    let ts: Vec<_> = (0..2)
        .map(|_| {
            let (v, lk) = (v.clone(), lk.clone());
            std::thread::spawn(move || add_under_lock((v, lk, 100)))
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    for t in ts {
        t.join().unwrap();
    }
    assert_eq!(v.get().unwrap(), 600);
}

fn die_holding_lock((lk, e): (LockProxy, EventProxy)) {
    let g = lk.acquire().unwrap();
    e.set().unwrap();
    std::mem::forget(g);
    std::process::abort();
}

#[test]
fn a_dead_lock_holder_does_not_deadlock_the_others() {
    let m = Manager::start().unwrap();
    let lk = m.lock().unwrap();
    let e = m.event().unwrap();
    let h = multiproc::spawn(die_holding_lock, (lk.clone(), e.clone())).unwrap();
    assert!(e.wait_timeout(T).unwrap());
    assert!(h.join().is_err());
    let g = lk.acquire_timeout(T).unwrap();
    assert!(g.is_some(), "the server released the dead holder's lock");
}

fn block_on_queue(q: QueueProxy<u8>) -> String {
    match q.get() {
        Ok(v) => format!("got {v}"),
        Err(e) => format!("error: {e}"),
    }
}

#[test]
fn a_dead_manager_gives_errors_not_hangs() {
    let m = Manager::start().unwrap();
    let d = m.dict::<u8, u8>().unwrap();
    let q = m.queue::<u8>(0).unwrap();
    d.set(&1, &1).unwrap();
    let blocked = multiproc::spawn(block_on_queue, q.clone()).unwrap();
    let qt = q.clone();
    let blocked_thread = std::thread::spawn(move || block_on_queue(qt));
    // Whether or not they reach the server before it dies, each must end with an error.
    let pid = m.server_pid().unwrap();
    let st = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let t0 = Instant::now();
    assert!(d.get(&1).is_err() || d.get(&1).is_err());
    assert!(blocked.join_timeout(T).unwrap().starts_with("error"));
    assert!(blocked_thread.join().unwrap().starts_with("error"));
    assert!(t0.elapsed() < T);
    assert!(m.dict::<u8, u8>().is_err());
}

fn hammer(d: DictProxy<u32, u32>) -> u32 {
    let mut n = 0;
    while d.set(&n, &n).is_ok() {
        n += 1;
    }
    n
}

#[test]
fn shutdown_is_clean_with_many_clients() {
    let mut m = Manager::start().unwrap();
    let d = m.dict::<u32, u32>().unwrap();
    let hs: Vec<_> = (0..8)
        .map(|_| multiproc::spawn(hammer, d.clone()).unwrap())
        .collect();
    // Wait until every child has written something.
    let t0 = Instant::now();
    while d.len().unwrap() < 8 && t0.elapsed() < T {}
    let e = m.event().unwrap();
    let waiter = std::thread::spawn(move || e.wait());
    m.shutdown().unwrap();
    for h in hs {
        h.join_timeout(T).unwrap();
    }
    assert!(waiter.join().unwrap().is_err());
    assert!(d.len().is_err());
}

fn remote_client((addr, key): (String, Vec<u8>)) -> Vec<String> {
    let m = Manager::connect(addr.as_str(), &key).unwrap();
    let q = m.named("get_queue").queue::<String>(0).unwrap();
    q.put(&"hello".into()).unwrap();
    let back = m.named("replies").queue::<String>(0).unwrap();
    vec![back.get_timeout(T).unwrap()]
}

#[test]
fn serve_and_connect_over_tcp() {
    let l = multiproc::connection::Listener::bind("127.0.0.1:0", b"abracadabra").unwrap();
    let addr = l.address().to_string();
    let server = std::thread::spawn(move || Manager::serve_listener(l, |_| {}));
    let m = Manager::connect(addr.as_str(), b"abracadabra").unwrap();
    assert!(matches!(
        Manager::connect(addr.as_str(), b"wrong"),
        Err(Error::AuthenticationError(_))
    ));
    let replies = m.named("replies").queue::<String>(0).unwrap();
    let h = multiproc::spawn(remote_client, (addr.clone(), b"abracadabra".to_vec())).unwrap();
    let q = m.named("get_queue").queue::<String>(0).unwrap();
    let got = q.get_timeout(T).unwrap();
    assert_eq!(got, "hello");
    replies.put(&format!("{got} back")).unwrap();
    assert_eq!(h.join().unwrap(), vec!["hello back"]);
    // A name holds one type.
    assert!(m.named("get_queue").dict::<u8, u8>().is_err());
    let mut m = m;
    m.shutdown().unwrap();
    server.join().unwrap().unwrap();
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Accumulator {
    items: Vec<String>,
}

impl SharedObject for Accumulator {
    fn call(&mut self, method: &str, a: &[u8]) -> multiproc::Result<Vec<u8>> {
        match method {
            "push" => {
                self.items.push(args(a)?);
                reply(&self.items.len())
            }
            "joined" => reply(&self.items.join(",")),
            "boom" => panic!("boom in the server"),
            _ => Err(Error::Remote(format!("no method {method}"))),
        }
    }
}

fn register(r: &mut Registry) {
    r.register::<Accumulator>("Accumulator");
}

fn push_from_child(p: multiproc::managers::Proxy) -> usize {
    p.call("push", "child").unwrap()
}

#[test]
fn user_types_are_served_and_callable_from_children() {
    for method in StartMethod::ALL {
        let m = Manager::start_in(get_context(method), register).unwrap();
        let acc = m
            .create(
                "Accumulator",
                &Accumulator {
                    items: vec!["start".into()],
                },
            )
            .unwrap();
        assert_eq!(acc.call::<_, usize>("push", "parent").unwrap(), 2);
        assert_eq!(
            multiproc::spawn(push_from_child, acc.clone())
                .unwrap()
                .join()
                .unwrap(),
            3
        );
        assert_eq!(
            acc.call::<_, String>("joined", &()).unwrap(),
            "start,parent,child"
        );
        assert!(matches!(
            acc.call::<_, ()>("nope", &()),
            Err(Error::Remote(_))
        ));
        assert!(matches!(m.create("Unknown", &()), Err(Error::Remote(_))));
        match acc.call::<_, ()>("boom", &()) {
            Err(Error::Remote(msg)) => assert!(msg.contains("boom in the server"), "{msg}"),
            other => panic!("{other:?}"),
        }
        // The object and the server survive a panicking method.
        assert_eq!(acc.call::<_, usize>("push", "after").unwrap(), 4);
    }
}

fn barrier_party((b, e): (multiproc::managers::BarrierProxy, EventProxy)) -> usize {
    e.wait_timeout(T).unwrap();
    b.wait_timeout(T).unwrap()
}

#[test]
fn barrier_and_event_across_processes() {
    let m = Manager::start().unwrap();
    let b = m.barrier(3).unwrap();
    let e = m.event().unwrap();
    let hs: Vec<_> = (0..2)
        .map(|_| multiproc::spawn(barrier_party, (b.clone(), e.clone())).unwrap())
        .collect();
    e.set().unwrap();
    let mine = b.wait_timeout(T).unwrap();
    let mut idx: Vec<usize> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    idx.push(mine);
    idx.sort();
    assert_eq!(idx, vec![0, 1, 2]);
}

#[test]
fn barrier_reset_breaks_current_waiters() {
    let m = Manager::start().unwrap();
    let b = m.barrier(2).unwrap();
    let b2 = b.clone();
    let waiter = std::thread::spawn(move || b2.wait_timeout(T));
    let t0 = Instant::now();
    while b.n_waiting().unwrap() == 0 {
        assert!(t0.elapsed() < T, "the waiter never arrived");
    }
    b.reset().unwrap();
    assert!(matches!(waiter.join().unwrap(), Err(Error::BrokenBarrier)));
    assert!(!b.broken().unwrap());
    // Usable again after the reset.
    let b3 = b.clone();
    let other = std::thread::spawn(move || b3.wait_timeout(T));
    let mine = b.wait_timeout(T).unwrap();
    assert_eq!(mine + other.join().unwrap().unwrap(), 1);
}

#[test]
fn a_stalled_client_does_not_block_the_manager() {
    use std::io::Read;
    let l = multiproc::connection::Listener::bind("127.0.0.1:0", b"k").unwrap();
    let addr = l.address().to_string();
    let server = std::thread::spawn(move || Manager::serve_listener(l, |_| {}));
    // Connects and never answers the challenge.
    let mut stalled = std::net::TcpStream::connect(addr.as_str()).unwrap();
    let mut garbage = std::net::TcpStream::connect(addr.as_str()).unwrap();
    std::io::Write::write_all(&mut garbage, &[0xff; 64]).unwrap();
    let t0 = Instant::now();
    let mut m = Manager::connect(addr.as_str(), b"k").unwrap();
    let d = m.dict::<u8, u8>().unwrap();
    d.set(&1, &2).unwrap();
    assert_eq!(d.get(&1).unwrap(), Some(2));
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "served while others stall"
    );
    m.shutdown().unwrap();
    server.join().unwrap().unwrap();
    // The server closed the stalled socket at shutdown, well before its handshake timeout.
    stalled.set_read_timeout(Some(T)).unwrap();
    let mut sink = Vec::new();
    let t1 = Instant::now();
    let _ = stalled.read_to_end(&mut sink);
    assert!(t1.elapsed() < Duration::from_secs(5));
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn managers_started_and_dropped_leak_no_descriptors() {
    // Warm up once (the fork server, lazily opened descriptors).
    drop(Manager::start().unwrap());
    let before = open_fds();
    for i in 0..10u8 {
        let m = Manager::start().unwrap();
        let d = m.dict::<u8, u8>().unwrap();
        d.set(&i, &i).unwrap();
        let l = m.lock().unwrap();
        drop(l.acquire().unwrap());
    }
    assert_eq!(open_fds(), before);
}

fn serving_process(mut report: multiproc::Connection<String>) {
    let l = multiproc::connection::Listener::bind("127.0.0.1:0", b"abracadabra").unwrap();
    report.send(&l.address().to_string()).unwrap();
    Manager::serve_listener(l, |_| {}).unwrap();
}

fn putter(addr: String) {
    let m = Manager::connect(addr.as_str(), b"abracadabra").unwrap();
    let q = m.named("get_queue").queue::<String>(0).unwrap();
    q.put(&"hello".into()).unwrap();
}

fn getter(addr: String) -> String {
    let m = Manager::connect(addr.as_str(), b"abracadabra").unwrap();
    let q = m.named("get_queue").queue::<String>(0).unwrap();
    q.get_timeout(T).unwrap()
}

#[test]
fn remote_queue_pattern_between_three_processes() {
    // Python's documented pattern: one process serves a queue, one puts, one gets, all over
    // loopback TCP with a shared key.
    let (mut rx, tx) = multiproc::Pipe::<String>::new(true).unwrap();
    let server = multiproc::spawn(serving_process, tx).unwrap();
    let addr = rx.recv_timeout(T).unwrap();
    let g = multiproc::spawn(getter, addr.clone()).unwrap();
    multiproc::spawn(putter, addr.clone())
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(g.join().unwrap(), "hello");
    let mut m = Manager::connect(addr.as_str(), b"abracadabra").unwrap();
    m.shutdown().unwrap();
    server.join_timeout(T).unwrap();
}

fn sleeping_grandchild(q: multiproc::Queue<u32>) {
    q.put(std::process::id()).unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn lock_holder_that_forks((lock, q): (LockProxy, multiproc::Queue<u32>)) {
    let _guard = lock.acquire().unwrap();
    // A fork-method child inherits this process's memory, the guard's connection included.
    let mut g =
        Process::new(sleeping_grandchild, q.clone()).context(get_context(StartMethod::Fork));
    g.start().unwrap();
    q.put(0).unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn a_lock_held_by_a_killed_process_is_released_though_its_forked_child_lives() {
    let m = Manager::start().unwrap();
    let lock = m.lock().unwrap();
    let q = multiproc::Queue::<u32>::new().unwrap();
    let mut p = Process::new(lock_holder_that_forks, (lock.clone(), q.clone()));
    p.start().unwrap();
    let mut grandchild = 0;
    for _ in 0..2 {
        match q.get_timeout(T).unwrap() {
            0 => {}
            pid => grandchild = pid,
        }
    }
    assert_ne!(grandchild, 0);
    assert!(lock.locked().unwrap());
    p.kill().unwrap();
    p.join_timeout(T).unwrap().expect("the holder died");
    // The grandchild still runs, but it gave up its copy of the holder's connection at fork:
    // the server sees the holder's connection end and releases its lock.
    let got = lock.acquire_timeout(T).unwrap();
    let _ = std::process::Command::new("kill")
        .args(["-9", &grandchild.to_string()])
        .status();
    assert!(got.is_some(), "the dead holder's lock was released");
}
