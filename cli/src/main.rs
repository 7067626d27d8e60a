//! `multiproc`: the seed workloads (`primes`, `pi`), sequential against parallel, and the
//! benchmark suite (`bench`) beside Python's `multiprocessing` and the raw limits.

mod bench;
mod parallel;
mod seeds;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "multiproc",
    version,
    about = "Python's multiprocessing, done properly in Rust: \
                                                seed workloads and the benchmark suite"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Count the primes in [FROM, TO) by trial division, sequentially then in parallel (seed 000).
    Primes(seeds::PrimesArgs),
    /// Estimate pi by Monte Carlo, sequentially then in parallel (seed 002).
    Pi(seeds::PiArgs),
    /// Run the benchmark suite: each row beside Python's multiprocessing and the raw limit.
    Bench(bench::BenchArgs),
}

fn main() {
    // First thing: the exec'd child of the raw exec+waitpid limit exits here, at once.
    multiproc::bench_support::raw::exit_if_raw_child();
    multiproc::init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Primes(a) => seeds::primes(&a),
        Command::Pi(a) => seeds::pi(&a),
        Command::Bench(a) => bench::run(&a),
    };
    if let Err(e) = result {
        eprintln!("multiproc: {e}");
        std::process::exit(1);
    }
}
