"""Host time of a call, per call, for the tools that time host work (benchmarks.host_cost,
benchmarks.launch_cost)."""
from __future__ import annotations

import statistics
import time


def time_us(fn, repeats: int, calls: int) -> dict:
    """Per-call microseconds over `repeats` timings of `calls` calls: min and median (the
    min is the least disturbed by other work on a shared machine)."""
    for _ in range(calls):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return {"min_us": min(samples), "median_us": statistics.median(samples)}
