//! Queue throughput, one producer process to one consumer (the calling process), beside an
//! in-process crossbeam channel (the ceiling: no process boundary, no serialization) and a
//! memcpy of the same size (the raw limit). `multiproc bench` reports the same rows through
//! `multiproc::bench_support`.

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use multiproc::bench_support;

fn crossbeam(iters: u64, size: usize) -> Duration {
    let (tx, rx) = crossbeam_channel::unbounded::<Option<Vec<u8>>>();
    let payload = vec![b'x'; size];
    let producer = std::thread::spawn(move || {
        for _ in 0..iters {
            tx.send(Some(payload.clone())).unwrap();
        }
        tx.send(None).unwrap();
    });
    let t = Instant::now();
    let mut n = 0;
    while let Some(m) = rx.recv().unwrap() {
        std::hint::black_box(m);
        n += 1;
    }
    let dt = t.elapsed();
    producer.join().unwrap();
    assert_eq!(n, iters);
    dt
}

fn memcpy(iters: u64, size: usize) -> Duration {
    let src = vec![b'x'; size];
    let mut dst = vec![0u8; size];
    let t = Instant::now();
    for _ in 0..iters {
        std::hint::black_box(&mut dst).copy_from_slice(std::hint::black_box(&src));
    }
    t.elapsed()
}

fn group(c: &mut Criterion, name: &str, size: usize, sample_size: usize) {
    let mut g = c.benchmark_group(name);
    g.sample_size(sample_size);
    g.throughput(Throughput::Bytes(size as u64));
    g.bench_function("multiproc_queue", |b| {
        b.iter_custom(|iters| bench_support::queue_transfer(iters, size).unwrap())
    });
    g.bench_function("crossbeam_channel_in_process", |b| {
        b.iter_custom(|iters| crossbeam(iters, size))
    });
    g.bench_function("memcpy", |b| b.iter_custom(|iters| memcpy(iters, size)));
    g.finish();
}

fn benches(c: &mut Criterion) {
    multiproc::init();
    group(c, "queue_small", 8, 20);
    group(c, "queue_large", 1 << 20, 10);
}

criterion_group!(queue, benches);
criterion_main!(queue);
