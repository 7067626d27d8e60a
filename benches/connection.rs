//! Pipe and manager throughput, measured as Python's scripts measure them
//! (`bench/python/mp_pipe.py`, `mp_manager.py`) by the functions `multiproc bench` uses
//! (`multiproc::bench_support::{pipe, managers}`), beside the raw limits
//! (`bench_support::raw`), medians of 3 runs. Run: `cargo bench --bench connection`
//! (`MP_ONLY=pipe|rtt|small|typed|codec|manager` for one part).

use std::time::Instant;

use multiproc::bench_support::{managers, median, pipe, raw};

const NS: usize = 200_000;
const NB: usize = 2_000;
const NR: usize = 20_000;
const ND: u64 = 20_000;

fn med3(f: impl Fn() -> multiproc::Result<f64>) -> f64 {
    median((0..3).map(|_| f().expect("measure")).collect())
}

fn main() {
    multiproc::init();
    let only = std::env::var("MP_ONLY").unwrap_or_default();
    if only.is_empty() || only == "pipe" {
        pipe_rows();
    }
    if only == "rtt" {
        for _ in 0..3 {
            println!(
                "pipe_rtt {:.1} us, raw {:.1} us",
                pipe::rtt(NR).expect("rtt") * 1e6,
                raw::pipe_rtt(NR).expect("raw rtt") * 1e6
            );
        }
    }
    if only == "codec" {
        let v = vec![b'x'; 1 << 20];
        let n = 200;
        let t = Instant::now();
        let mut out = Vec::new();
        for _ in 0..n {
            out.clear();
            postcard::to_io(&v, &mut out).unwrap();
        }
        let io = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..n {
            out.clear();
            out = postcard::to_extend(&v, out).unwrap();
        }
        let ext = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..n {
            let back: Vec<u8> = postcard::from_bytes(&out).unwrap();
            assert_eq!(back.len(), v.len());
        }
        let de = t.elapsed().as_secs_f64();
        let gb = |s: f64| n as f64 * (1u64 << 20) as f64 / 1e9 / s;
        println!(
            "postcard Vec<u8> 1 MiB: to_io {:.2} GB/s, to_extend {:.2} GB/s, from_bytes {:.2} GB/s",
            gb(io),
            gb(ext),
            gb(de)
        );
    }
    if only == "typed" {
        println!(
            "pipe typed 1 MiB Vec<u8>: {:.2} GB/s",
            pipe::typed_large(500).expect("typed") / 1e9
        );
    }
    if only == "small" {
        let small = med3(|| pipe::small(NS));
        let raw_small = med3(|| raw::pipe_stream(NS, 8));
        println!("pipe_small {small:.0} msgs/s, raw {raw_small:.0} msgs/s");
    }
    if only.is_empty() || only == "manager" {
        let ops = med3(|| managers::manager_dict(ND));
        println!(
            "manager_dict from a child: {ops:.0} ops/s set+get (Python 12 k, target >= 120 k)"
        );
    }
}

fn pipe_rows() {
    let small = med3(|| pipe::small(NS));
    let large = med3(|| pipe::large(NB));
    let rt = med3(|| pipe::rtt(NR));
    let raw_rt = med3(|| raw::pipe_rtt(NR));
    let raw_small = med3(|| raw::pipe_stream(NS, 8));
    let raw_large = med3(|| raw::pipe_stream(NB, pipe::MIB)) * pipe::MIB as f64;
    println!("pipe_small  {small:>12.0} msgs/s   (Python 256 k, target >= 1.28 M)");
    println!(
        "pipe_large  {:>12.2} GB/s     (Python 0.49, target >= 2.45)",
        large / 1e9
    );
    println!(
        "pipe_rtt    {:>12.1} us       (raw ping-pong, same run: {:.1} us)",
        rt * 1e6,
        raw_rt * 1e6
    );
    println!(
        "raw pipes, same run: 8 B {raw_small:.0} msgs/s, 1 MiB {:.2} GB/s",
        raw_large / 1e9
    );
}
