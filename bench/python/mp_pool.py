# Pool(2) rows.
#   map_default N: Pool.map(square, range(N)) with the default chunksize, tasks/s
#   map_chunk1 N:  the same with chunksize=1, tasks/s
#   apply N:       apply_async(square, (i,)).get() round trip, median of N, in us
#   rss 0:         resident memory of an idle pool worker, in MiB
#   uss 0:         memory only that worker maps (private pages), in MiB
import sys, time, statistics, multiprocessing as mp
from mp_common import median3, emit


def square(x):
    return x * x


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def uss_mib(pid):
    kib = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                kib += int(line.split()[1])
    return kib / 1024


if __name__ == "__main__":
    mode, n = sys.argv[1], int(sys.argv[2])
    with mp.Pool(2) as pool:
        pool.map(square, range(100))  # workers up
        if mode in ("map_default", "map_chunk1"):
            cs = None if mode == "map_default" else 1

            def rate():
                t = time.perf_counter()
                r = pool.map(square, range(n), chunksize=cs)
                dt = time.perf_counter() - t
                assert len(r) == n and r[-1] == (n - 1) ** 2
                return n / dt

            emit(median3(rate))
        elif mode == "apply":
            def rtt():
                lat = []
                for i in range(n):
                    t = time.perf_counter()
                    pool.apply_async(square, (i,)).get()
                    lat.append(time.perf_counter() - t)
                return statistics.median(lat) * 1e6

            emit(median3(rtt))
        elif mode == "rss":
            emit(median3(lambda: statistics.median(rss_mib(p.pid) for p in pool._pool)))
        elif mode == "uss":
            emit(median3(lambda: statistics.median(uss_mib(p.pid) for p in pool._pool)))
        else:
            sys.exit(f"unknown mode {mode}")
