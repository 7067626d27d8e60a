//! Seed 002 on threads: the same dart throwing with `multiproc::dummy::Pool` (threads, as Python's
//! `multiprocessing.dummy`). Rust threads have no global lock, so this scales too.
//!
//! Each call seeds its own generator from the thread id and the clock (threads share memory, but
//! not a generator).
//!
//! `cargo run --release --example pi_threads [SAMPLES]`

use std::time::Instant;

use multiproc::dummy::Pool;

/// SplitMix64: small, fast, good enough for darts.
struct SplitMix(u64);

impl SplitMix {
    fn from_entropy() -> SplitMix {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&std::thread::current().id(), &mut h);
        SplitMix(t ^ std::hash::Hasher::finish(&h) ^ 0x9E37_79B9_7F4A_7C15)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn estimate_nbr_points_in_quarter_circle(nbr_samples: u64) -> u64 {
    let mut rng = SplitMix::from_entropy();
    (0..nbr_samples)
        .filter(|_| {
            let (x, y) = (rng.uniform(), rng.uniform());
            x * x + y * y <= 1.0
        })
        .count() as u64
}

fn main() {
    multiproc::init();
    let nbr_samples_in_total: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000_000);
    let nbr_parallel_blocks = 4;
    let pool = Pool::builder().build().expect("pool");
    let nbr_samples_per_worker = nbr_samples_in_total / nbr_parallel_blocks;
    println!("Making {nbr_samples_per_worker} samples per worker");
    let map_inputs = vec![nbr_samples_per_worker; nbr_parallel_blocks as usize];
    let t1 = Instant::now();
    let results = pool
        .map(estimate_nbr_points_in_quarter_circle, map_inputs.clone())
        .expect("map");
    pool.close();
    println!("Dart throws in unit circle per worker: {results:?}");
    println!("Took {:?}", t1.elapsed());
    let nbr_in_circle: u64 = results.iter().sum();
    let combined_nbr_samples: u64 = map_inputs.iter().sum();
    let pi_estimate = nbr_in_circle as f64 / combined_nbr_samples as f64 * 4.0;
    println!("Estimated pi {pi_estimate}");
    println!("Pi {}", std::f64::consts::PI);
    pool.join().expect("join");
}
