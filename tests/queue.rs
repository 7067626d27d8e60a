//! Queue, SimpleQueue and JoinableQueue: API semantics, timeouts, close, task_done/join, and
//! handles travelling to children under every start method. Every wait is bounded.

use std::time::{Duration, Instant};

use multiproc::{
    Error, JoinableQueue, Process, Queue, SimpleQueue, StartMethod, get_context, spawn_in,
};
use serde_bytes::ByteBuf;

const LONG: Duration = Duration::from_secs(20);

#[test]
fn fifo_and_errors_in_one_process() {
    let q: Queue<u32> = Queue::bounded(3).unwrap();
    assert!(q.empty());
    assert!(!q.full());
    assert_eq!(q.maxsize(), 3);
    for i in 0..3 {
        q.try_put(i).unwrap();
    }
    assert!(q.full());
    assert_eq!(q.qsize(), 3);
    assert!(matches!(q.try_put(9), Err(Error::Full)));
    assert!(matches!(q.put_nowait(9), Err(Error::Full)));
    for i in 0..3 {
        assert_eq!(q.get().unwrap(), i);
    }
    assert!(matches!(q.try_get(), Err(Error::Empty)));
    assert!(matches!(q.get_nowait(), Err(Error::Empty)));
    assert!(q.empty());
}

#[test]
fn timeouts_wait_at_least_their_duration() {
    let q: Queue<u8> = Queue::bounded(1).unwrap();
    let t = Instant::now();
    assert!(matches!(
        q.get_timeout(Duration::from_millis(120)),
        Err(Error::Empty)
    ));
    assert!(t.elapsed() >= Duration::from_millis(120));

    q.put(1).unwrap();
    let t = Instant::now();
    assert!(matches!(
        q.put_timeout(2, Duration::from_millis(120)),
        Err(Error::Full)
    ));
    assert!(t.elapsed() >= Duration::from_millis(120));
    // A timed call that can proceed does so at once.
    assert_eq!(q.get_timeout(LONG).unwrap(), 1);
    q.put_timeout(3, LONG).unwrap();

    let j: JoinableQueue<u8> = JoinableQueue::new().unwrap();
    j.put(1).unwrap();
    let t = Instant::now();
    assert!(matches!(
        j.join_timeout(Duration::from_millis(120)),
        Err(Error::Timeout)
    ));
    assert!(t.elapsed() >= Duration::from_millis(120));

    let s: SimpleQueue<u8> = SimpleQueue::new().unwrap();
    assert!(matches!(
        s.get_timeout(Duration::from_millis(50)),
        Err(Error::Empty)
    ));
}

#[test]
fn byte_capacity_gives_backpressure_and_refuses_oversized_messages() {
    let q: Queue<ByteBuf> = Queue::with_limits(0, 4096).unwrap();
    assert!(matches!(
        q.put(ByteBuf::from(vec![0u8; 5000])),
        Err(Error::InvalidArgument(_))
    ));
    let m = ByteBuf::from(vec![7u8; 1000]);
    let mut n = 0;
    while q.try_put_ref(&m).is_ok() {
        n += 1;
        assert!(n < 10, "a 4 KiB ring cannot hold 10 KB");
    }
    assert!(n >= 3);
    assert!(q.full() || matches!(q.try_put_ref(&m), Err(Error::Full)));
    for _ in 0..n {
        assert_eq!(q.get().unwrap(), m);
    }
    // Drained, then it cycles without losing anything.
    for round in 0..50u8 {
        let m = ByteBuf::from(vec![round; 100 + round as usize * 13]);
        q.put_ref(&m).unwrap();
        q.put_ref(&m).unwrap();
        assert_eq!(q.get().unwrap(), m);
        assert_eq!(q.get().unwrap(), m);
    }
}

struct Unserializable;
impl serde::Serialize for Unserializable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("refuses to serialize"))
    }
}
impl<'de> serde::Deserialize<'de> for Unserializable {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Ok(Unserializable)
    }
}

#[test]
fn a_value_that_does_not_serialize_fails_at_put() {
    let q: Queue<Unserializable> = Queue::new().unwrap();
    assert!(matches!(q.put(Unserializable), Err(Error::Encode(_))));
    assert!(q.empty());
    // A handle cannot travel inside a message either.
    let qq: Queue<Queue<u8>> = Queue::new().unwrap();
    assert!(matches!(
        qq.put(Queue::new().unwrap()),
        Err(Error::Encode(_))
    ));
    assert!(qq.empty());
}

#[test]
fn close_drains_then_reports_closed() {
    let q: Queue<u32> = Queue::new().unwrap();
    q.put(1).unwrap();
    q.put(2).unwrap();
    q.close().unwrap();
    q.close().unwrap();
    assert!(q.is_closed());
    assert!(matches!(q.put(3), Err(Error::Closed)));
    assert!(matches!(q.try_put(3), Err(Error::Closed)));
    assert_eq!(q.get().unwrap(), 1);
    assert_eq!(q.try_get().unwrap(), 2);
    assert!(matches!(q.get(), Err(Error::Closed)));
    assert!(matches!(q.try_get(), Err(Error::Closed)));
    assert!(matches!(q.get_timeout(LONG), Err(Error::Closed)));
}

fn blocked_get(q: Queue<u32>) -> String {
    match q.get_timeout(LONG) {
        Err(Error::Closed) => "closed".into(),
        other => format!("{other:?}"),
    }
}

fn blocked_put(q: Queue<u32>) -> String {
    match q.put_timeout(2, LONG) {
        Err(Error::Closed) => "closed".into(),
        other => format!("{other:?}"),
    }
}

#[test]
fn close_wakes_blocked_getters_and_putters_in_other_processes() {
    let ctx = get_context(StartMethod::ForkServer);
    let empty: Queue<u32> = Queue::new().unwrap();
    let full: Queue<u32> = Queue::bounded(1).unwrap();
    full.put(1).unwrap();
    let getters: Vec<_> = (0..2)
        .map(|_| spawn_in(ctx, blocked_get, empty.clone()).unwrap())
        .collect();
    let putter = spawn_in(ctx, blocked_put, full.clone()).unwrap();
    // Closing before they block is fine too: either way they must end with Closed.
    std::thread::sleep(Duration::from_millis(200));
    empty.close().unwrap();
    full.close().unwrap();
    for g in getters {
        assert_eq!(g.join_timeout(LONG).unwrap(), "closed");
    }
    assert_eq!(putter.join_timeout(LONG).unwrap(), "closed");
    // What was in the full queue is still there.
    assert_eq!(full.get().unwrap(), 1);
}

#[test]
fn close_wakes_a_blocked_getter_thread() {
    let q: Queue<u32> = Queue::new().unwrap();
    let q2 = q.clone();
    let h = std::thread::spawn(move || q2.get_timeout(LONG));
    std::thread::sleep(Duration::from_millis(100));
    q.close().unwrap();
    assert!(matches!(h.join().unwrap(), Err(Error::Closed)));
}

fn echo_worker((jobs, out): (Queue<Option<String>>, Queue<String>)) {
    while let Some(s) = jobs.get_timeout(LONG).unwrap() {
        out.put(s.to_uppercase()).unwrap();
    }
}

#[test]
fn handles_travel_to_children_under_every_start_method() {
    for m in StartMethod::ALL {
        let jobs: Queue<Option<String>> = Queue::new().unwrap();
        let out: Queue<String> = Queue::new().unwrap();
        let mut p = Process::new(echo_worker, (jobs.clone(), out.clone())).context(get_context(m));
        p.start().unwrap();
        jobs.put(Some("abc".to_string())).unwrap();
        jobs.put(Some(format!("{m}"))).unwrap();
        jobs.put(None).unwrap();
        assert_eq!(out.get_timeout(LONG).unwrap(), "ABC", "{m}");
        assert_eq!(out.get_timeout(LONG).unwrap(), m.name().to_uppercase());
        assert_eq!(p.join_timeout(LONG).unwrap().map(|s| s.code()), Some(0));
    }
}

fn put_then_exit((q, n): (Queue<u64>, u64)) {
    for i in 0..n {
        q.put(i).unwrap();
    }
    // Exit at once: no destructor, no flush. Nothing may be lost.
    std::process::exit(0);
}

#[test]
fn what_a_process_put_before_it_exits_is_not_lost() {
    let q: Queue<u64> = Queue::new().unwrap();
    let mut p = Process::new(put_then_exit, (q.clone(), 10_000));
    p.start().unwrap();
    p.join_timeout(LONG).unwrap().expect("child ended");
    let got: Vec<u64> = (0..10_000).map(|_| q.try_get().unwrap()).collect();
    assert_eq!(got, (0..10_000).collect::<Vec<_>>());
    assert!(matches!(q.try_get(), Err(Error::Empty)));
}

fn big_producer((q, n): (Queue<ByteBuf>, u8)) {
    for i in 0..n {
        let len = [1 << 20, 17, 70_000, 300_001][i as usize % 4];
        q.put(ByteBuf::from(vec![i; len])).unwrap();
    }
}

#[test]
fn large_and_small_messages_across_processes() {
    let q: Queue<ByteBuf> = Queue::with_limits(0, 3 << 20).unwrap();
    let mut p = Process::new(big_producer, (q.clone(), 40));
    p.start().unwrap();
    for i in 0..40u8 {
        let m = q.get_timeout(LONG).unwrap();
        let len = [1 << 20, 17, 70_000, 300_001][i as usize % 4];
        assert_eq!(m.len(), len);
        assert!(m.iter().all(|&b| b == i));
    }
    p.join_timeout(LONG).unwrap().expect("child ended");
}

fn joinable_worker(q: JoinableQueue<Option<u32>>) {
    while let Some(_job) = q.get_timeout(LONG).unwrap() {
        q.task_done().unwrap();
    }
    q.task_done().unwrap(); // for the sentinel
}

#[test]
fn task_done_and_join_across_processes() {
    let q: JoinableQueue<Option<u32>> = JoinableQueue::new().unwrap();
    let mut workers: Vec<Process> = (0..2)
        .map(|_| Process::new(joinable_worker, q.clone()))
        .collect();
    for w in &mut workers {
        w.start().unwrap();
    }
    for i in 0..200 {
        q.put(Some(i)).unwrap();
    }
    q.join_timeout(LONG).unwrap();
    assert_eq!(q.unfinished_tasks(), 0);
    for _ in &workers {
        q.put(None).unwrap();
    }
    q.join_timeout(LONG).unwrap();
    for w in &workers {
        assert_eq!(w.join_timeout(LONG).unwrap().map(|s| s.code()), Some(0));
    }
    match q.task_done() {
        Err(Error::InvalidState(m)) => assert!(m.contains("more times"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn joinable_queue_join_returns_at_once_when_nothing_was_put() {
    let q: JoinableQueue<u8> = JoinableQueue::bounded(4).unwrap();
    q.join_timeout(Duration::ZERO).unwrap();
    q.join().unwrap();
    assert!(q.task_done().is_err());
}

#[test]
fn context_constructors_and_simple_queue() {
    let ctx = get_context(StartMethod::Spawn);
    let q: Queue<i8> = ctx.queue().unwrap();
    q.put(-1).unwrap();
    assert_eq!(q.get().unwrap(), -1);
    let s: SimpleQueue<i8> = ctx.simple_queue().unwrap();
    s.put(2).unwrap();
    assert!(!s.empty());
    assert_eq!(s.get().unwrap(), 2);
    s.close().unwrap();
    assert!(matches!(s.get(), Err(Error::Closed)));
    let j: JoinableQueue<i8> = ctx.joinable_queue().unwrap();
    j.put(1).unwrap();
    assert_eq!(j.unfinished_tasks(), 1);
}

#[test]
fn many_threads_many_messages_in_one_process() {
    let q: Queue<(u8, u32)> = Queue::bounded(64).unwrap();
    let producers: Vec<_> = (0..4u8)
        .map(|id| {
            let q = q.clone();
            std::thread::spawn(move || {
                for i in 0..5000 {
                    q.put_timeout((id, i), LONG).unwrap();
                }
            })
        })
        .collect();
    let consumers: Vec<_> = (0..3)
        .map(|_| {
            let q = q.clone();
            std::thread::spawn(move || {
                let mut got = Vec::new();
                loop {
                    match q.get_timeout(LONG) {
                        Ok(v) => got.push(v),
                        Err(Error::Closed) => return got,
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    for p in producers {
        p.join().unwrap();
    }
    q.close().unwrap();
    let mut all: Vec<(u8, u32)> = Vec::new();
    for c in consumers {
        let got = c.join().unwrap();
        // Per producer, each consumer sees increasing sequence numbers.
        for id in 0..4u8 {
            let seqs: Vec<u32> = got.iter().filter(|m| m.0 == id).map(|m| m.1).collect();
            assert!(seqs.windows(2).all(|w| w[0] < w[1]));
        }
        all.extend(got);
    }
    all.sort();
    let want: Vec<(u8, u32)> = (0..4u8)
        .flat_map(|id| (0..5000).map(move |i| (id, i)))
        .collect();
    assert_eq!(all, want);
}
