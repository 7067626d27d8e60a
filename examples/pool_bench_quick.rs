//! Quick pool figures in one run: `cargo run --release --example pool_bench_quick [rtt|map|rss|primes]`.
fn main() {
    multiproc::init();
    use multiproc::bench_support::{pool as b, raw};
    let args: Vec<String> = std::env::args().collect();
    let only = args.get(1).cloned().unwrap_or_default();
    if only.is_empty() || only == "rtt" {
        let pipe = raw::pipe_rtt(10_000).unwrap();
        let rtt = b::apply_rtt(10_000).unwrap();
        println!(
            "apply_rtt {:.1} us, pipe_rtt {:.1} us, ratio {:.2}",
            rtt * 1e6,
            pipe * 1e6,
            rtt / pipe
        );
    }
    if only.is_empty() || only == "map" {
        println!(
            "map_default {:.2} M tasks/s",
            b::map_default(1_000_000).unwrap() / 1e6
        );
        println!(
            "map_chunk1 {:.0} k tasks/s",
            b::map_chunk1(100_000).unwrap() / 1e3
        );
    }
    if only.is_empty() || only == "rss" {
        println!("worker_rss {:.2} MiB", b::worker_rss().unwrap());
    }
    if only.is_empty() || only == "primes" {
        let (c, s, p) = b::primes(100_000_000, 101_000_000, 2).unwrap();
        println!(
            "primes {c}: seq {s:.3}s par {p:.3}s efficiency {:.3}",
            s / p / 2.0
        );
    }
}
