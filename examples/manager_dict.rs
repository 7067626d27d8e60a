//! A dictionary and a list in a manager, filled by worker processes (Python's
//! `Manager().dict()` / `Manager().list()` pattern).
//!
//! Run: `cargo run --example manager_dict`

use multiproc::Process;
use multiproc::managers::{DictProxy, ListProxy, Manager};

/// What each worker does: record its square in the dict and its pid in the list.
fn worker((n, squares, pids): (u64, DictProxy<u64, u64>, ListProxy<u32>)) {
    squares.set(&n, &(n * n)).unwrap();
    pids.append(&std::process::id()).unwrap();
}

fn main() {
    multiproc::init();
    let manager = Manager::start().expect("start the manager");
    let squares = manager.dict::<u64, u64>().unwrap();
    let pids = manager.list::<u32>().unwrap();

    let mut workers: Vec<Process> = (0..8)
        .map(|n| Process::new(worker, (n, squares.clone(), pids.clone())))
        .collect();
    for p in &mut workers {
        p.start().unwrap();
    }
    for p in &workers {
        p.join().unwrap();
    }

    let mut items = squares.items().unwrap();
    items.sort();
    println!("squares: {items:?}");
    println!(
        "{} workers wrote to the list: {:?}",
        pids.len().unwrap(),
        pids.to_vec().unwrap()
    );
    assert_eq!(items.len(), 8);
}
