//! The rows of the suite, in SPEC's order: one [`Row`] each. To fill a side that is `none`
//! today, write its function below (in `src/bench_support/` of the library if criterion benches
//! need it too) and name it in the row. The crate's side and the limit return one sample per
//! call (the runner interleaves them and takes medians); the Python side returns its script's
//! figure.

use multiproc::StartMethod;
use multiproc::bench_support::{self, managers, pipe, pool, process, raw, workloads};

use super::{Cfg, Measured, Row, ceiling, none};

/// The suite.
pub const ROWS: &[Row] = &[
    Row {
        id: "primes",
        unit: "s",
        higher_is_better: false,
        multiproc: primes_multiproc,
        python: primes_python,
        limit: primes_limit,
        beside: &[],
    },
    Row {
        id: "map_default",
        unit: "task/s",
        higher_is_better: true,
        multiproc: |c| sample(pool::map_default(c.size(1_000_000, 100_000) as u64), 1.0),
        python: |c| {
            c.py(
                "mp_pool.py",
                &args(["map_default", &c.size(1_000_000, 100_000).to_string()]),
            )
        },
        limit: none,
        beside: &[],
    },
    Row {
        id: "map_chunk1",
        unit: "task/s",
        higher_is_better: true,
        multiproc: |c| sample(pool::map_chunk1(c.size(100_000, 10_000) as u64), 1.0),
        python: |c| {
            c.py(
                "mp_pool.py",
                &args(["map_chunk1", &c.size(100_000, 10_000).to_string()]),
            )
        },
        limit: none,
        beside: &[],
    },
    Row {
        id: "apply_rtt",
        unit: "us",
        higher_is_better: false,
        multiproc: |c| sample(pool::apply_rtt(c.size(10_000, 1_000)), 1e6),
        python: |c| {
            c.py(
                "mp_pool.py",
                &args(["apply", &c.size(10_000, 1_000).to_string()]),
            )
        },
        limit: pipe_rtt_limit,
        beside: &[],
    },
    Row {
        id: "queue_small",
        unit: "msg/s",
        higher_is_better: true,
        multiproc: |c| {
            sample(
                bench_support::queue_small(c.size(200_000, 20_000) as u64),
                1.0,
            )
        },
        python: |c| {
            c.py(
                "mp_queue.py",
                &args(["small", &c.size(200_000, 20_000).to_string()]),
            )
        },
        limit: queue_small_ceiling,
        beside: &[("python SimpleQueue", |c| {
            c.py(
                "mp_queue.py",
                &args(["small", &c.size(200_000, 20_000).to_string(), "SimpleQueue"]),
            )
        })],
    },
    Row {
        id: "queue_large",
        unit: "GB/s",
        higher_is_better: true,
        multiproc: |c| sample(bench_support::queue_large(c.size(1_000, 100) as u64), 1e-9),
        python: |c| {
            c.py(
                "mp_queue.py",
                &args(["large", &c.size(1_000, 100).to_string()]),
            )
        },
        limit: memcpy_limit,
        beside: &[
            ("python SimpleQueue", |c| {
                c.py(
                    "mp_queue.py",
                    &args(["large", &c.size(1_000, 100).to_string(), "SimpleQueue"]),
                )
            }),
            ("crossbeam (threads)", |c| {
                Ok(Some(
                    ceiling::channel(c.size(1_000, 100) as u64, pipe::MIB) * pipe::MIB as f64 / 1e9,
                ))
            }),
        ],
    },
    Row {
        id: "pipe_rtt",
        unit: "us",
        higher_is_better: false,
        multiproc: pipe_rtt_multiproc,
        python: |c| c.py("mp_pipe.py", &args(["rtt", &pipe_rtt_n(c).to_string()])),
        limit: pipe_rtt_limit,
        beside: &[],
    },
    Row {
        id: "pipe_small",
        unit: "msg/s",
        higher_is_better: true,
        multiproc: pipe_small_multiproc,
        python: |c| c.py("mp_pipe.py", &args(["small", &pipe_small_n(c).to_string()])),
        limit: pipe_small_limit,
        beside: &[],
    },
    Row {
        id: "pipe_large",
        unit: "GB/s",
        higher_is_better: true,
        multiproc: pipe_large_multiproc,
        python: |c| c.py("mp_pipe.py", &args(["large", &pipe_large_n(c).to_string()])),
        limit: memcpy_limit,
        beside: &[],
    },
    Row {
        id: "start_fork",
        unit: "ms",
        higher_is_better: false,
        multiproc: |c| start_multiproc(c, StartMethod::Fork),
        python: |c| start_python(c, "fork"),
        limit: fork_limit,
        beside: &[],
    },
    Row {
        id: "start_forkserver",
        unit: "ms",
        higher_is_better: false,
        multiproc: |c| start_multiproc(c, StartMethod::ForkServer),
        python: |c| start_python(c, "forkserver"),
        limit: fork_limit,
        beside: &[],
    },
    Row {
        id: "start_spawn",
        unit: "ms",
        higher_is_better: false,
        multiproc: |c| start_multiproc(c, StartMethod::Spawn),
        python: |c| start_python(c, "spawn"),
        limit: exec_limit,
        beside: &[],
    },
    Row {
        id: "value_lock",
        unit: "incr/s",
        higher_is_better: true,
        multiproc: value_lock_multiproc,
        python: |c| c.py("mp_value.py", &args([&c.size(100_000, 10_000).to_string()])),
        limit: none,
        beside: &[],
    },
    Row {
        id: "manager_dict",
        unit: "op/s",
        higher_is_better: true,
        multiproc: |c| sample(managers::manager_dict(c.size(20_000, 2_000) as u64), 1.0),
        python: |c| c.py("mp_manager.py", &args([&c.size(20_000, 2_000).to_string()])),
        limit: none,
        beside: &[],
    },
    Row {
        id: "worker_rss",
        unit: "MiB",
        higher_is_better: false,
        multiproc: |_| sample(pool::worker_rss(), 1.0),
        python: |c| c.py("mp_pool.py", &args(["rss", "0"])),
        limit: none,
        // RSS counts the shared text of the binary and of libc in full: what a worker costs
        // on its own is its private pages.
        beside: &[
            ("multiproc private (USS)", |_| {
                sample(pool::worker_uss(), 1.0)
            }),
            ("python private (USS)", |c| {
                c.py("mp_pool.py", &args(["uss", "0"]))
            }),
        ],
    },
];

fn args<const N: usize>(a: [&str; N]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn sample(r: multiproc::Result<f64>, scale: f64) -> Measured {
    r.map(|x| Some(x * scale)).map_err(|e| e.to_string())
}

// --- primes -----------------------------------------------------------------------------------

fn primes_range(c: &Cfg) -> (u64, u64) {
    let (lo, hi) = workloads::PRIMES_DEFAULT;
    if c.quick { (lo, lo + 20_000) } else { (lo, hi) }
}

fn primes_workers() -> usize {
    multiproc::process_cpu_count().max(1)
}

/// The blocks every side splits the range into.
fn primes_blocks(c: &Cfg) -> Vec<(u64, u64)> {
    let (lo, hi) = primes_range(c);
    workloads::blocks(lo, hi, primes_workers() * 8)
}

/// A warm pool (not timed, as in mp_primes.py), then the timed map of the blocks.
fn primes_multiproc(c: &Cfg) -> Measured {
    let (lo, hi) = primes_range(c);
    let w = primes_workers();
    let r = pool::warm_pool(w).and_then(|p| pool::primes_on(&p, lo, hi, w * 8));
    sample(r.map(|(_, t)| t), 1.0)
}

fn primes_python(c: &Cfg) -> Measured {
    let (lo, hi) = primes_range(c);
    let w = primes_workers();
    c.py(
        "mp_primes.py",
        &args([
            &lo.to_string(),
            &hi.to_string(),
            &w.to_string(),
            &(w * 8).to_string(),
        ]),
    )
}

/// Perfect scaling: the sequential time in this process divided by the workers.
fn primes_limit(c: &Cfg) -> Measured {
    let blocks = primes_blocks(c);
    let (t, _) = bench_support::timed(|| {
        blocks
            .iter()
            .map(|&b| workloads::count_primes(b))
            .sum::<u64>()
    });
    Ok(Some(t / primes_workers() as f64))
}

// --- start ------------------------------------------------------------------------------------

fn start_n(c: &Cfg) -> usize {
    c.size(50, 10)
}

fn start_multiproc(c: &Cfg, m: StartMethod) -> Measured {
    let n = start_n(c);
    sample(process::start_join(m, n), 1e3)
}

fn start_python(c: &Cfg, method: &str) -> Measured {
    c.py("mp_start.py", &args([method, &start_n(c).to_string()]))
}

fn fork_limit(c: &Cfg) -> Measured {
    let n = start_n(c);
    sample(raw::fork_wait(n), 1e3)
}

fn exec_limit(c: &Cfg) -> Measured {
    let n = start_n(c);
    sample(raw::fork_exec_wait(n), 1e3)
}

// --- pipes ------------------------------------------------------------------------------------

fn pipe_rtt_n(c: &Cfg) -> usize {
    c.size(10_000, 1_000)
}

fn pipe_small_n(c: &Cfg) -> usize {
    c.size(200_000, 20_000)
}

fn pipe_large_n(c: &Cfg) -> usize {
    c.size(1_000, 100)
}

fn pipe_rtt_limit(c: &Cfg) -> Measured {
    let n = pipe_rtt_n(c);
    sample(raw::pipe_rtt(n), 1e6)
}

fn pipe_small_limit(c: &Cfg) -> Measured {
    let n = pipe_small_n(c);
    sample(raw::pipe_stream(n, 8), 1.0)
}

/// `queue_small`'s ceiling: the same stream between two threads over a crossbeam channel (no
/// process boundary, no serialization), messages per second.
fn queue_small_ceiling(c: &Cfg) -> Measured {
    Ok(Some(ceiling::channel(c.size(200_000, 20_000) as u64, 8)))
}

fn memcpy_limit(c: &Cfg) -> Measured {
    let n = c.size(2_000, 200);
    Ok(Some(raw::memcpy_bandwidth(pipe::MIB, n) / 1e9))
}

fn pipe_rtt_multiproc(c: &Cfg) -> Measured {
    sample(pipe::rtt(pipe_rtt_n(c)), 1e6)
}

fn pipe_small_multiproc(c: &Cfg) -> Measured {
    sample(pipe::small(pipe_small_n(c)), 1.0)
}

fn pipe_large_multiproc(c: &Cfg) -> Measured {
    sample(pipe::large(pipe_large_n(c)), 1e-9)
}

// --- shared state -----------------------------------------------------------------------------

/// Two processes x n locked increments of one `Value<u64>`; increments per second.
fn value_lock_multiproc(c: &Cfg) -> Measured {
    let n = c.size(100_000, 10_000) as u64;
    sample(
        bench_support::value_lock(n).map(|d| (2 * n) as f64 / d.as_secs_f64()),
        1.0,
    )
}
