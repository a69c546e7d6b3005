"""What a GPU will run, read on any machine: every Triton kernel of the triton backend compiled
for sm_90 (or sm_80) at a benchmark case's block shapes, with per kernel its registers,
spills, shared memory, tensor-core instructions, instructions per main-loop iteration (and
how many of them are global loads narrower than 16 bytes) and ptxas's advisories
(C7514/C7515: wgmma serialised). The JSON also has the global loads and stores of the main
loop and of the whole kernel by width.

    python -m benchmarks.sass                       # the headline case, bf16, sm_90
    python -m benchmarks.sass --dtype amp-bf16      # under autocast: bf16 activations, float32 weights
    python -m benchmarks.sass --case in-r50-14 --arch 80 --json out.json

No GPU is needed: a stand-in driver reports the target, the launchers run on CPU tensors
with each kernel replaced by a recorder, and every recorded launch is compiled by the
kernel's own `warmup` (Triton's JIT specialisation, no launch), with the launch config the
benchmark uses (FUSED_PREACT_TRITON_AUTOTUNE=0: one config). SASS comes from cuobjdump in
the Triton wheel. Results belong to the installed Triton: the GPU machines run 3.6, this
tool may run another (its output names the version).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("benchmarks.sass compiles for a GPU: run it without TRITON_INTERPRET")
os.environ["FUSED_PREACT_TRITON_AUTOTUNE"] = "0"  # the benchmark's one launch config

import torch  # noqa: E402
import triton  # noqa: E402

from . import cases as C  # noqa: E402
from . import stand_in_driver  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
# name -> (dtype of the activations between blocks, of the weights, of the convs). amp-bf16:
# autocast in a network (the stem conv's output is bf16, so is the identity stream) with
# float32 master weights, cast tile by tile in the kernels; amp-bf16-fp32-stream: blocks fed
# float32 under autocast, whose identity stream stays float32 (eager's promotion).
DTYPES = {"bf16": (torch.bfloat16,) * 3, "fp16": (torch.float16,) * 3, "fp32": (torch.float32,) * 3,
          "amp-bf16": (torch.bfloat16, torch.float32, torch.bfloat16),
          "amp-bf16-fp32-stream": (torch.float32, torch.float32, torch.bfloat16)}
KERNELS = [("conv_fwd", "bn_relu_conv_fwd_kernel"), ("conv_dgrad", "bn_relu_conv_dgrad_kernel"),
           ("conv_wgrad", "bn_relu_conv_wgrad_kernel"), ("stats", "batch_stats_kernel"),
           ("stats", "bn_finalize_kernel"), ("bn_backward", "bn_backward_apply_kernel")]
CONV_KERNELS = {"bn_relu_conv_fwd_kernel", "bn_relu_conv_dgrad_kernel", "bn_relu_conv_wgrad_kernel"}


class Recorder:
    """Stands for kernel[grid](...): records the launch instead of making it."""

    def __init__(self, name: str, launches: list):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.name, grid, args, kwargs))


def record_launches(case: C.BlockCase, precision: tuple[torch.dtype, torch.dtype, torch.dtype]) -> list:
    """Every Triton launch of one training step of the block's units (by unit), unique by
    kernel, constexprs and tensor dtypes. With a float32 stream each conv is recorded both as
    a first unit (float32 x in, conv-dtype y out) and as a last one (adding the stream). In a
    projection block the projection's dgrad runs without the BN and the first conv's adds its
    result (block_autograd: one BN backward for both): both variants are recorded too."""
    dtype, w_dtype, conv_dtype = precision
    shortcut_variants = (False, True) if dtype != conv_dtype else (False,)
    import importlib
    modules = {m: importlib.import_module(f"fused_preact.backends.triton.{m}") for m, _ in KERNELS}
    originals = {name: getattr(modules[m], name) for m, name in KERNELS}
    launches: list = []
    for m, name in KERNELS:
        setattr(modules[m], name, Recorder(name, launches))
    projection = case.projection()
    try:
        for conv, adds_stream in ((conv, adds) for conv in case.convs() for adds in shortcut_variants):
            c_in, c_out, k, stride, pad, hw = conv
            x_dtype = conv_dtype if adds_stream else dtype
            x = torch.empty(case.batch, c_in, hw, hw, dtype=x_dtype).contiguous(memory_format=torch.channels_last)
            w = torch.empty(c_out, c_in, k, k, dtype=w_dtype)
            v = torch.ones(c_in)
            running = (torch.zeros(c_out), torch.ones(c_out), None, 0.1)  # the next BatchNorm's, updated
            p = (hw + 2 * pad - k) // stride + 1
            residual = (torch.empty(case.batch, c_out, p, p, dtype=dtype).contiguous(memory_format=torch.channels_last)
                        if adds_stream else None)
            y, *_ = modules["conv_fwd"].bn_relu_conv(x, v, v, v, v, w, residual, [stride] * 2, [pad] * 2, 1e-5, True,
                                                     *running, conv_dtype)
            dy = torch.empty_like(y)
            modules["conv_dgrad"].bn_relu_conv_dgrad(dy, w, x, v, v, v, v, [stride] * 2, [pad] * 2, 1e-5, conv_dtype)
            if projection and conv == case.convs()[0]:  # adding the projection's gradient of relu(bn1(x))
                modules["conv_dgrad"].bn_relu_conv_dgrad(dy, w, x, v, v, v, v, [stride] * 2, [pad] * 2, 1e-5,
                                                         conv_dtype, g_other=x)
            if conv == projection:  # without the BN (its backward runs in the first conv's)
                modules["conv_dgrad"].bn_relu_conv_dgrad(dy, w, x, None, None, None, None, [stride] * 2, [pad] * 2,
                                                         1e-5, conv_dtype)
            modules["conv_wgrad"].bn_relu_conv_wgrad(dy, x, v, v, v, v, list(w.shape), [stride] * 2, [pad] * 2, 1e-5,
                                                     w_dtype, conv_dtype)
            modules["stats"].batch_stats(x, v.clone(), v.clone(), None, 0.1)
            modules["stats"].bn_finalize(torch.ones(4, 3, c_in), v.clone(), v.clone(), None, 0.1)  # sync BN
            for dx_other in (None, x):  # with: the first unit of an identity block
                modules["bn_backward"].bn_backward_apply(x, x, v, v, v, torch.zeros(2, c_in), 10, 1e-5, True,
                                                         dx_other)
    finally:
        for m, name in KERNELS:
            setattr(modules[m], name, originals[name])
    unique, seen = [], set()
    for name, grid, args, kwargs in launches:
        key = (name, tuple(sorted((k, str(v)) for k, v in kwargs.items())),
               tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args))
        if key not in seen:
            seen.add(key)
            unique.append((name, grid, args, kwargs, originals[name]))
    return unique


def compile_launch(kernel, grid, args, kwargs, warps=None):
    """The CompiledKernel Triton's JIT makes for this launch (its warmup: compile, no launch)
    with the options the benchmark's one config gives it (FUSED_PREACT_TRITON_AUTOTUNE=0:
    KernelLauncher.options_for), or with `warps` warps (the autotuner, on by default, tries 4
    and 8)."""
    options = dict(kernel.options_for(kwargs.get("BM", 0), kwargs.get("BN", 0)),
                   **({"num_warps": warps} if warps else {}))
    return kernel.jit.warmup(*args, grid=grid, **kwargs, **options)


def ptxas_report(ptx: str, arch: int) -> tuple[str, str]:
    """(ptxas -v output, which ptxas): the one Triton's NVIDIA backend uses for `arch`, so its
    advisories are those of the compile whose SASS is read."""
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        run = subprocess.run([ptxas, f"-arch=sm_{arch}{'a' if arch == 90 else ''}", "-v", str(src),
                              "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    return run.stdout + run.stderr, Path(ptxas).name


def instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction) of every instruction in cuobjdump's listing, in order."""
    return [(int(address, 16), text) for address, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]


def main_loop(sass: str) -> list[str]:
    """The instructions of the loop holding the most tensor-core instructions (a branch back
    to a lower address closes a loop): the main loop, one iteration. Empty where none holds any."""
    code = instructions(sass)
    best, best_mma = [], 0
    for address, text in code:
        back = re.search(r"\bBRA\S*\s+(?:`\()?0x([0-9a-f]+)", text)
        if back and int(back.group(1), 16) < address:
            body = [t for a, t in code if int(back.group(1), 16) <= a <= address]
            mma = sum("MMA" in t for t in body)
            if mma > best_mma:
                best, best_mma = body, mma
    return best


ACCESS_BYTES = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}  # by opcode suffix; none: 4
ACCESS_KINDS = {"LDG": "load", "LDGSTS": "load", "STG": "store"}  # global memory (LDGSTS: cp.async)


def global_access(instruction: str) -> tuple[str, int] | None:
    """("load" or "store", bytes per thread) of a SASS global-memory access; None for another
    instruction. A tile moved in pieces narrower than 16 bytes takes several accesses per
    vector, and a 16-bit one (one element each) a shared-memory store each too."""
    opcode = instruction.split()[1] if instruction.startswith("@") else instruction.split()[0]
    parts = opcode.split(".")
    if parts[0] not in ACCESS_KINDS:
        return None
    return ACCESS_KINDS[parts[0]], next((ACCESS_BYTES[p] for p in parts if p in ACCESS_BYTES), 4)


def accesses_by_bytes(instructions: list[str], kind: str) -> dict[int, int]:
    """{bytes per thread: count} of the global `kind` accesses ("load", "store") among these."""
    found = collections.Counter(a[1] for a in map(global_access, instructions) if a and a[0] == kind)
    return dict(sorted(found.items()))


def analyse(arch: int, case: C.BlockCase, precision: tuple[torch.dtype, torch.dtype, torch.dtype],
            warps: int | None = None) -> list[dict]:
    stand_in_driver.install(arch)
    rows = []
    for name, grid, args, kwargs, kernel in record_launches(case, precision):
        compiled = compile_launch(kernel, grid, args, kwargs, warps)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
            usage = subprocess.run([str(BIN / "cuobjdump"), "--dump-resource-usage", f.name],
                                   capture_output=True, text=True).stdout
        log, ptxas = ptxas_report(compiled.asm["ptx"], arch)
        loop = main_loop(sass)
        code = [text for _, text in instructions(sass)]
        resources = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        rows.append({
            "kernel": name, "conv": name in CONV_KERNELS,
            "tensor_dtypes": "/".join(sorted({str(a.dtype).replace("torch.", "") for a in args
                                              if isinstance(a, torch.Tensor)})),
            "config": {k: v for k, v in kwargs.items() if k.isupper() and k.startswith(("B", "R", "S", "HAS_"))},
            "num_warps": compiled.metadata.num_warps, "registers": int(resources.get("REG", -1)),
            "stack_bytes": int(resources.get("STACK", 0)),
            "local_bytes": int(resources.get("LOCAL", 0)),
            "spill_bytes": sum(map(int, spills.groups())) if spills else 0,
            "shared_bytes": compiled.metadata.shared,
            "hgmma": len(re.findall(r"\bHGMMA\.", sass)), "hmma": len(re.findall(r"\bHMMA\.", sass)),
            "main_loop_instructions": len(loop) or None,
            "main_loop_load_bytes": accesses_by_bytes(loop, "load"),  # bytes -> global loads
            # the whole kernel's (epilogues, merges), each instruction once
            "load_bytes": accesses_by_bytes(code, "load"), "store_bytes": accesses_by_bytes(code, "store"),
            "main_loop_mufu": sum("MUFU" in t for t in loop), "main_loop_sel": sum(re.search(r"\bSEL\b", t) is not None
                                                                                 for t in loop),
            "advisories": sorted(set(re.findall(r"\((C75\d\d)\)[^\n]*", log))),
            "advisory_text": sorted(set(re.findall(r"\(C75\d\d\)[^\n]*", log))), "ptxas": ptxas,
        })
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default=C.GPU_BLOCKS[0].name, help="a block case of benchmarks/cases.py")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--arch", type=int, default=90, choices=[80, 90])
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--warps", type=int, default=None, choices=[4, 8],
                        help="compile with this many warps (default: the benchmark's one config)")
    args = parser.parse_args(argv)
    case = next(c for c in C.GPU_BLOCKS if c.name == args.case)
    rows = analyse(args.arch, case, DTYPES[args.dtype], args.warps)
    print(f"triton {triton.__version__}, sm_{args.arch}, {case.name} ({case.kind} {case.in_planes}->{case.planes}, "
          f"stride {case.stride}, N={case.batch}, {case.hw}x{case.hw}), {args.dtype}, "
          f"{f'{args.warps} warps' if args.warps else 'the benchmark config'}")
    print(f"{'kernel':28s} {'warps':>5s} {'regs':>4s} {'spill B':>7s} {'smem B':>7s} {'HGMMA':>5s} {'HMMA':>4s} "
          f"{'loop ins':>8s} {'narrow':>6s} {'MUFU':>4s} {'SEL':>4s}  advisories")
    for r in rows:
        print(f"{r['kernel']:28s} {r['num_warps']:5d} {r['registers']:4d} {r['spill_bytes']:7d} {r['shared_bytes']:7d} "
              f"{r['hgmma']:5d} {r['hmma']:4d} {str(r['main_loop_instructions'] or '-'):>8s} "
              f"{sum(n for b, n in r['main_loop_load_bytes'].items() if b < 16):6d} {r['main_loop_mufu']:4d} "
              f"{r['main_loop_sel']:4d}  {' '.join(r['advisories']) or '-'}  {r['config']} {r['tensor_dtypes']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "arch": args.arch, "case": case.name,
                                               "dtype": args.dtype, "warps": args.warps, "kernels": rows}, indent=2))


if __name__ == "__main__":
    main()
