# start_fork / start_forkserver / start_spawn: start() + join() of one no-op Process, in ms,
# the median of N (median of 3 series).   usage: start.py METHOD N
import sys, time, statistics, multiprocessing as mp
from mp_common import median3, emit


def noop():
    pass


if __name__ == "__main__":
    method, n = sys.argv[1], int(sys.argv[2])
    ctx = mp.get_context(method)

    def series():
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            p = ctx.Process(target=noop)
            p.start()
            p.join()
            ts.append(time.perf_counter() - t)
            assert p.exitcode == 0
        return statistics.median(ts)

    emit(median3(series) * 1e3)
