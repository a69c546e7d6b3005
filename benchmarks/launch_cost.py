"""Host time of a fused block with Triton's own launch path in it, measurable without a GPU.

    python -m benchmarks.launch_cost --out launch_out     # writes launch_out/launch_cost.json

benchmarks.host_cost replaces every Triton launch by a no-op, so it leaves out what
Triton does per launch. Here the kernels are compiled for sm_90 (the stand-in driver of
benchmarks/stand_in_driver.py) and each launch goes through Triton's host path up to its
launcher, which launches nothing: kernel[grid](...) (JITFunction.run, binding and
specialising every argument on every call) or the direct launch of the CompiledKernel kept
for the arguments' signature (fused_preact/backends/triton/launch.py), timed in the same
run, interleaved. Still left out: Triton's C launcher and the CUDA driver. The outputs are
garbage (nothing runs): this times, it checks nothing. Results belong to the installed
Triton (the GPU machines run 3.6; the output names the version).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("benchmarks.launch_cost compiles for a GPU: run it without TRITON_INTERPRET")
os.environ.setdefault("FUSED_PREACT_TRITON_AUTOTUNE", "0")  # the benchmark's one launch config

import torch  # noqa: E402

from . import stand_in_driver  # noqa: E402
from .host_timing import time_us, tiny_blocks  # noqa: E402
from .run import metadata  # noqa: E402

PATHS = {"kernel[grid]": False, "direct": True}  # launch.DIRECT


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args(argv)
    launches: list = []
    stand_in = stand_in_driver.install(90, launches)
    import triton

    import fused_preact as fp
    from fused_preact.backends.triton import backend as triton_backend
    from fused_preact.backends.triton import launch
    # CPU tensors stand for CUDA ones: the backend takes them as it does in the interpreter,
    # without the interpreter's probe (a kernel launched on the stand-in, which runs nothing).
    fp.dispatch.get_backend("triton").interpreted = True
    triton_backend.interpreter_reason = lambda: None
    torch.set_num_threads(1)  # host work is one thread; a second only adds jitter here
    torch.manual_seed(0)
    results = {}
    for kind, _, _, fwdbwd in tiny_blocks():  # the blocks host_cost times
        launches.clear()
        fwdbwd()  # compiles every kernel of the step
        counted = len(launches)
        stand_in.launches = None  # from here on nothing is recorded (the lists would only grow)
        rows = {path: [] for path in PATHS}
        for _ in range(2):  # interleaved, so both paths see the same machine
            for path, direct in PATHS.items():
                launch.DIRECT = direct
                rows[path].append(time_us(fwdbwd, args.repeats, args.calls))
        results[kind] = {"launches_per_step": counted,
                         **{path: min(rows[path], key=lambda r: r["min_us"]) for path in PATHS}}
        stand_in.launches = launches
        print(kind, f"{counted} launches per fwd+bwd;",
              {path: f"{results[kind][path]['min_us']:.0f} us (median {results[kind][path]['median_us']:.0f})"
               for path in PATHS})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = {"meta": {**metadata("cpu"), "triton": triton.__version__, "target": "sm_90 (stand-in driver)"},
               "results": results}
    (out / "launch_cost.json").write_text(json.dumps(written, indent=2))
    print(f"triton {triton.__version__}; wrote {out / 'launch_cost.json'}")


if __name__ == "__main__":
    main()
