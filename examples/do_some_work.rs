//! Seed 004: `Process(target=do_some_work, args=(val,))`, then the daemon flag, `is_alive` and
//! `terminate` that the tutorial describes.
//!
//! `cargo run --example do_some_work`

use std::time::Duration;

use multiproc::Process;

fn do_some_work(val: String) {
    println!("doing some work in process");
    println!("echo: {val}");
}

fn wait_forever(_: ()) {
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn main() -> multiproc::Result<()> {
    multiproc::init();
    let val = String::from("text");
    let mut p = Process::new(do_some_work, val);
    p.start()?;
    p.join()?;

    // A daemon process does not keep its parent alive, and processes are killable.
    let mut d = Process::new(wait_forever, ()).daemon(true).name("sleeper");
    d.start()?;
    println!("{} alive: {}", d.get_name(), d.is_alive());
    d.terminate()?;
    d.join()?;
    println!(
        "{} alive: {}, exitcode {:?} (-15 is SIGTERM)",
        d.get_name(),
        d.is_alive(),
        d.exitcode()
    );
    Ok(())
}
