# value_lock: Value('i') incremented under get_lock() by 2 processes x N, increments/s; the
# total must be exact.   usage: value.py N
import sys, time, multiprocessing as mp
from mp_common import median3, emit


def inc(v, barrier, n):
    barrier.wait()
    for _ in range(n):
        with v.get_lock():
            v.value += 1


def run(n):
    v, barrier = mp.Value("i", 0), mp.Barrier(3)
    ps = [mp.Process(target=inc, args=(v, barrier, n)) for _ in range(2)]
    for p in ps:
        p.start()
    barrier.wait()
    t = time.perf_counter()
    for p in ps:
        p.join()
    dt = time.perf_counter() - t
    assert v.value == 2 * n, v.value
    return 2 * n / dt


if __name__ == "__main__":
    n = int(sys.argv[1])
    emit(median3(lambda: run(n)))
