//! Seed 001, "Process": five workers print their number and pid, then the parent reports.
//!
//! `cargo run --example print_work`

use multiproc::Process;

fn print_work(num: u32) {
    println!(
        "I am worker number {num} and my process id is {}",
        std::process::id()
    );
}

fn main() -> multiproc::Result<()> {
    multiproc::init();
    let mut workers: Vec<Process> = (0..5).map(|i| Process::new(print_work, i)).collect();
    for w in &mut workers {
        w.start()?;
    }
    for w in &workers {
        w.join()?;
    }
    println!("All workers have finished working");
    Ok(())
}
