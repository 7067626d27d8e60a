//! Seed 004: a pool sized `cpu_count() * 2` whose workers each run an initializer at start.
//!
//! `cargo run --example pool_initializer`

use multiproc::Pool;

fn do_work(data: u64) -> u64 {
    data.pow(2)
}

fn start_process(_: ()) {
    println!("Starting {}", multiproc::current_process().name());
}

fn main() {
    multiproc::init();
    let pool_size = multiproc::cpu_count() * 2;
    let pool = Pool::builder()
        .processes(pool_size)
        .initializer(start_process, ())
        .build()
        .expect("pool");
    let inputs: Vec<u64> = (0..10).collect();
    let outputs = pool.map(do_work, inputs).expect("map");
    println!("Outputs {outputs:?}");
    pool.close(); // no more tasks
    pool.join().expect("join"); // wait for the worker processes to exit
}
