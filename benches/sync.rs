//! Synchronization benchmarks, each beside its reference:
//! * `lock_uncontended`: acquire + release of a `multiproc::Lock` beside `std::sync::Mutex`;
//! * `event_round_trip`: a ping-pong between two processes through two `Event`s beside the
//!   same ping-pong on two raw futex words (bare `FUTEX_WAIT`/`FUTEX_WAKE` system calls);
//! * `value_lock`: 2 processes x 100k locked increments of a `Value` (Python: 621 k incr/s on
//!   the reference machine; target >= 15x). Throughput is reported in increments.
//!
//! Run: `cargo bench --bench sync`.

use std::hint::black_box;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use multiproc::{Event, Lock, Process, RawArray, StartMethod, get_context};

fn lock_uncontended(c: &mut Criterion) {
    let mut g = c.benchmark_group("lock_uncontended");
    let lock = Lock::new().unwrap();
    g.bench_function("multiproc_lock", |b| {
        b.iter(|| drop(black_box(lock.acquire().unwrap())))
    });
    let m = std::sync::Mutex::new(0u64);
    g.bench_function("std_mutex", |b| {
        b.iter(|| drop(black_box(m.lock().unwrap())))
    });
    g.finish();
}

// --- Event ping-pong -------------------------------------------------------------------------

fn event_child((ping, pong, stop): (Event, Event, Event)) {
    loop {
        ping.wait();
        ping.clear();
        if stop.is_set() {
            return;
        }
        pong.set();
    }
}

fn event_round_trips(iters: u64) -> Duration {
    let ctx = get_context(StartMethod::Fork);
    let (ping, pong, stop) = (
        Event::new().unwrap(),
        Event::new().unwrap(),
        Event::new().unwrap(),
    );
    let mut p = Process::new(event_child, (ping.clone(), pong.clone(), stop.clone())).context(ctx);
    p.start().unwrap();
    // One round trip first: the child is up and waiting.
    ping.set();
    assert!(pong.wait_timeout(Duration::from_secs(30)));
    pong.clear();
    let t = Instant::now();
    for _ in 0..iters {
        ping.set();
        pong.wait();
        pong.clear();
    }
    let dt = t.elapsed();
    stop.set();
    ping.set();
    p.join().unwrap();
    dt
}

// --- Raw futex ping-pong (the limit) ---------------------------------------------------------

fn futex_wait(w: &AtomicU32, expected: u32) {
    // SAFETY: w is a valid, aligned u32 in shared memory for the duration of the call.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            w.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            std::ptr::null::<libc::timespec>(),
        )
    };
}

fn futex_wake(w: &AtomicU32) {
    // SAFETY: w is a valid, aligned u32; FUTEX_WAKE reads nothing else.
    unsafe { libc::syscall(libc::SYS_futex, w.as_ptr(), libc::FUTEX_WAKE, 1) };
}

/// Words: 0 = ping, 1 = pong, 2 = stop.
fn words(a: &RawArray<u32>) -> &[AtomicU32] {
    // SAFETY: the array has 3 aligned u32 elements shared by the two processes, only accessed
    // atomically here; AtomicU32 has the layout of u32.
    unsafe { std::slice::from_raw_parts(a.as_ptr() as *const AtomicU32, 3) }
}

fn wait_and_clear(w: &AtomicU32) {
    while w.swap(0, Ordering::AcqRel) == 0 {
        futex_wait(w, 0);
    }
}

fn signal(w: &AtomicU32) {
    w.store(1, Ordering::Release);
    futex_wake(w);
}

fn futex_child(a: RawArray<u32>) {
    let w = words(&a);
    loop {
        wait_and_clear(&w[0]);
        if w[2].load(Ordering::Acquire) != 0 {
            return;
        }
        signal(&w[1]);
    }
}

fn futex_round_trips(iters: u64) -> Duration {
    let ctx = get_context(StartMethod::Fork);
    let a = RawArray::<u32>::new(3).unwrap();
    let mut p = Process::new(futex_child, a.clone()).context(ctx);
    p.start().unwrap();
    let w = words(&a);
    signal(&w[0]);
    wait_and_clear(&w[1]);
    let t = Instant::now();
    for _ in 0..iters {
        signal(&w[0]);
        wait_and_clear(&w[1]);
    }
    let dt = t.elapsed();
    w[2].store(1, Ordering::Release);
    signal(&w[0]);
    p.join().unwrap();
    dt
}

fn event_round_trip(c: &mut Criterion) {
    let mut g = c.benchmark_group("event_round_trip");
    g.sample_size(20);
    g.bench_function("multiproc_event", |b| b.iter_custom(event_round_trips));
    g.bench_function("raw_futex", |b| b.iter_custom(futex_round_trips));
    g.finish();
}

// --- value_lock ------------------------------------------------------------------------------

fn value_lock(c: &mut Criterion) {
    const N: u64 = 100_000;
    let mut g = c.benchmark_group("value_lock");
    g.sample_size(10);
    g.throughput(Throughput::Elements(2 * N));
    g.bench_function("2procs_x_100k", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| multiproc::bench_support::value_lock(N).unwrap())
                .sum()
        })
    });
    g.finish();
}

criterion_group!(benches, lock_uncontended, event_round_trip, value_lock);
criterion_main!(benches);
