# primes: seconds to count the primes in [LO, HI) by trial division on Pool(WORKERS), the range
# split in BLOCKS blocks mapped with chunksize=1 (seed 000).   usage: primes.py LO HI WORKERS BLOCKS
import sys, time, multiprocessing as mp
from mp_common import median3, emit


def is_prime(n):
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    d = 3
    while d * d <= n:
        if n % d == 0:
            return False
        d += 2
    return True


def count(lo_hi):
    lo, hi = lo_hi
    return sum(1 for n in range(lo, hi) if is_prime(n))


def blocks(lo, hi, k):
    step = -(-(hi - lo) // k)
    return [(a, min(a + step, hi)) for a in range(lo, hi, step)]


if __name__ == "__main__":
    lo, hi, workers, nblocks = (int(x) for x in sys.argv[1:5])
    with mp.Pool(workers) as pool:
        def once():
            t = time.perf_counter()
            sum(pool.map(count, blocks(lo, hi, nblocks), chunksize=1))
            return time.perf_counter() - t
        emit(median3(once))
