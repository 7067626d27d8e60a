//! The seed workloads, callable in-process (sequential runs, limits) and as process entry
//! points (`fn` items taking and returning serde values).
//!
//! * Primes (seed 000): count the primes in `[lo, hi)` by trial division by odd numbers, as the
//!   tutorial's `is_prime` does.
//! * Monte Carlo pi (seed 002): each block of samples draws from its own generator, seeded from
//!   the block's index with splitmix64, so blocks are independent whichever process runs them
//!   (the tutorial's pitfall is forked workers that share one generator state) and a parallel
//!   run counts exactly the same hits as a sequential one.

/// The seed-000 range: `[100_000_000, 101_000_000)` holds [`PRIMES_DEFAULT_COUNT`] primes.
pub const PRIMES_DEFAULT: (u64, u64) = (100_000_000, 101_000_000);
/// The number of primes in [`PRIMES_DEFAULT`].
pub const PRIMES_DEFAULT_COUNT: u64 = 54_208;

/// Whether `n` is prime, by trial division by 2 and the odd numbers up to its square root.
///
/// ```
/// use multiproc::bench_support::workloads::is_prime;
/// let small: Vec<u64> = (0..30).filter(|&n| is_prime(n)).collect();
/// assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
/// ```
pub fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    if n % 2 == 0 {
        return n == 2;
    }
    let mut d = 3u64;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 2;
    }
    true
}

/// The number of primes in `[lo, hi)` (an entry point: takes one serde argument).
///
/// ```
/// use multiproc::bench_support::workloads::count_primes;
/// assert_eq!(count_primes((0, 100)), 25);
/// ```
pub fn count_primes((lo, hi): (u64, u64)) -> u64 {
    (lo..hi).filter(|&n| is_prime(n)).count() as u64
}

/// Splits `[lo, hi)` into at most `k` contiguous blocks of nearly equal length, in order,
/// none empty.
///
/// ```
/// use multiproc::bench_support::workloads::blocks;
/// assert_eq!(blocks(0, 10, 3), [(0, 4), (4, 8), (8, 10)]);
/// assert!(blocks(5, 5, 3).is_empty());
/// ```
pub fn blocks(lo: u64, hi: u64, k: usize) -> Vec<(u64, u64)> {
    if hi <= lo {
        return Vec::new();
    }
    let len = hi - lo;
    let step = len.div_ceil(k.max(1) as u64);
    (0..)
        .map(|i| lo + i * step)
        .take_while(|&a| a < hi)
        .map(|a| (a, (a + step).min(hi)))
        .collect()
}

/// One step of splitmix64: advances `state` and returns a well-mixed 64-bit value. Used to
/// derive independent seeds from small integers.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A xorshift64* generator: small, fast, and good enough for Monte Carlo pi.
#[derive(Clone, Debug)]
pub struct XorShift64Star(u64);

impl XorShift64Star {
    /// A generator whose state is derived from `seed` by splitmix64 (never zero).
    pub fn new(seed: u64) -> Self {
        let mut s = seed;
        let x = splitmix64(&mut s);
        XorShift64Star(if x == 0 { 0x2545_F491_4F6C_DD1D } else { x })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A uniform `f64` in `[0, 1)` (53 random bits).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Monte Carlo block: of `samples` random points of the unit square drawn from a generator
/// seeded with `seed`, how many fall in the quarter disc (an entry point).
///
/// ```
/// use multiproc::bench_support::workloads::pi_hits;
/// let hits = pi_hits((7, 100_000));
/// let pi = 4.0 * hits as f64 / 100_000.0;
/// assert!((pi - std::f64::consts::PI).abs() < 0.05);
/// assert_eq!(hits, pi_hits((7, 100_000)));
/// ```
pub fn pi_hits((seed, samples): (u64, u64)) -> u64 {
    let mut rng = XorShift64Star::new(seed);
    let mut hits = 0u64;
    for _ in 0..samples {
        let x = rng.next_f64();
        let y = rng.next_f64();
        hits += u64::from(x * x + y * y <= 1.0);
    }
    hits
}

/// Splits `samples` into `k` blocks `(seed, n)`: block `i` gets seed `i` and about
/// `samples / k` samples (the first ones one more when it does not divide).
///
/// ```
/// use multiproc::bench_support::workloads::pi_blocks;
/// assert_eq!(pi_blocks(10, 3), [(0, 4), (1, 3), (2, 3)]);
/// ```
pub fn pi_blocks(samples: u64, k: usize) -> Vec<(u64, u64)> {
    let k = k.max(1) as u64;
    (0..k)
        .map(|i| (i, samples / k + u64::from(i < samples % k)))
        .filter(|&(_, n)| n > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sieve_count(lo: u64, hi: u64) -> u64 {
        let hi = hi as usize;
        let mut comp = vec![false; hi.max(2)];
        let mut c = 0;
        for n in 2..hi {
            if !comp[n] {
                if n as u64 >= lo {
                    c += 1;
                }
                let mut m = n * n;
                while m < hi {
                    comp[m] = true;
                    m += n;
                }
            }
        }
        c
    }

    #[test]
    fn trial_division_agrees_with_a_sieve() {
        for &(lo, hi) in &[(0, 2), (0, 3), (0, 1000), (997, 20_011), (10_000, 10_500)] {
            assert_eq!(count_primes((lo, hi)), sieve_count(lo, hi), "[{lo}, {hi})");
        }
    }

    #[test]
    fn blocks_cover_the_range_exactly() {
        for &(lo, hi, k) in &[
            (0u64, 1u64, 4usize),
            (3, 1000, 7),
            (0, 8, 8),
            (0, 8, 0),
            (5, 9, 100),
        ] {
            let b = blocks(lo, hi, k);
            assert!(b.len() <= k.max(1));
            assert_eq!(b.first().unwrap().0, lo);
            assert_eq!(b.last().unwrap().1, hi);
            assert!(b.windows(2).all(|w| w[0].1 == w[1].0));
            assert!(b.iter().all(|&(a, z)| a < z));
        }
    }

    #[test]
    fn pi_blocks_sum_to_the_samples_and_seeds_differ() {
        let b = pi_blocks(1001, 8);
        assert_eq!(b.iter().map(|x| x.1).sum::<u64>(), 1001);
        assert_eq!(pi_blocks(3, 8).len(), 3);
        assert_ne!(
            XorShift64Star::new(0).next_u64(),
            XorShift64Star::new(1).next_u64()
        );
    }
}
