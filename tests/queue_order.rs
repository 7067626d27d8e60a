//! One producer's messages reach a consumer in the order they were put, even when a getter's
//! scan of the ring races the producer. The race is forced with test hooks (threads of this
//! process stop at named points inside queue operations), so the test fails every time the
//! ordering is broken instead of once in a few thousand runs.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use multiproc::Queue;
use multiproc::queues::{TestPoint, set_test_hook};
use serde_bytes::ByteBuf;

const LONG: Duration = Duration::from_secs(20);
/// Large enough to be copied outside the locks (the record is WRITING meanwhile).
const BIG: usize = 64 * 1024;

/// Where the two threads are (see the test).
static STAGE: AtomicU32 = AtomicU32::new(0);

#[derive(Clone, Copy, PartialEq)]
enum Role {
    Other,
    Producer,
    Getter,
}

thread_local! {
    static ROLE: Cell<Role> = const { Cell::new(Role::Other) };
}

/// Waits (bounded) until `STAGE` reaches `at_least`.
fn wait_stage(at_least: u32) {
    let deadline = Instant::now() + LONG;
    while STAGE.load(Ordering::SeqCst) < at_least {
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
        _ => {}
    }
}

#[test]
fn a_getter_racing_one_producer_keeps_its_messages_in_order() {
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
