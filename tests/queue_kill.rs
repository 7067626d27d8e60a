//! SIGKILL a producer or consumer in the middle of a queue operation: the queue must keep
//! working for the others, never duplicate a message, and lose at most the one message the
//! killed process was handling (exactly as documented in `multiproc::queues`).
//!
//! Two kinds of test: deterministic ones stop the victim at a named point inside an operation
//! (a test hook) and kill it there; statistical ones kill streaming processes at random moments.

use std::collections::HashSet;
use std::sync::OnceLock;
use std::time::Duration;

use multiproc::queues::{TestPoint, set_test_hook};
use multiproc::{Error, Process, Queue};
use serde_bytes::ByteBuf;

const LONG: Duration = Duration::from_secs(20);
const BIG: usize = 256 * 1024;

type Msg = (u64, ByteBuf);

static INSIDE: OnceLock<(Queue<TestPointId>, TestPointId)> = OnceLock::new();
type TestPointId = u8;

fn id_of(p: TestPoint) -> TestPointId {
    match p {
        TestPoint::PutLocked => 1,
        TestPoint::GetLocked => 2,
        TestPoint::PutCopying => 3,
        TestPoint::GetCopying => 4,
        TestPoint::PutPublished => 5,
        TestPoint::GetPublished => 6,
        TestPoint::PutFinishing => 7,
        TestPoint::GetScanned => 8,
        TestPoint::Counting => 9,
    }
}

/// In the victim: at the chosen point, tell the test, then hang until killed.
fn hang_here(p: TestPoint) {
    if let Some((tell, want)) = INSIDE.get() {
        if id_of(p) == *want {
            set_test_hook(None); // `tell` is a queue too: do not stop inside it
            tell.put(*want).unwrap();
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

fn victim_put((q, tell, point, size): (Queue<Msg>, Queue<TestPointId>, TestPointId, usize)) {
    let _ = INSIDE.set((tell, point));
    set_test_hook(Some(hang_here));
    q.put((999, ByteBuf::from(vec![9u8; size]))).unwrap();
    unreachable!("killed inside put");
}

fn victim_get((q, tell, point): (Queue<Msg>, Queue<TestPointId>, TestPointId)) {
    let _ = INSIDE.set((tell, point));
    set_test_hook(Some(hang_here));
    let _ = q.get();
    unreachable!("killed inside get");
}

/// Starts `p` and waits until it reports being at `point`, where it hangs until killed.
fn stop_inside(mut p: Process, tell: &Queue<TestPointId>, point: TestPointId) -> Process {
    p.start().unwrap();
    assert_eq!(
        tell.get_timeout(LONG).unwrap(),
        point,
        "victim reached the point"
    );
    p
}

/// SIGKILLs a victim stopped by [`stop_inside`].
fn kill(p: Process) {
    p.kill().unwrap();
    let st = p.join_timeout(LONG).unwrap().expect("victim died");
    assert_eq!(st.code(), -9);
}

/// Starts `p`, waits until it reports being at `point`, and SIGKILLs it there.
fn kill_inside(p: Process, tell: &Queue<TestPointId>, point: TestPointId) {
    kill(stop_inside(p, tell, point));
}

fn msg(i: u64, size: usize) -> Msg {
    (i, ByteBuf::from(vec![(i % 251) as u8; size]))
}

fn check_queue_still_works(q: &Queue<Msg>, size: usize) {
    for i in 0..5 {
        q.put_timeout(msg(100 + i, size), LONG).unwrap();
        q.put_timeout(msg(200 + i, size), LONG).unwrap();
        assert_eq!(q.get_timeout(LONG).unwrap(), msg(100 + i, size));
        assert_eq!(q.get_timeout(LONG).unwrap(), msg(200 + i, size));
    }
    assert!(matches!(q.try_get(), Err(Error::Empty)));
}

#[test]
fn producer_killed_holding_the_lock_is_rolled_back() {
    let q: Queue<Msg> = Queue::new().unwrap();
    let tell: Queue<TestPointId> = Queue::new().unwrap();
    q.put(msg(1, 10)).unwrap();
    let p = Process::new(victim_put, (q.clone(), tell.clone(), 1, 10));
    kill_inside(p, &tell, 1);
    // Its message was never committed: only the one before it is there.
    assert_eq!(q.get_timeout(LONG).unwrap(), msg(1, 10));
    assert!(matches!(q.try_get(), Err(Error::Empty)));
    assert_eq!(q.qsize(), 0);
    check_queue_still_works(&q, 10);
}

#[test]
fn consumer_killed_holding_the_lock_leaves_the_message_in_the_queue() {
    let q: Queue<Msg> = Queue::new().unwrap();
    let tell: Queue<TestPointId> = Queue::new().unwrap();
    q.put(msg(1, 10)).unwrap();
    q.put(msg(2, 10)).unwrap();
    let p = Process::new(victim_get, (q.clone(), tell.clone(), 2));
    kill_inside(p, &tell, 2);
    // The victim never returned message 1: it is delivered to the next consumer.
    assert_eq!(q.get_timeout(LONG).unwrap(), msg(1, 10));
    assert_eq!(q.get_timeout(LONG).unwrap(), msg(2, 10));
    check_queue_still_works(&q, 10);
}

#[test]
fn producer_killed_after_publishing_keeps_its_message() {
    let q: Queue<Msg> = Queue::new().unwrap();
    let tell: Queue<TestPointId> = Queue::new().unwrap();
    q.put(msg(1, 10)).unwrap();
    let p = Process::new(victim_put, (q.clone(), tell.clone(), 5, 10));
    kill_inside(p, &tell, 5);
    // Past its commit point the put counts, even though the process never returned: the
    // message is delivered, once, and the counters agree.
    assert_eq!(q.qsize(), 2);
    assert_eq!(q.get_timeout(LONG).unwrap(), msg(1, 10));
    assert_eq!(
        q.get_timeout(LONG).unwrap(),
        (999, ByteBuf::from(vec![9u8; 10]))
    );
    assert!(matches!(q.try_get(), Err(Error::Empty)));
    assert_eq!(q.qsize(), 0);
    check_queue_still_works(&q, 10);
}

#[test]
fn consumer_killed_after_publishing_does_not_give_the_message_twice() {
    let q: Queue<Msg> = Queue::with_limits(0, 4096).unwrap();
    let tell: Queue<TestPointId> = Queue::new().unwrap();
    q.put(msg(1, 10)).unwrap();
    q.put(msg(2, 10)).unwrap();
    let p = Process::new(victim_get, (q.clone(), tell.clone(), 6));
    kill_inside(p, &tell, 6);
    // Past its commit point the get counts: message 1 is gone with the victim.
    assert_eq!(q.get_timeout(LONG).unwrap(), msg(2, 10));
    assert!(matches!(q.try_get(), Err(Error::Empty)));
    assert_eq!(q.qsize(), 0);
    // The space it handed back stays handed back: the ring fills and drains cleanly.
    for round in 0..20 {
        for i in 0..50 {
            q.put_timeout(msg(round * 100 + i, 10), LONG).unwrap();
        }
        for i in 0..50 {
            assert_eq!(q.get_timeout(LONG).unwrap(), msg(round * 100 + i, 10));
        }
    }
    check_queue_still_works(&q, 10);
}

#[test]
fn producer_killed_while_copying_a_large_message_drops_only_that_message() {
    let q: Queue<Msg> = Queue::with_limits(0, 4 * BIG).unwrap();
    let tell: Queue<TestPointId> = Queue::new().unwrap();
    q.put(msg(1, BIG)).unwrap();
    let p = Process::new(victim_put, (q.clone(), tell.clone(), 3, BIG));
    kill_inside(p, &tell, 3);
    q.put(msg(2, BIG)).unwrap();
    assert_eq!(q.get_timeout(LONG).unwrap(), msg(1, BIG));
    assert_eq!(q.get_timeout(LONG).unwrap(), msg(2, BIG));
    assert!(matches!(q.try_get(), Err(Error::Empty)));
    // Its half-written record is reclaimed: the whole ring is usable again.
    for round in 0..3 {
        for i in 0..3 {
            q.put_timeout(msg(10 * round + i, BIG), LONG).unwrap();
        }
        for i in 0..3 {
            assert_eq!(q.get_timeout(LONG).unwrap(), msg(10 * round + i, BIG));
        }
    }
    check_queue_still_works(&q, BIG);
}

#[test]
fn producer_killed_finishing_a_large_message_leaves_the_ring_usable() {
    // Killed holding the put lock with its slot's position cleared (not committed) and its
    // record still WRITING: the put side's recovery puts the position back and the record is
    // dropped. Meanwhile getters take slots of their own; the record must not be orphaned
    // (an orphan would pin `free` and the ring would fill up for good).
    let q: Queue<Msg> = Queue::with_limits(0, 4 * BIG).unwrap();
    let tell: Queue<TestPointId> = Queue::new().unwrap();
    q.put(msg(1, BIG)).unwrap();
    let p = Process::new(victim_put, (q.clone(), tell.clone(), 7, BIG));
    kill_inside(p, &tell, 7);
    // Large gets (each takes a slot) before any put recovers the put side.
    assert_eq!(q.get_timeout(LONG).unwrap(), msg(1, BIG));
    assert!(matches!(q.try_get(), Err(Error::Empty)));
    for round in 0..4 {
        for i in 0..3 {
            q.put_timeout(msg(10 * round + i, BIG), LONG).unwrap();
        }
        for i in 0..3 {
            assert_eq!(q.get_timeout(LONG).unwrap(), msg(10 * round + i, BIG));
        }
    }
    assert!(matches!(q.try_get(), Err(Error::Empty)));
    check_queue_still_works(&q, BIG);
}

#[test]
fn consumer_killed_while_copying_a_large_message_gives_it_back() {
    let q: Queue<Msg> = Queue::with_limits(0, 4 * BIG).unwrap();
    let tell: Queue<TestPointId> = Queue::new().unwrap();
    q.put(msg(1, BIG)).unwrap();
    q.put(msg(2, BIG)).unwrap();
    let p = Process::new(victim_get, (q.clone(), tell.clone(), 4));
    kill_inside(p, &tell, 4);
    // Message 1 is found again by a later get (within the recovery slice), none is lost.
    let mut got = vec![
        q.get_timeout(LONG).unwrap().0,
        q.get_timeout(LONG).unwrap().0,
    ];
    got.sort();
    assert_eq!(got, [1, 2]);
    assert!(matches!(q.try_get(), Err(Error::Empty)));
    check_queue_still_works(&q, BIG);
}

#[test]
fn a_blocked_getter_recovers_a_message_a_dead_reader_held() {
    let q: Queue<Msg> = Queue::with_limits(0, 4 * BIG).unwrap();
    let tell: Queue<TestPointId> = Queue::new().unwrap();
    q.put(msg(7, BIG)).unwrap();
    let p = Process::new(victim_get, (q.clone(), tell.clone(), 4));
    let q2 = q.clone();
    // This getter blocks first (nothing READY while the victim holds the message).
    kill_inside(p, &tell, 4);
    let h = std::thread::spawn(move || q2.get_timeout(LONG));
    assert_eq!(h.join().unwrap().unwrap(), msg(7, BIG));
}

#[test]
fn a_consumer_that_only_tries_gets_back_what_a_dead_reader_held() {
    // Nobody blocks, so nobody waits long enough to look for dead peers: the failed try
    // itself must.
    let q: Queue<Msg> = Queue::with_limits(0, 4 * BIG).unwrap();
    let tell: Queue<TestPointId> = Queue::new().unwrap();
    q.put(msg(7, BIG)).unwrap();
    kill_inside(
        Process::new(victim_get, (q.clone(), tell.clone(), 4)),
        &tell,
        4,
    );
    assert_eq!(q.try_get().unwrap(), msg(7, BIG), "the first try finds it");
    assert!(matches!(q.try_get(), Err(Error::Empty)));
    check_queue_still_works(&q, BIG);
}

#[test]
fn a_producer_that_only_tries_is_not_kept_out_by_a_dead_writer() {
    // A writer killed copying leaves its record WRITING at the front of the ring, where it
    // holds `free`: once the ring has gone round to it, only its repair makes room.
    let q: Queue<Msg> = Queue::with_limits(0, 4 * BIG).unwrap();
    let tell: Queue<TestPointId> = Queue::new().unwrap();
    kill_inside(
        Process::new(victim_put, (q.clone(), tell.clone(), 3, BIG)),
        &tell,
        3,
    );
    // Small messages (no operation slot, so no repair on the way) fill the rest of the ring,
    // and are all taken.
    let mut n = 0;
    while q.try_put(msg(n, 1000)).is_ok() {
        n += 1;
    }
    assert!(
        n > 100,
        "only {n} small messages fit beside the dead record"
    );
    for i in 0..n {
        assert_eq!(q.try_get().unwrap(), msg(i, 1000));
    }
    assert!(matches!(q.try_get(), Err(Error::Empty)));
    // The ring is empty but for the dead record: the first try gets room.
    q.try_put(msg(1, 1000))
        .expect("a try_put kept out by a dead writer's record");
    assert_eq!(q.try_get().unwrap(), msg(1, 1000));
    check_queue_still_works(&q, BIG);
}

/// A closed queue whose last message a consumer holds in an unfinished `get`: that get may
/// still be undone (the consumer dies, and the message is for another consumer), so the queue
/// is not drained yet and another consumer must not be told `Closed`.
fn closed_queue_not_drained_while_a_consumer_holds(point: TestPointId, size: usize) {
    let q: Queue<Msg> = Queue::with_limits(0, 4 * BIG).unwrap();
    let tell: Queue<TestPointId> = Queue::new().unwrap();
    q.put(msg(1, size)).unwrap();
    q.close().unwrap();
    let p = stop_inside(
        Process::new(victim_get, (q.clone(), tell.clone(), point)),
        &tell,
        point,
    );
    let meanwhile = q.try_get();
    kill(p);
    assert!(
        matches!(meanwhile, Err(Error::Empty)),
        "told the queue is drained while a consumer may give its message back: {meanwhile:?}"
    );
    // Non-blocking gets alone (nobody blocks, so nobody else looks for dead peers) find it.
    assert_eq!(poll_get(&q).unwrap(), msg(1, size));
    assert!(matches!(q.try_get(), Err(Error::Closed)));
    assert!(matches!(q.get_timeout(LONG), Err(Error::Closed)));
}

/// `try_get` until it says something other than `Empty` (bounded).
fn poll_get(q: &Queue<Msg>) -> multiproc::Result<Msg> {
    let deadline = std::time::Instant::now() + LONG;
    loop {
        match q.try_get() {
            Err(Error::Empty) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "try_get stuck at Empty"
                );
                std::thread::yield_now();
            }
            other => return other,
        }
    }
}

#[test]
fn a_closed_queue_whose_last_writer_died_copying_drains_for_non_blocking_gets() {
    let q: Queue<Msg> = Queue::with_limits(0, 4 * BIG).unwrap();
    let tell: Queue<TestPointId> = Queue::new().unwrap();
    q.put(msg(1, 10)).unwrap();
    kill_inside(
        Process::new(victim_put, (q.clone(), tell.clone(), 3, BIG)),
        &tell,
        3,
    );
    q.close().unwrap();
    // The half-written message is dropped; the queue drains without any blocking call.
    assert_eq!(poll_get(&q).unwrap(), msg(1, 10));
    assert!(matches!(poll_get(&q), Err(Error::Closed)));
}

#[test]
fn a_closed_queue_is_not_drained_while_a_getter_may_still_roll_back() {
    closed_queue_not_drained_while_a_consumer_holds(2, 10);
}

#[test]
fn a_closed_queue_is_not_drained_while_a_reader_may_still_give_its_message_back() {
    closed_queue_not_drained_while_a_consumer_holds(4, BIG);
}

// ---------------------------------------------------------------------------------------------
// Random kills while streaming
// ---------------------------------------------------------------------------------------------

fn stream_producer((q, start, size): (Queue<Msg>, u64, usize)) {
    let mut i = start;
    loop {
        q.put(msg(i, size)).unwrap();
        i += 1;
    }
}

/// Kills a streaming producer at random moments, many times; after each kill the ids it
/// managed to put must be exactly a prefix (no gap: nothing a live process put is lost; no
/// duplicate).
fn kill_producers_while_streaming(size: usize, rounds: u64) {
    let q: Queue<Msg> = Queue::with_limits(0, 64 * size.max(4096)).unwrap();
    let mut next = 0u64;
    for round in 0..rounds {
        let start = round * 1_000_000;
        // A daemon: should an assertion fail, the test ends instead of waiting at exit for a
        // producer blocked on a full queue.
        let mut p = Process::new(stream_producer, (q.clone(), start, size)).daemon(true);
        p.start().unwrap();
        // Let it stream a variable amount, consuming as we go, then kill it mid-flight.
        let take = 5 + (round * 7919) % 60;
        for k in 0..take {
            let (i, data) = q.get_timeout(LONG).unwrap();
            if i != start + k {
                panic!(
                    "round {round}: expected {}, got {i}; {}",
                    start + k,
                    what_became_of(&q, start + k)
                );
            }
            assert_eq!(data.len(), size);
        }
        p.kill().unwrap();
        p.join_timeout(LONG).unwrap().expect("producer died");
        // Drain what it put before dying: still a gap-free continuation.
        let mut k = take;
        loop {
            match q.try_get() {
                Ok((i, data)) => {
                    assert_eq!(i, start + k, "round {round}: drained in order");
                    assert!(data.iter().all(|&b| b == (i % 251) as u8));
                    k += 1;
                }
                Err(Error::Empty) => break,
                Err(e) => panic!("{e}"),
            }
        }
        next += k;
    }
    assert!(next > 0);
    check_queue_still_works(&q, size);
}

/// After an out-of-sequence message: whether the expected one still comes (a reorder) or not (a
/// loss), to tell the two apart in a failure report.
fn what_became_of(q: &Queue<Msg>, want: u64) -> String {
    let mut after = Vec::new();
    while let Ok((i, _)) = q.get_timeout(Duration::from_millis(500)) {
        if i == want {
            return format!("it came later, after {after:?}: a reorder");
        }
        after.push(i);
        if after.len() > 100 {
            break;
        }
    }
    format!("it never came (then {after:?}): a loss")
}

#[test]
fn killing_small_producers_at_random_loses_nothing_they_put() {
    kill_producers_while_streaming(16, 25);
}

#[test]
fn killing_large_producers_at_random_loses_nothing_they_put() {
    kill_producers_while_streaming(BIG, 12);
}

fn stream_consumer((q, out): (Queue<Msg>, Queue<u64>)) {
    loop {
        let (i, _) = q.get().unwrap();
        out.put(i).unwrap();
    }
}

/// Kills consumers at random moments while a feeder streams; every id must be received at
/// most once, and at most one per killed consumer may be missing.
fn kill_consumers_while_streaming(size: usize, kills: usize) {
    const END: u64 = u64::MAX;
    let n = 400u64;
    let q: Queue<Msg> = Queue::with_limits(0, 16 * size.max(4096)).unwrap();
    let out: Queue<u64> = Queue::new().unwrap();
    let feeder = {
        let q = q.clone();
        std::thread::spawn(move || {
            for i in 0..n {
                q.put_timeout(msg(i, size), LONG).unwrap();
            }
            q.put_timeout(msg(END, 0), LONG).unwrap();
        })
    };
    let mut seen = HashSet::new();
    let record = |i: u64, seen: &mut HashSet<u64>| {
        assert!(seen.insert(i), "message {i} delivered twice");
    };
    for kill in 0..kills {
        let mut c = Process::new(stream_consumer, (q.clone(), out.clone()));
        c.start().unwrap();
        let take = 3 + (kill as u64 * 31) % 20;
        for _ in 0..take {
            record(out.get_timeout(LONG).unwrap(), &mut seen);
        }
        c.kill().unwrap();
        c.join_timeout(LONG).unwrap().expect("consumer died");
    }
    // A last consumer, left alive, takes the rest up to the end marker.
    let mut c = Process::new(stream_consumer, (q.clone(), out.clone()));
    c.start().unwrap();
    loop {
        let i = out.get_timeout(LONG).unwrap();
        record(i, &mut seen);
        if i == END {
            break;
        }
    }
    c.kill().unwrap();
    c.join_timeout(LONG).unwrap().expect("consumer died");
    feeder.join().unwrap();
    // What a killed reader held comes back to the queue; whatever is still around, once each.
    while let Ok(i) = out.try_get() {
        record(i, &mut seen);
    }
    loop {
        match q.get_timeout(Duration::from_millis(300)) {
            Ok((i, data)) => {
                assert!(data.iter().all(|&b| b == (i % 251) as u8));
                record(i, &mut seen);
            }
            Err(Error::Empty) => break,
            Err(e) => panic!("{e}"),
        }
    }
    let missing = (n + 1) as usize - seen.len();
    assert!(
        missing <= kills + 1,
        "{missing} messages lost with {} killed consumers",
        kills + 1
    );
}

#[test]
fn killing_small_consumers_at_random_duplicates_nothing() {
    kill_consumers_while_streaming(16, 12);
}

#[test]
fn killing_large_consumers_at_random_duplicates_nothing() {
    kill_consumers_while_streaming(BIG, 8);
}

fn sleeping_getter(q: Queue<Msg>) {
    let _ = q.get();
}

#[test]
fn a_getter_killed_while_asleep_leaves_no_trace() {
    let q: Queue<Msg> = Queue::new().unwrap();
    let mut victims: Vec<Process> = (0..3)
        .map(|_| Process::new(sleeping_getter, q.clone()))
        .collect();
    for v in &mut victims {
        v.start().unwrap();
    }
    // Give them time to reach the futex (the assertions hold either way: this only makes the
    // interesting case likely); a getter thread here blocks too.
    std::thread::sleep(Duration::from_millis(300));
    let q2 = q.clone();
    let waiter = std::thread::spawn(move || q2.get_timeout(LONG));
    for v in &victims {
        v.kill().unwrap();
        v.join_timeout(LONG).unwrap().expect("victim died");
    }
    q.put(msg(5, 10)).unwrap();
    assert_eq!(waiter.join().unwrap().unwrap(), msg(5, 10));
    check_queue_still_works(&q, 10);
}
