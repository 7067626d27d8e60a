# manager_dict: Manager().dict() from a child process, N sets then N gets, operations/s of the
# two together.   usage: manager.py N
import sys, time, multiprocessing as mp
from mp_common import median3, emit


def child(d, out, n):
    t = time.perf_counter()
    for i in range(n):
        d[i] = i
    s = 0
    for i in range(n):
        s += d[i]
    dt = time.perf_counter() - t
    assert s == n * (n - 1) // 2
    out.put(2 * n / dt)


if __name__ == "__main__":
    n = int(sys.argv[1])
    with mp.Manager() as m:
        def run():
            d, q = m.dict(), mp.Queue()
            p = mp.Process(target=child, args=(d, q, n))
            p.start()
            r = q.get()
            p.join()
            return r
        emit(median3(run))
