//! Seed 001: check numbers for primality with a pool of 5 worker processes; each worker says
//! who it is.
//!
//! `cargo run --example check_prime_pool`

use std::time::{Duration, Instant};

use multiproc::Pool;

fn check_prime(num: u64) {
    std::thread::sleep(Duration::from_millis(100));
    let is_prime = num >= 2 && (2..num).all(|i| num % i != 0);
    println!(
        "Process {} says that {num} is {is_prime} prime",
        std::process::id()
    );
}

fn main() {
    multiproc::init();
    let tic = Instant::now();
    let numbers = vec![222377u64, 3334, 2212, 3345, 23441, 454577, 341737, 565633];
    // use 5 workers to work on the list of numbers
    let worker_pool = Pool::new(5).expect("pool");
    worker_pool.map(check_prime, numbers).expect("map");
    worker_pool.close();
    worker_pool.join().expect("join");
    println!("All workers have finished working");
    println!("Total time taken: {:?}", tic.elapsed());
}
