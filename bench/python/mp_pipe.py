# pipe_rtt / pipe_small / pipe_large over multiprocessing.Pipe between the parent and a child.
#   rtt N:   round trip of an 8-byte bytes object (send/recv), median of N, in us
#   small N: N 8-byte bytes objects child -> parent (send/recv), messages/s
#   large N: N 1 MiB buffers child -> parent (send_bytes/recv_bytes), GB/s
# The child says "ready" and waits for "go" before the timed part (no sleeps).
import sys, time, statistics, multiprocessing as mp
from mp_common import median3, emit

SMALL, BIG = b"x" * 8, b"x" * (1 << 20)


def echo(c):
    c.send(b"ready")
    while True:
        m = c.recv()
        if m is None:
            return
        c.send(m)


def producer(c, n, big):
    c.send(b"ready")
    c.recv()
    if big:
        for _ in range(n):
            c.send_bytes(BIG)
        c.send_bytes(b"")
    else:
        for _ in range(n):
            c.send(SMALL)
        c.send(None)


def rtt(n):
    a, b = mp.Pipe()
    p = mp.Process(target=echo, args=(b,))
    p.start()
    a.recv()
    lat = []
    for _ in range(n + 100):
        t = time.perf_counter()
        a.send(SMALL)
        a.recv()
        lat.append(time.perf_counter() - t)
    a.send(None)
    p.join()
    return statistics.median(lat[100:]) * 1e6


def stream(n, big):
    a, b = mp.Pipe()
    p = mp.Process(target=producer, args=(b, n, big))
    p.start()
    a.recv()
    t = time.perf_counter()
    a.send(b"go")
    cnt = 0
    if big:
        while a.recv_bytes():
            cnt += 1
    else:
        while a.recv() is not None:
            cnt += 1
    dt = time.perf_counter() - t
    p.join()
    assert cnt == n
    return n * len(BIG) / dt / 1e9 if big else n / dt


if __name__ == "__main__":
    mode, n = sys.argv[1], int(sys.argv[2])
    if mode == "rtt":
        emit(median3(lambda: rtt(n)))
    elif mode == "small":
        emit(median3(lambda: stream(n, False)))
    elif mode == "large":
        emit(median3(lambda: stream(n, True)))
    else:
        sys.exit(f"unknown mode {mode}")
