"""Host time of a fused block on the triton path, measurable without a GPU.

    python -m benchmarks.host_cost --out host_out      # writes host_out/host_cost.json
    python -m benchmarks.host_cost --out host_out --breakdown   # also the layers of one unit

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
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
os.environ.setdefault("FUSED_PREACT_TRITON_AUTOTUNE", "0")
import torch  # noqa: E402

import fused_preact as fp  # noqa: E402
from fused_preact import ops  # noqa: E402

from .host_timing import time_us, tiny_blocks  # noqa: E402
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


class Bare(torch.autograd.Function):
    """An autograd node with a forward unit's arguments that computes nothing: PyTorch's
    own cost of one custom-Function call and of one backward node."""

    @staticmethod
    def forward(ctx, x, *rest):
        y = torch.empty_like(x)
        stats = (x.new_empty(0), x.new_empty(0))
        ctx.mark_non_differentiable(*stats)
        return (y, *stats)

    @staticmethod
    def backward(ctx, dy, *_):
        return (dy,) + (None,) * (ops.UNIT_ARGS - 1)


def breakdown(repeats: int, calls: int) -> dict:
    """Per-call microseconds of the layers of one forward unit (first unit of the basic
    block, launches stubbed), inside out: what each layer adds is its time minus the one
    below. And PyTorch's floor: bare custom-Function calls and their backward."""
    from fused_preact import dispatch, functional
    block = fp.PreActBlock(16, 16, 1, backend="triton").to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    stats = functional.bn_stats(block.bn1, x.detach(), None, "triton")
    consumer = functional.Consumer(block.bn2, False)
    running = functional.running_update(block.bn2, False)
    args = (x, stats.mean, stats.var, block.bn1.weight, block.bn1.bias, block.conv1.weight, None, [1, 1], [1, 1],
            block.bn1.eps, True, True, *running, "triton", 0, torch.float32)
    triton = dispatch.get_backend("triton")
    impl_args = dict(zip(("x", "mean", "var", "bn_weight", "bn_bias", "weight", "residual", "stride", "padding",
                          "eps"), args[:10]), want_stats=True, running_mean=running[0], running_var=running[1],
                     num_batches_tracked=running[2], momentum=running[3], conv_dtype=torch.float32)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]

    def bare_fwdbwd():
        y = Bare.apply(Bare.apply(*args)[0], *args[1:])[0]
        y.backward(torch.ones_like(y))
    layers = {
        "backend impl (launch arguments, allocation)": lambda: triton.impls["bn_relu_conv"](**impl_args),
        "dispatch.select": lambda: dispatch.select("bn_relu_conv", tensors, "triton", torch.float32),
        "ops.check_unit_args": lambda: ops.check_unit_args(*args[:9], torch.float32),
        "op body (checks, select, impl)": lambda: ops.bn_relu_conv.body(*args),
        "op entry, autograd node (body, Function.apply, setup_context)": lambda: ops.bn_relu_conv(*args),
        "functional.unit (module glue, op entry)": lambda: functional.unit(x, stats, block.bn1, block.conv1, None,
                                                                            consumer, "triton"),
        "block forward (2 units, statistics pass, nn glue)": lambda: block(x),
        "floor: bare Function.apply, unit's arguments": lambda: Bare.apply(*args),
        "floor: 2 bare Function.apply + backward": bare_fwdbwd,
    }
    return {name: time_us(fn, repeats, calls) for name, fn in layers.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--breakdown", action="store_true", help="also time the layers of one forward unit")
    args = parser.parse_args(argv)
    stub_launches()
    torch.set_num_threads(1)  # host work is one thread; a second only adds jitter here
    torch.manual_seed(0)
    results = {}
    for kind, block, x, fwdbwd in tiny_blocks():
        def fwd():
            block(x)
        results[kind] = {"fwd": time_us(fwd, args.repeats, args.calls),
                         "fwdbwd": time_us(fwdbwd, args.repeats, args.calls)}
        print(kind, {mode: f"{r['min_us']:.0f} us (median {r['median_us']:.0f})" for mode, r in results[kind].items()})
    written = {"meta": metadata("cpu"), "results": results}
    if args.breakdown:
        written["unit_layers"] = breakdown(args.repeats, args.calls * 4)
        for name, r in written["unit_layers"].items():
            print(f"{r['min_us']:7.1f} us  {name}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_cost.json").write_text(json.dumps(written, indent=2))
    print(f"wrote {out / 'host_cost.json'}")


if __name__ == "__main__":
    main()
