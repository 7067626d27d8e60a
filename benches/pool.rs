//! Pool benchmarks (criterion): map with default chunks and with chunk size 1, the
//! `apply_async().get()` round trip beside the raw pipe ping-pong, and a small primes map.
//! The `multiproc bench` command prints the SPEC table; this is for tracking changes.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use multiproc::Pool;
use multiproc::bench_support::{raw, workloads};

fn sq(x: u64) -> u64 {
    x.wrapping_mul(x)
}

fn pool_benches(c: &mut Criterion) {
    multiproc::init();
    let pool = Pool::new(2).expect("pool");
    pool.map(sq, 0..1000u64).expect("warm-up");

    let mut g = c.benchmark_group("pool_map");
    g.sample_size(10);
    g.throughput(Throughput::Elements(1_000_000));
    g.bench_function("map_default_1e6", |b| {
        b.iter(|| pool.map(sq, 0..1_000_000u64).expect("map"))
    });
    g.throughput(Throughput::Elements(100_000));
    g.bench_function("map_chunk1_1e5", |b| {
        b.iter(|| pool.map_chunksize(sq, 0..100_000u64, 1).expect("map"))
    });
    g.finish();

    let mut g = c.benchmark_group("pool_rtt");
    g.bench_function("apply_async_get", |b| {
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            pool.apply_async(sq, i).expect("apply").get().expect("get")
        })
    });
    g.bench_function("raw_pipe_pingpong", |b| {
        // The median round trip of a 1-byte ping-pong with a forked child (the raw limit).
        b.iter_custom(|iters| {
            let per = raw::pipe_rtt(iters.clamp(100, 100_000) as usize).expect("ping-pong");
            std::time::Duration::from_secs_f64(per * iters as f64)
        })
    });
    g.finish();

    let mut g = c.benchmark_group("pool_primes");
    g.sample_size(10);
    let blocks = workloads::blocks(100_000_000, 100_100_000, 64);
    g.bench_function("primes_1e5_pool2", |b| {
        b.iter(|| {
            pool.map_chunksize(workloads::count_primes, blocks.clone(), 1)
                .expect("map")
                .iter()
                .sum::<u64>()
        })
    });
    g.bench_function("primes_1e5_sequential", |b| {
        b.iter(|| workloads::count_primes((100_000_000, 100_100_000)))
    });
    g.finish();
}

criterion_group!(benches, pool_benches);
criterion_main!(benches);
