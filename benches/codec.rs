//! Why postcard: encode+decode time of typical IPC messages in postcard (the crate's format)
//! beside bitcode's serde mode (the other live, fast serde format), in the same run.
//!
//! `cargo bench --bench codec`

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde::{Deserialize, Serialize};
use std::hint::black_box;

#[derive(Serialize, Deserialize, Clone)]
struct Task {
    id: u64,
    name: String,
    args: (i64, i64, i64),
    tags: Vec<u32>,
}

fn bench_codec<T>(c: &mut Criterion, label: &str, v: T, bytes: u64)
where
    T: Serialize + for<'de> Deserialize<'de> + Clone,
{
    let mut g = c.benchmark_group(format!("codec/{label}"));
    g.throughput(Throughput::Bytes(bytes));
    let mut buf = Vec::new();
    g.bench_function(BenchmarkId::new("postcard", label), |b| {
        b.iter(|| {
            buf.clear();
            buf = postcard::to_extend(black_box(&v), std::mem::take(&mut buf)).unwrap();
            let back: T = postcard::from_bytes(&buf).unwrap();
            black_box(back);
        })
    });
    g.bench_function(BenchmarkId::new("bitcode", label), |b| {
        b.iter(|| {
            let enc = bitcode::serialize(black_box(&v)).unwrap();
            let back: T = bitcode::deserialize(&enc).unwrap();
            black_box(back);
        })
    });
    g.finish();
}

fn all(c: &mut Criterion) {
    bench_codec(c, "u64", 12345678u64, 8);
    bench_codec(c, "tuple3", (1i64, -2i64, 3i64), 24);
    bench_codec(
        c,
        "task",
        Task {
            id: 42,
            name: "check_prime".into(),
            args: (1, 2, 3),
            tags: vec![1, 2, 3, 4],
        },
        64,
    );
    bench_codec(c, "vec_u64_1000", (0..1000u64).collect::<Vec<_>>(), 8000);
    bench_codec(c, "vec_u8_1MiB", vec![7u8; 1 << 20], 1 << 20);
    bench_codec(
        c,
        "bytebuf_1MiB",
        serde_bytes::ByteBuf::from(vec![7u8; 1 << 20]),
        1 << 20,
    );
}

criterion_group!(benches, all);
criterion_main!(benches);
