"""Where a block's time goes: GPU time per kernel of one forward+backward, per provider.

    python -m benchmarks.profile --case r18-s1-id --dtype bf16

Same cases and providers as benchmarks.run; prints, per provider, each kernel's GPU time
per iteration (torch.profiler, after a warm-up), the kernel count, and the wall time of
the iteration, whose excess over the summed kernel time is launch and Python overhead
(--host: where that host time goes, by Python function).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats

import torch

from . import cases as C
from .providers import build_block, eager_block, providers
from .run import DTYPES, kernel_times

ITERATIONS = 5


def profile_provider(prov, case, state, dtype, host_profile=False) -> tuple[dict, float]:
    module = build_block(prov, case, state, "cuda")
    x = torch.randn(case.batch, case.in_planes, case.hw, case.hw, device="cuda")
    x = prov.block_input(x, dtype).requires_grad_(True)
    autocast = prov.autocast_context("cuda", dtype)

    def step():
        with autocast:
            out = module(x)
        out.backward(torch.ones_like(out))
    for _ in range(3):
        step()  # compilation, autotuning
    per_kernel, wall_ms = kernel_times(step, ITERATIONS)
    if host_profile:
        profiler = cProfile.Profile()
        profiler.runcall(lambda: [step() for _ in range(ITERATIONS)])
        torch.cuda.synchronize()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return per_kernel, wall_ms


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default=C.GPU_BLOCKS[0].name, help="a block case name from benchmarks/cases.py")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--providers", default="eager-cl-amp,fused-triton")
    parser.add_argument("--host", action="store_true", help="also the Python functions costing host time (cProfile)")
    args = parser.parse_args(argv)
    case = next(c for c in C.GPU_BLOCKS if c.name == args.case)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    state = eager_block(case).state_dict()
    wanted = args.providers.split(",")
    for prov in (p for p in providers("cuda", False) if p.name in wanted):
        per_kernel, wall_ms = profile_provider(prov, case, state, dtype, args.host)
        total = sum(t for t, _ in per_kernel.values())
        launches = sum(n for _, n in per_kernel.values()) / ITERATIONS
        print(f"\n{case} {args.dtype} {prov.name}: fwd+bwd wall {wall_ms:.3f} ms, "
              f"GPU {total:.3f} ms in {launches:.0f} launches")
        for name, (ms, count) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0]):
            print(f"  {ms:8.3f} ms  x{count // ITERATIONS:<3d} {name[:110]}")


if __name__ == "__main__":
    main()
