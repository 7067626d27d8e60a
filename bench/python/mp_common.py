# Shared by the benchmark scripts (mp_*.py) of `multiproc bench`: a warm-up run, then the median of three
# (a short run after an idle gap is up to 2x slower on these VMs), and the one JSON line the
# Rust side reads.
import json, statistics, sys


def median3(fn):
    """One discarded warm-up run of fn(), then the median of three."""
    fn()
    return statistics.median([fn() for _ in range(3)])


def emit(value):
    print(json.dumps({"value": value}))
    sys.stdout.flush()
