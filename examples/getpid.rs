//! Seed 000, step 4: every process has its own PID. The parent and each worker print theirs
//! (`ps aux | grep getpid` while it runs shows the same processes).
//!
//! `cargo run --example getpid`

fn whoami(task: u32) -> (u32, u32, String) {
    let me = multiproc::current_process();
    (task, me.pid(), me.name().to_string())
}

fn main() -> multiproc::Result<()> {
    multiproc::init();
    println!(
        "main process: pid {} ({}), {} cores ({} usable)",
        std::process::id(),
        multiproc::current_process().name(),
        multiproc::cpu_count(),
        multiproc::process_cpu_count()
    );
    let handles: Vec<_> = (0..multiproc::cpu_count() as u32)
        .map(|i| multiproc::spawn(whoami, i))
        .collect::<Result<_, _>>()?;
    for h in handles {
        let (task, pid, name) = h.join()?;
        println!("task {task} ran in {name} with pid {pid}");
    }
    Ok(())
}
