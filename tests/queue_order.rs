//! One producer's messages reach a consumer in the order they were put, even when a getter's
//! scan of the ring races the producer. The race is forced with test hooks (threads of this
//! process stop at named points inside queue operations), so the test fails every time the
//! ordering is broken instead of once in a few thousand runs.
//!
//! `join` is here too: it combines two counters owned by the two sides, read one after the
//! other, and the order of those reads matters in the same way.

use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use multiproc::queues::{TestPoint, set_test_hook};
use multiproc::{JoinableQueue, Queue};
use serde_bytes::ByteBuf;

const LONG: Duration = Duration::from_secs(20);
/// Large enough to be copied outside the locks (the record is WRITING meanwhile).
const BIG: usize = 64 * 1024;

/// Where the two threads are (see the test).
static STAGE: AtomicU32 = AtomicU32::new(0);
/// The same for the `join` test.
static JOIN_STAGE: AtomicU32 = AtomicU32::new(0);
/// Hooks are per process: the tests of this file take turns (under `cargo test`, threads).
static SERIAL: Mutex<()> = Mutex::new(());

#[derive(Clone, Copy, PartialEq)]
enum Role {
    Other,
    Producer,
    Getter,
    Joiner,
}

thread_local! {
    static ROLE: Cell<Role> = const { Cell::new(Role::Other) };
}

/// Waits (bounded) until `STAGE` reaches `at_least`.
fn wait_stage(at_least: u32) {
    wait_for(&STAGE, at_least);
}

fn wait_for(stage: &AtomicU32, at_least: u32) {
    let deadline = Instant::now() + LONG;
    while stage.load(Ordering::SeqCst) < at_least {
        assert!(Instant::now() < deadline, "stage {at_least} never came");
        std::thread::yield_now();
    }
}

fn hook(p: TestPoint) {
    match (ROLE.with(Cell::get), p) {
        // The producer, copying message 0: tell the getter, and hold on until its scan has
        // seen message 0 still being written.
        (Role::Producer, TestPoint::PutCopying) if STAGE.load(Ordering::SeqCst) == 0 => {
            STAGE.store(1, Ordering::SeqCst);
            wait_stage(2);
        }
        // The getter, its scan at the end of the tail it knew, message 0 seen WRITING: let the
        // producer finish message 0 and put message 1, then look at the tail again.
        (Role::Getter, TestPoint::GetScanned) if STAGE.load(Ordering::SeqCst) == 1 => {
            STAGE.store(2, Ordering::SeqCst);
            wait_stage(3);
        }
        // The joiner, one counter read: let the test put an item and finish the old one.
        (Role::Joiner, TestPoint::Counting) if JOIN_STAGE.load(Ordering::SeqCst) == 0 => {
            JOIN_STAGE.store(1, Ordering::SeqCst);
            wait_for(&JOIN_STAGE, 2);
        }
        // The joiner, counting again: it did not return after the first count.
        (Role::Joiner, TestPoint::Counting) if JOIN_STAGE.load(Ordering::SeqCst) == 2 => {
            JOIN_STAGE.store(3, Ordering::SeqCst);
        }
        _ => {}
    }
}

#[test]
fn a_getter_racing_one_producer_keeps_its_messages_in_order() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let q: Queue<(u32, ByteBuf)> = Queue::with_limits(0, 16 * BIG).unwrap();
    set_test_hook(Some(hook));
    let producer = {
        let q = q.clone();
        std::thread::spawn(move || {
            ROLE.with(|r| r.set(Role::Producer));
            q.put_timeout((0, ByteBuf::from(vec![0u8; BIG])), LONG)
                .unwrap();
            q.put_timeout((1, ByteBuf::from(vec![1u8; BIG])), LONG)
                .unwrap();
            STAGE.store(3, Ordering::SeqCst);
        })
    };
    ROLE.with(|r| r.set(Role::Getter));
    wait_stage(1);
    let first = q.get_timeout(LONG).unwrap();
    let second = q.get_timeout(LONG).unwrap();
    producer.join().unwrap();
    set_test_hook(None);
    assert_eq!(STAGE.load(Ordering::SeqCst), 3, "the race was not forced");
    assert_eq!((first.0, second.0), (0, 1), "delivered out of order");
    assert!(first.1.iter().all(|&b| b == 0) && second.1.iter().all(|&b| b == 1));
}

#[test]
fn join_does_not_return_while_an_item_was_unfinished_all_along() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let q: JoinableQueue<u32> = JoinableQueue::new().unwrap();
    q.put(0).unwrap();
    assert_eq!(q.get().unwrap(), 0);
    set_test_hook(Some(hook));
    let returned = std::sync::Arc::new(AtomicBool::new(false));
    let joiner = {
        let (q, returned) = (q.clone(), returned.clone());
        std::thread::spawn(move || {
            ROLE.with(|r| r.set(Role::Joiner));
            let r = q.join_timeout(LONG);
            returned.store(true, Ordering::SeqCst);
            r
        })
    };
    // The joiner has read one of the two counters (item 0 unfinished). Item 1 arrives, then
    // item 0 is done: at no moment was every item done.
    wait_for(&JOIN_STAGE, 1);
    q.put(1).unwrap();
    q.task_done().unwrap();
    JOIN_STAGE.store(2, Ordering::SeqCst);
    // Either it counts again (still waiting: right) or it returns (wrong).
    let deadline = Instant::now() + LONG;
    while JOIN_STAGE.load(Ordering::SeqCst) < 3 && !returned.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the joiner neither returned nor counted again"
        );
        std::thread::yield_now();
    }
    let early = returned.load(Ordering::SeqCst);
    assert_eq!(q.get().unwrap(), 1);
    q.task_done().unwrap();
    let r = joiner.join().unwrap();
    set_test_hook(None);
    assert!(!early, "join returned while item 1 was unfinished");
    r.unwrap();
}
