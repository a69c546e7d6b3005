"""What the tools that time host work (benchmarks.host_cost, benchmarks.launch_cost) share:
the blocks they time and the timing of a call."""
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


def tiny_blocks():
    """The tiny-overhead case of benchmarks/cases.py (16 channels, 2x16x8x8) as a basic and
    a bottleneck block on the triton backend, and a basic projection block (16 -> 32
    channels, stride 2, the projection reading relu(bn1(x))): (kind, block, x, fwdbwd) for
    each, fwdbwd one forward and backward of the block."""
    import torch

    import fused_preact as fp
    for kind, make in (("basic", lambda: fp.PreActBlock(16, 16, 1, backend="triton")),
                       ("bottleneck", lambda: fp.PreActBottleneck(16, 4, 1, backend="triton")),
                       ("projection", lambda: fp.PreActBlock(16, 32, 2, backend="triton"))):
        block = make().to(memory_format=torch.channels_last)
        x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_(True)

        def fwdbwd(block=block, x=x):
            out = block(x)
            out.backward(torch.ones_like(out))
        yield kind, block, x, fwdbwd
