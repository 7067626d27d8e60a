# queue_small / queue_large: multiprocessing.Queue, one producer process, the parent consumes.
#   small N [KIND]: N 8-byte bytes objects, messages/s
#   large N [KIND]: N 1 MiB bytes objects, GB/s
# KIND is Queue (the default) or SimpleQueue.
import sys, time, multiprocessing as mp
from mp_common import median3, emit

SMALL, BIG = b"x" * 8, b"x" * (1 << 20)


def producer(q, go, n, payload):
    q.put(b"ready")
    go.wait()
    for _ in range(n):
        q.put(payload)
    q.put(None)


def run(n, payload, kind):
    q, go = getattr(mp, kind)(), mp.Event()
    p = mp.Process(target=producer, args=(q, go, n, payload))
    p.start()
    assert q.get() == b"ready"
    t = time.perf_counter()
    go.set()
    cnt = 0
    while q.get() is not None:
        cnt += 1
    dt = time.perf_counter() - t
    p.join()
    assert cnt == n
    return n / dt if payload is SMALL else n * len(BIG) / dt / 1e9


if __name__ == "__main__":
    mode, n = sys.argv[1], int(sys.argv[2])
    kind = sys.argv[3] if len(sys.argv) > 3 else "Queue"
    emit(median3(lambda: run(n, SMALL if mode == "small" else BIG, kind)))
