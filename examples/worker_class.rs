//! Seed 001, the `Worker(multiprocessing.Process)` subclass with a `run` method: in Rust, a type
//! implementing the `Worker` trait, whose `run` the child calls.
//!
//! `cargo run --example worker_class`

use multiproc::{Process, Worker};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct PidPrinter;

impl Worker for PidPrinter {
    fn run(self) {
        println!("I am a process with id number {}", std::process::id());
    }
}

fn main() -> multiproc::Result<()> {
    multiproc::init();
    let mut workers: Vec<Process> = (0..5).map(|_| Process::from_worker(PidPrinter)).collect();
    for w in &mut workers {
        w.start()?;
    }
    for w in &workers {
        w.join()?;
    }
    println!("All workers have finished working");
    Ok(())
}
