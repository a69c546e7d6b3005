"""Launches per fused block, counted on a CPU: Triton launches and the torch kernels beside them.

    python -m benchmarks.launches              # prints the counts, writes nothing

Per basic block inside a converted nn.Sequential of kuangliu blocks (`fp.convert`), an
identity block and a projection block (preact shortcut), in training, in float32 and under
autocast (float16 here: the interpreter declines bfloat16; the float32 input keeps eager's
float32 residual stream): the counts of a chain of 2 identity blocks and the block minus
those of the 2, so the first block's standalone statistics pass and the loss are left out;
and an attack's step (fwd-input-grad: the forward and torch.autograd.grad(out, [x]), the
input gradient only, as PGD and AutoAttack ask for it).
Triton launches are stubbed (counted,
not run: this is about how many, not what they compute); torch kernels are the aten ops
the profiler records outside our launches' allocations: every op but allocations, views
and no-op conversions, counted once where one calls another (to -> _to_copy -> copy_).
Targets (issue "Speed, part 1"), identity block: <= 2 Triton launches forward, <= 8
forward+backward, no torch kernel beside them. The model is converted to channels_last, as
for eager AMP training (and README advises): with PyTorch's default weight layout the
triton backend copies each 3x3 conv weight before its forward and its dgrad kernel
(`kernel_weight`: one small copy each, cheaper on a GPU than the kernels' scattered loads).
"""
from __future__ import annotations

import os
from collections import Counter

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
os.environ.setdefault("FUSED_PREACT_TRITON_AUTOTUNE", "0")
import torch  # noqa: E402
from torch import nn  # noqa: E402

import fused_preact as fp  # noqa: E402
from fused_preact import testing  # noqa: E402

from .host_cost import stub_launches  # noqa: E402

# Allocations, views and conversions that copy nothing (a copy shows as their child op).
FREE = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
        "aten::view", "aten::_unsafe_view", "aten::as_strided", "aten::detach", "aten::alias", "aten::t",
        "aten::permute", "aten::view_as", "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice",
        "aten::reshape", "aten::to", "aten::contiguous", "aten::lift_fresh", "aten::resolve_conj",
        "aten::resolve_neg", "aten::unbind", "aten::split", "aten::transpose", "aten::flatten",
        "aten::_reshape_alias", "aten::result_type", "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense"}


def torch_kernels(events) -> Counter:
    """aten ops that do work, each counted once (not again inside another counted one)."""
    counted = Counter()
    for event in events:
        if not event.name.startswith("aten::") or event.name in FREE:
            continue
        parent, nested = event.cpu_parent, False
        while parent is not None:
            nested = nested or (parent.name.startswith("aten::") and parent.name not in FREE)
            parent = parent.cpu_parent
        if not nested:
            counted[event.name] += 1
    return counted


def count(blocks: int, backward: str, amp: bool, launches: Counter, projection: bool = False) -> tuple[Counter, Counter]:
    """(Triton launches, torch kernels) of one training step of `blocks` chained identity
    blocks, followed by a projection block (16 -> 32 channels, stride 2) if `projection`: a
    step as in training, the blocks' plans recorded and replayed before it. backward: "" (a
    forward only), "all" (out.backward) or "input" (torch.autograd.grad(out, [x]): an
    attack's step, the input gradient only)."""
    torch.manual_seed(0)
    layers = [testing.PreActBlock(16, 16) for _ in range(blocks)] + ([testing.PreActBlock(16, 32, 2)] if projection else [])
    model = fp.convert(nn.Sequential(*layers), backend="triton").to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    for _ in range(2):  # warm-up: the plans recorded, and then replayed once (bound, replay.py)
        with torch.autocast("cpu", dtype=torch.float16, enabled=amp):
            out = model(x)
        grad = torch.ones_like(out)
        run_backward(out, grad, x, backward)
    model.zero_grad(set_to_none=True)  # as a training step starts: no gradient to accumulate into
    x.grad = None
    launches.clear()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.autocast("cpu", dtype=torch.float16, enabled=amp):
            out = model(x)
        run_backward(out, grad, x, backward)
    return Counter(launches), torch_kernels(prof.events())


def run_backward(out, grad, x, backward: str) -> None:
    if backward == "all":
        out.backward(grad)
    elif backward == "input":
        torch.autograd.grad(out, [x], grad)


MODES = {"fwd": ("", False), "fwdbwd": ("all", False), "fwd-amp": ("", True), "fwdbwd-amp": ("all", True),
         "fwd-input-grad": ("input", False)}


def per_block(block: str = "identity") -> dict[str, dict[str, Counter]]:
    """{mode: {"triton": launches, "torch": kernels}} of one block in a chain, per MODES:
    an identity block (a third after two), or a projection block (after two identity blocks)."""
    launches: Counter = Counter()
    stub_launches(launches)
    result = {}
    for mode, (backward, amp) in MODES.items():
        two = count(2, backward, amp, launches)
        more = count(2, backward, amp, launches, projection=True) if block == "projection" else count(3, backward, amp, launches)
        result[mode] = {"triton": more[0] - two[0], "torch": more[1] - two[1]}
    return result


def main() -> None:
    for block in ("identity", "projection"):
        for mode, counts in per_block(block).items():
            for kind, counter in counts.items():
                print(f"{block:10s} {mode:14s} {kind:7s} {sum(counter.values()):3d}  {dict(sorted(counter.items()))}")


if __name__ == "__main__":
    main()
