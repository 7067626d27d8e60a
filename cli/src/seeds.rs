//! `multiproc primes` and `multiproc pi`: a seed workload run sequentially in this process,
//! then in parallel on a [`multiproc::Pool`], with both times, the speedup and the efficiency.
//! The parallel time is the whole parallel run: starting the pool's workers, the map, and
//! shutting the pool down (what a program that uses a pool for one job pays).

use clap::Args;
use serde_json::json;

use multiproc::bench_support::workloads::{self, PRIMES_DEFAULT};

use crate::parallel;

/// Blocks per worker: enough for balance and a progress bar that moves, few enough that
/// sending a task costs nothing next to its work.
const BLOCKS_PER_WORKER: usize = 8;

/// Blocks of `multiproc pi` (more when there are more workers).
const PI_BLOCKS: usize = 64;

/// Arguments of `multiproc primes`.
#[derive(Args, Debug)]
pub struct PrimesArgs {
    /// First number of the range.
    #[arg(long, default_value_t = PRIMES_DEFAULT.0)]
    from: u64,
    /// End of the range (excluded).
    #[arg(long, default_value_t = PRIMES_DEFAULT.1)]
    to: u64,
    /// Worker processes (default: the CPUs this process may use).
    #[arg(long)]
    workers: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Arguments of `multiproc pi`.
#[derive(Args, Debug)]
pub struct PiArgs {
    /// Random points to draw.
    #[arg(long, default_value_t = 100_000_000)]
    samples: u64,
    /// Worker processes (default: the CPUs this process may use).
    #[arg(long)]
    workers: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Sequential and parallel runs of one workload.
struct Compared {
    workers: usize,
    blocks: usize,
    result: u64,
    seq_s: f64,
    par_s: f64,
}

impl Compared {
    fn speedup(&self) -> f64 {
        self.seq_s / self.par_s
    }
    fn efficiency(&self) -> f64 {
        self.speedup() / self.workers as f64
    }
}

/// Runs `f` over `inputs` in this process, then on a pool of `workers` processes, and sums.
fn compare<F>(f: F, inputs: Vec<(u64, u64)>, workers: usize) -> Result<Compared, String>
where
    F: Fn((u64, u64)) -> u64 + Copy + Send + 'static,
{
    let blocks = inputs.len();
    let bar = parallel::bar(blocks, "sequential");
    let (seq_s, seq) = multiproc::bench_support::timed(|| {
        inputs
            .iter()
            .map(|&a| {
                let r = f(a);
                bar.inc(1);
                r
            })
            .sum::<u64>()
    });
    bar.finish_and_clear();
    let bar = parallel::bar(blocks, "parallel");
    let (par_s, par) = multiproc::bench_support::timed(|| {
        let pool = multiproc::Pool::new(workers)?;
        let r = parallel::map(&pool, f, inputs, &bar)?;
        pool.close();
        pool.join()?;
        Ok::<_, multiproc::Error>(r)
    });
    bar.finish_and_clear();
    let par: u64 = par.map_err(|e| e.to_string())?.into_iter().sum();
    if par != seq {
        return Err(format!(
            "the parallel run found {par} where the sequential run found {seq}"
        ));
    }
    Ok(Compared {
        workers,
        blocks,
        result: seq,
        seq_s,
        par_s,
    })
}

fn workers_or_default(w: Option<usize>) -> Result<usize, String> {
    match w {
        Some(0) => Err("--workers must be at least 1".into()),
        Some(w) => Ok(w),
        None => Ok(multiproc::process_cpu_count().max(1)),
    }
}

fn print_times(c: &Compared) {
    println!("sequential  {:9.3} s", c.seq_s);
    println!(
        "parallel    {:9.3} s   ({} worker processes, {} blocks)",
        c.par_s, c.workers, c.blocks
    );
    println!(
        "speedup     {:9.2}x    efficiency {:.2} (speedup / workers)",
        c.speedup(),
        c.efficiency()
    );
}

/// `multiproc primes`.
pub fn primes(a: &PrimesArgs) -> Result<(), String> {
    if a.to < a.from {
        return Err(format!("--to {} is below --from {}", a.to, a.from));
    }
    let workers = workers_or_default(a.workers)?;
    let inputs = workloads::blocks(a.from, a.to, workers * BLOCKS_PER_WORKER);
    let c = compare(workloads::count_primes, inputs, workers)?;
    if a.json {
        println!(
            "{}",
            json!({
                "command": "primes", "from": a.from, "to": a.to, "count": c.result,
                "workers": c.workers, "blocks": c.blocks,
                "sequential_s": c.seq_s, "parallel_s": c.par_s,
                "speedup": c.speedup(), "efficiency": c.efficiency(),
            })
        );
    } else {
        println!("primes in [{}, {}): {}", a.from, a.to, c.result);
        print_times(&c);
    }
    Ok(())
}

/// `multiproc pi`.
pub fn pi(a: &PiArgs) -> Result<(), String> {
    if a.samples == 0 {
        return Err("--samples must be at least 1".into());
    }
    let workers = workers_or_default(a.workers)?;
    // A fixed number of blocks (seeded by index) makes the estimate depend on the samples only,
    // not on how many processes draw them.
    let inputs = workloads::pi_blocks(a.samples, PI_BLOCKS.max(workers));
    let c = compare(workloads::pi_hits, inputs, workers)?;
    let pi = 4.0 * c.result as f64 / a.samples as f64;
    let err = pi - std::f64::consts::PI;
    if a.json {
        println!(
            "{}",
            json!({
                "command": "pi", "samples": a.samples, "hits": c.result, "pi": pi, "error": err,
                "workers": c.workers, "blocks": c.blocks,
                "sequential_s": c.seq_s, "parallel_s": c.par_s,
                "speedup": c.speedup(), "efficiency": c.efficiency(),
            })
        );
    } else {
        println!("pi ~ {pi:.6} from {} samples (error {err:+.2e})", a.samples);
        print_times(&c);
    }
    Ok(())
}
