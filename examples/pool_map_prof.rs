//! Profiling helper: repeated map(x*x) over 1e6 ints.
fn sq(x: u64) -> u64 {
    x.wrapping_mul(x)
}
fn main() {
    multiproc::init();
    let pool = multiproc::Pool::new(2).unwrap();
    pool.map(sq, 0..1000u64).unwrap();
    for _ in 0..30 {
        let t = std::time::Instant::now();
        let r = pool.map(sq, 0..1_000_000u64).unwrap();
        eprintln!("{:.1} M/s", 1e6 / t.elapsed().as_secs_f64() / 1e6);
        assert_eq!(r.len(), 1_000_000);
    }
}
