"""Host time of a fused block on the triton path, measurable without a GPU.

    python -m benchmarks.host_cost --out host_out      # writes host_out/host_cost.json
    python -m benchmarks.host_cost --out host_out --breakdown   # also the layers of a block

On a GPU the small blocks are host-bound: the wall time per step is the Python, dispatch
and launch work, not the kernels (see the tiny-overhead case). Here every Triton launch
is replaced by a no-op, so what is timed is everything our code does around the kernels
(op entry, backend choice, allocation, the autograd glue), on the CPU under the Triton
interpreter. What it leaves out is Triton's own launcher and the CUDA cost of each torch
call, so it is a floor of the GPU host time, for comparing commits. Modes: a training
forward (x requires grad), forward+backward, and an eval-mode forward under torch.no_grad.
The outputs are garbage (no kernel writes them): this times, it checks nothing.
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

from .host_timing import time_us, tiny_blocks  # noqa: E402
from .run import metadata  # noqa: E402

# (module, kernel) of every Triton launch of the triton backend.
KERNELS = [("conv_fwd", "bn_relu_conv_fwd_kernel"), ("conv_dgrad", "bn_relu_conv_dgrad_kernel"),
           ("conv_wgrad", "bn_relu_conv_wgrad_kernel"), ("stats", "batch_stats_kernel"),
           ("stats", "bn_finalize_kernel"), ("bn_backward", "bn_backward_apply_kernel")]


class NoLaunch:
    """Stands for the kernel inside a KernelLauncher (its kernel[grid](...)): launches
    nothing, and counts the launch in `launches` (a Counter by kernel name) if given."""

    def __init__(self, name: str, launches=None):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        if self.launches is not None:
            self.launches[self.name] += 1
        return lambda *args, **kwargs: None


def stub_launches(launches=None) -> None:
    """Replace every Triton kernel of the triton backend inside its KernelLauncher, for good
    (run in its own process): the launcher's own work, and the replay of bound calls that
    launch through it (replay.py), stay timed. In the interpreter nothing is compiled, so
    every launch reaches the stub."""
    import importlib
    fp.dispatch.get_backend("triton")  # loads the kernel modules
    for module_name, kernel in KERNELS:
        module = importlib.import_module(f"fused_preact.backends.triton.{module_name}")
        assert hasattr(module, kernel), f"{module_name}.{kernel} is gone: update KERNELS"
        getattr(module, kernel).kernel = NoLaunch(kernel, launches)


class Bare(torch.autograd.Function):
    """An autograd node with a block's inputs that computes nothing: PyTorch's own cost of
    one custom-Function call and of its backward node (a gradient for each input)."""

    @staticmethod
    def forward(ctx, x, *params):
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        return (dy,) + (None,) * len(ctx.needs_input_grad[1:])


def breakdown(repeats: int, calls: int) -> dict:
    """Per-call microseconds of the layers of a basic block's training forward (launches
    stubbed), inside out: what each layer adds is its time minus the ones below. And
    PyTorch's floor: a bare custom-Function call with the block's inputs, and its backward."""
    from fused_preact import block_autograd, dispatch, functional
    block = fp.PreActBlock(16, 16, 1, backend="triton").to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    stats = functional.bn_stats(block.bn1, x.detach(), None, "triton")
    running = functional.running_update(block.bn2, False)
    triton = dispatch.get_backend("triton")
    unit_args = dict(x=x, mean=stats.mean, var=stats.var, bn_weight=block.bn1.weight, bn_bias=block.bn1.bias,
                     weight=block.conv1.weight, residual=None, stride=[1, 1], padding=[1, 1], eps=block.bn1.eps,
                     want_stats=True, running_mean=running[0], running_var=running[1],
                     num_batches_tracked=running[2], momentum=running[3], conv_dtype=torch.float32)
    units = block.units()
    convs = [conv for _, conv in units]
    bns = [bn for bn, _ in units]
    tensors = [conv.weight for conv in convs] + [getattr(bn, name) for bn in bns for name in fp.nn.BN_TENSORS]
    params = list(block.parameters())
    block(x)  # records the plan the next calls replay
    assert block_autograd.PLANS.get(block.plan_key(x, None, None, False, bns, convs, tensors)) is not None

    def bare_fwdbwd():
        Bare.apply(x, *params).backward(torch.ones_like(x))
    _, bound_unit = triton.bind(triton.impls["bn_relu_conv"], unit_args)  # what a plan replays (replay.py)
    layers = {
        "backend impl of one forward unit (launch arguments, allocation)":
            lambda: triton.impls["bn_relu_conv"](**unit_args),
        "the same unit bound, as a plan replays it (allocation, launch arguments refilled)":
            lambda: bound_unit(**unit_args),
        "plan key (module settings, tensor signatures, backend state)":
            lambda: block_autograd.PLANS.get(block.plan_key(x, None, None, False, bns, convs, tensors)),
        "block forward, plan replayed (3 launches, 1 autograd node)": lambda: block(x),
        "floor: bare Function.apply with the block's inputs": lambda: Bare.apply(x, *params),
        "floor: bare Function.apply + backward (7 gradients)": bare_fwdbwd,
    }
    return {name: time_us(fn, repeats, calls) for name, fn in layers.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--breakdown", action="store_true", help="also time the layers of a block's forward")
    args = parser.parse_args(argv)
    stub_launches()
    torch.set_num_threads(1)  # host work is one thread; a second only adds jitter here
    torch.manual_seed(0)
    results = {}
    for kind, block, x, fwdbwd in tiny_blocks():
        def fwd():
            block(x)

        def inference():  # eval mode under torch.no_grad, as a validation pass runs
            with torch.no_grad():
                block(x)
        results[kind] = {"fwd": time_us(fwd, args.repeats, args.calls),
                         "fwdbwd": time_us(fwdbwd, args.repeats, args.calls)}
        block.eval()
        results[kind]["fwd-eval-nograd"] = time_us(inference, args.repeats, args.calls)
        print(kind, {mode: f"{r['min_us']:.0f} us (median {r['median_us']:.0f})" for mode, r in results[kind].items()})
    written = {"meta": metadata("cpu"), "results": results}
    if args.breakdown:
        written["block_layers"] = breakdown(args.repeats, args.calls * 4)
        for name, r in written["block_layers"].items():
            print(f"{r['min_us']:7.1f} us  {name}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_cost.json").write_text(json.dumps(written, indent=2))
    print(f"wrote {out / 'host_cost.json'}")


if __name__ == "__main__":
    main()
