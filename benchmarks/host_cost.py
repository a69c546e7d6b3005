"""Host time of a fused block on the triton path, measurable without a GPU.

    python -m benchmarks.host_cost --out host_out      # writes host_out/host_cost.json

On a GPU the small blocks are host-bound: the wall time per step is the Python, dispatch
and launch work, not the kernels (see the tiny-overhead case). Here every Triton launch
is replaced by a no-op, so what is timed is everything our code does around the kernels
(op entry, backend choice, allocation, the autograd glue), on the CPU under the Triton
interpreter. What it leaves out is Triton's own launcher and the CUDA cost of each torch
call, so it is a floor of the GPU host time, for comparing commits. The outputs are
garbage (no kernel writes them): this times, it checks nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
os.environ.setdefault("FUSED_PREACT_TRITON_AUTOTUNE", "0")
import torch  # noqa: E402

import fused_preact as fp  # noqa: E402

from .run import metadata  # noqa: E402

# (module, kernel) of every Triton launch of the triton backend.
KERNELS = [("conv_fwd", "bn_relu_conv_fwd_kernel"), ("conv_dgrad", "bn_relu_conv_dgrad_kernel"),
           ("conv_wgrad", "bn_relu_conv_wgrad_kernel"), ("stats", "batch_stats_kernel"),
           ("stats", "bn_finalize_kernel"), ("bn_backward", "bn_backward_apply_kernel")]


class NoLaunch:
    """Stands for kernel[grid](...): launches nothing, and counts the launch in `launches`
    (a Counter by kernel name) if given."""

    def __init__(self, name: str, launches=None):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        if self.launches is not None:
            self.launches[self.name] += 1
        return lambda *args, **kwargs: None


def stub_launches(launches=None) -> None:
    """Replace every Triton kernel of the triton backend, for good (run in its own process)."""
    import importlib
    fp.dispatch.get_backend("triton")  # loads the kernel modules
    for module_name, kernel in KERNELS:
        module = importlib.import_module(f"fused_preact.backends.triton.{module_name}")
        assert hasattr(module, kernel), f"{module_name}.{kernel} is gone: update KERNELS"
        setattr(module, kernel, NoLaunch(kernel, launches))


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args(argv)
    stub_launches()
    torch.set_num_threads(1)  # host work is one thread; a second only adds jitter here
    torch.manual_seed(0)
    results = {}
    for kind, block_cls in (("basic", fp.PreActBlock), ("bottleneck", fp.PreActBottleneck)):
        # The tiny-overhead shape of benchmarks/cases.py (16 channels, 2x16x8x8).
        block = block_cls(16, 16 if kind == "basic" else 4, 1, backend="triton")
        block = block.to(memory_format=torch.channels_last)
        x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_(True)

        def fwdbwd():
            out = block(x)
            out.backward(torch.ones_like(out))

        def fwd():
            block(x)
        results[kind] = {"fwd": time_us(fwd, args.repeats, args.calls),
                         "fwdbwd": time_us(fwdbwd, args.repeats, args.calls)}
        print(kind, {mode: f"{r['min_us']:.0f} us (median {r['median_us']:.0f})" for mode, r in results[kind].items()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = metadata("cpu")
    (out / "host_cost.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {out / 'host_cost.json'}")


if __name__ == "__main__":
    main()
