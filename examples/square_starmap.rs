//! Seed 003: `square` mapped over a list with a pool using every core, then `add` of three
//! arguments with `starmap`.
//!
//! `cargo run --example square_starmap`

use multiproc::Pool;

fn square(n: i64) -> i64 {
    println!("Worker process id for {n}: {}", std::process::id());
    n * n
}

fn add((x, y, z): (i64, i64, i64)) -> i64 {
    println!(
        "Worker process id for {:?}: {}",
        (x, y, z),
        std::process::id()
    );
    x + y + z
}

fn main() {
    multiproc::init();
    let mylist = vec![1, 2, 3, 4, 5];
    // The sequential version, in this process.
    let result: Vec<i64> = mylist.iter().map(|&n| square(n)).collect();
    println!("{result:?}");

    // A pool using all cores; dropping it at the end of the block terminates it, as `with`.
    let result = {
        let p = Pool::builder().build().expect("pool");
        p.map(square, mylist).expect("map")
    };
    println!("{result:?}");

    let result = {
        let p = Pool::builder().build().expect("pool");
        p.starmap(add, vec![(1, 2, 3), (10, 20, 30), (100, 0, -100)])
            .expect("starmap")
    };
    println!("{result:?}");
    assert_eq!(result, vec![6, 60, 0]);
}
