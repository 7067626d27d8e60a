//! What Python cannot do: a process dies (SIGKILL) while holding a lock, and the next acquirer
//! is told, gets the lock, repairs the shared state and carries on, instead of hanging forever.
//!
//! Run: `cargo run --example lock_owner_died`.

use std::time::Duration;

use multiproc::{Event, LockError, Process, Value};

/// Moves 10 from account 0 to account 1, but dies half-way through.
fn transfer_and_die((accounts, halfway): (Value<[i64; 2]>, Event)) {
    let mut a = accounts.lock().expect("lock");
    a[0] -= 10;
    halfway.set();
    loop {
        std::thread::sleep(Duration::from_secs(1)); // killed here, lock held
    }
}

fn main() -> multiproc::Result<()> {
    multiproc::init();
    let accounts = Value::new([100i64, 0])?;
    let halfway = Event::new()?;
    let mut p = Process::new(transfer_and_die, (accounts.clone(), halfway.clone()));
    p.start()?;
    if !halfway.wait_timeout(Duration::from_secs(10)) {
        return Err(multiproc::Error::Timeout);
    }
    p.kill()?;
    p.join()?;
    println!(
        "worker killed while holding the lock (exit code {:?})",
        p.exitcode()
    );

    match accounts.lock_timeout(Duration::from_secs(1)) {
        Ok(_) => println!("lock acquired normally (unexpected)"),
        Err(LockError::OwnerDied(mut a)) => {
            println!("previous owner died; state left as {:?}", *a);
            // Repair: the invariant is that the total is 100.
            a[1] = 100 - a[0];
            a.mark_consistent();
            println!("repaired to {:?}", *a);
        }
        Err(LockError::Failed(e)) => return Err(e),
    }
    println!("balances now {:?}", accounts.get()?);
    Ok(())
}
