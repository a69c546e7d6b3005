"""Benchmark suite: speed and memory of the fused blocks against eager PyTorch and torch.compile.

    python -m benchmarks.run --out bench_out            # GPU if present, else a small CPU default
    python -m benchmarks.report bench_out               # markdown table + PNG plots from the data

Every provider's output is first compared with eager fp32 (a wrong provider is reported,
not timed). One CSV row per (case, provider, dtype, mode, metric); the run's metadata
(device, versions, git commit, date) goes in every row and in meta.json.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from fused_preact.backends.base import tf32_convolutions

from . import cases as C
from .providers import Provider, build_block, build_model, eager_block, providers

FIELDS = ["case", "provider", "dtype", "mode", "metric", "value", "unit", "note"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Relative L2 error of a provider's output vs eager fp32 above which it is "wrong".
GUARD = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def source_tree(repo: Path = Path(__file__).resolve().parent.parent) -> tuple[str, bool] | None:
    """git's tree hash of the files as they are on disk (tracked and untracked-not-ignored),
    and whether it is HEAD's tree. The GPU machine gets a copy of the working tree whose .git
    may be older than its files: HEAD alone would name the wrong commit. The hash equals
    `git rev-parse C^{tree}` of the commit C that holds exactly these files."""
    with tempfile.TemporaryDirectory() as scratch:
        env = dict(os.environ, GIT_INDEX_FILE=str(Path(scratch) / "index"))  # leaves the real index alone

        def git(*args):
            return subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True,
                                  check=True).stdout.strip()
        try:
            git("add", "-A")
            tree = git("write-tree")
            return tree, tree == git("rev-parse", "HEAD^{tree}")
        except (OSError, subprocess.CalledProcessError):
            return None


def cpu_name() -> str:
    """The processor's model name and core count (platform.processor() is often empty)."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or 'CPU'}, {os.cpu_count()} cores"


def metadata(device: str) -> dict:
    # A copy of the tree without .git (a device machine) is told its commit by the caller.
    commit = os.environ.get("FUSED_PREACT_GIT_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent).stdout.strip()
        except OSError:
            pass
    tree, clean = source_tree() or (None, None)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
        "device_type": device, "torch": torch.__version__, "triton": triton_version,
        "cuda": torch.version.cuda, "python": platform.python_version(), "git_commit": commit,
        "source_tree": tree, "source_is_commit": clean,
        "triton_autotune": os.environ.get("FUSED_PREACT_TRITON_AUTOTUNE", "1") != "0",
        # tf32 exists on GPUs only; on the CPU float32 convolutions are float32.
        "fp32_convolutions": ("tf32" if tf32_convolutions() else "exact") if device == "cuda" else "exact",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------- timing
# A case whose interquartile range is more than this fraction of its median is flagged as noisy.
NOISY_SPREAD = 0.2


class Timing(float):
    """A median time in ms that also carries its spread: (q3 - q1) / median of the samples."""

    def __new__(cls, median_ms: float, spread: float):
        timing = super().__new__(cls, median_ms)
        timing.spread = spread
        return timing


def timer(device: str):
    """A function timing fn() -> Timing (median ms and relative interquartile spread)."""
    if device == "cuda":
        import triton.testing

        def measure(fn):
            q1, median, q3 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.25, 0.5, 0.75])
            return Timing(median, (q3 - q1) / median)
        return measure

    def measure_cpu(fn, min_repeats=15, min_total_s=0.5):
        # A shared CPU is noisy (a first run once took 69 ms where reruns took 0.95): two
        # warm-up calls, then at least 15 samples and half a second.
        fn()
        fn()
        samples = []
        while len(samples) < min_repeats or (sum(samples) < min_total_s * 1e3 and len(samples) < 1000):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        q1, median, q3 = statistics.quantiles(samples, n=4)
        return Timing(median, (q3 - q1) / median)
    return measure_cpu


def kernel_times(fn, iterations: int) -> tuple[dict[str, list], float]:
    """GPU time of each kernel fn launches, {name: [ms per call of fn, launches]}, and the
    wall ms per call, over `iterations` calls under torch.profiler (after the caller's
    warm-up): the kernels' sum against the wall time is the host's share."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(iterations):
            fn()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3 / iterations
    per_kernel: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            entry = per_kernel.setdefault(e.name, [0.0, 0])
            entry[0] += e.device_time_total / 1e3 / iterations
            entry[1] += 1
    return per_kernel, wall_ms


def gpu_time_ms(fn, iterations: int = 5) -> float:
    """The summed GPU time of fn's kernels per call."""
    return sum(ms for ms, _ in kernel_times(fn, iterations)[0].values())


def cuda_graph_replay(fn):
    """fn captured whole in one CUDA graph, returned as the graph's replay: the same GPU
    work without fn's host work. Warmed up on a side stream first, as torch.cuda.graph asks
    (lazy state such as optimizer buffers and Triton's compiled kernels exists before the
    capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def ceilings(device: str) -> dict:
    """Measured copy bandwidth (bytes read + written per s) and bf16 matmul rate (FLOP/s)."""
    if device != "cuda":
        return {}
    measure = timer(device)
    src = torch.empty(2**28, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src))
    bandwidth = 2 * src.numel() * 4 / (ms * 1e-3)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = measure(lambda: a @ b)
    return {"copy_bytes_per_s": bandwidth, "bf16_flop_per_s": 2 * 8192**3 / (ms * 1e-3)}


# ---------------------------------------------------------------------------- block cases
def conv_flops(case: C.BlockCase) -> float:
    """Forward FLOPs of the block's convolutions (2 per multiply-add)."""
    n, hw, s = case.batch, case.hw, case.stride
    out_hw = hw // s
    if case.kind == "basic":
        convs = [(case.in_planes, case.planes, 9, out_hw), (case.planes, case.planes, 9, out_hw)]
        out_c = case.planes
    else:
        convs = [(case.in_planes, case.planes, 1, hw), (case.planes, case.planes, 9, out_hw),
                 (case.planes, 4 * case.planes, 1, out_hw)]
        out_c = 4 * case.planes
    if s != 1 or case.in_planes != out_c:
        convs.append((case.in_planes, out_c, 1, out_hw))
    return sum(2.0 * n * o * o * cin * cout * k for cin, cout, k, o in convs)


def saved_activation_bytes(module, x) -> int:
    """Bytes of distinct 4-D tensors autograd saves in one forward, parameters excluded:
    their storage, and the copies autocast casts them into for each convolution (eager and
    fused both save a bf16 weight per conv; at 8x8 those outweigh the activations)."""
    params = list(module.parameters())
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    storages = {}

    def is_parameter_copy(t):
        return any(p.shape == t.shape and p.dtype != t.dtype and torch.equal(p.detach().to(t.dtype), t)
                   for p in params)

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if t.dim() == 4 and ptr not in param_storages and not is_parameter_copy(t):
            storages[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


# Block modes: a forward; forward and backward (a training step's); forward and the input
# gradient only (torch.autograd.grad(out, [x]): an attack's step, PGD / AutoAttack).
BLOCK_MODES = ("fwd", "fwdbwd", "fwd-input-grad")
CONV_PASSES = {"fwd": 1, "fwdbwd": 3, "fwd-input-grad": 2}  # forward, dgrad, wgrad: the floor's FLOPs


def run_block_case(case, dtype_name, provs, device, ceil, rows, measure, modes=("fwd", "fwdbwd")):
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    eager = eager_block(case)
    for bn in (m for m in eager.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.normal_(0, 0.3)
    state = eager.state_dict()
    x32 = torch.randn(case.batch, case.in_planes, case.hw, case.hw, device=device)
    expected = eager.to(device)(x32).float()
    out_elems = expected.numel()
    flops = conv_flops(case)
    item = 2 if dtype != torch.float32 else 4
    floor_ms = {}
    for mode in modes:
        floor_bytes = (x32.numel() + out_elems) * item * (1 if mode == "fwd" else 2)
        floor_flops = flops * CONV_PASSES[mode]
        if ceil:
            floor_ms[mode] = 1e3 * max(floor_bytes / ceil["copy_bytes_per_s"], floor_flops / ceil["bf16_flop_per_s"])
            rows.append([case.name, "floor", dtype_name, mode, "time_ms", floor_ms[mode], "ms", f"batch={case.batch}"])
    for prov in provs:
        if dtype != torch.float32 and not prov.autocast:
            continue  # the fp32 NCHW baseline runs in fp32 only
        if prov.compile_mode and dtype_name != "bf16":
            continue  # compile time: torch.compile is measured in bf16 only
        try:
            # One module per provider for both modes: torch.compile compiles once.
            module = build_block(prov, case, state, device)
        except Exception as e:  # noqa: BLE001 - report, do not crash the sweep
            for mode in modes:
                rows.append([case.name, prov.name, dtype_name, mode, "error", math.nan, "",
                             f"build: {type(e).__name__}: {e}"[:300]])
            continue
        # Rotate inputs so repeated runs are not served from L2 (a captured graph has one).
        n_inputs = max(1, min(8, math.ceil(2 * 60e6 / (x32.numel() * 4)))) \
            if device == "cuda" and not prov.cuda_graph else 1
        for mode in modes:
            row = [case.name, prov.name, dtype_name, mode]
            xs = [prov.block_input(x32 + 0.01 * i, dtype).requires_grad_(mode != "fwd")
                  for i in range(n_inputs)]
            autocast = prov.autocast_context(device, dtype)
            try:
                counter = iter(range(10**9))

                def call():
                    x = xs[next(counter) % n_inputs]
                    with prov.launch_context():
                        with autocast:
                            out = module(x)
                        if mode == "fwdbwd":
                            out.backward(torch.ones_like(out))
                        elif mode == "fwd-input-grad":
                            torch.autograd.grad(out, [x], torch.ones_like(out))
                    return out
                step = call
                if prov.cuda_graph:
                    outputs = []
                    step = cuda_graph_replay(lambda: outputs.append(call()))
                    step()
                    got = outputs[-1].float()  # what the replay wrote
                else:
                    got = call().float()
                err = ((got - expected).norm() / expected.norm()).item()
                if not err <= GUARD[dtype]:
                    rows.append(row + ["wrong", err, "rel_l2", "output differs from eager fp32: not timed"])
                    continue
                ms = measure(step)
                rows.append(row + ["time_ms", float(ms), "ms", f"rel_l2={err:.1e}"])
                rows.append(row + ["time_spread", ms.spread, "iqr/median", ""])
                if mode in floor_ms:
                    rows.append(row + ["time_over_floor", ms / floor_ms[mode], "x", ""])
                if prov.cuda_graph:
                    continue  # the rest is its uncaptured twin's
                if device == "cuda":
                    rows.append(row + ["gpu_time_ms", gpu_time_ms(step), "ms", "summed kernel time (torch.profiler)"])
                if not prov.compile_mode:  # saved-tensor hooks would recompile the graph
                    with autocast:
                        rows.append(row + ["saved_activation_bytes", saved_activation_bytes(module, xs[0]), "B", ""])
                if device == "cuda" and mode != "fwd":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    call()
                    torch.cuda.synchronize()
                    rows.append(row + ["peak_memory_bytes", torch.cuda.max_memory_allocated() - base, "B", ""])
            except Exception as e:  # noqa: BLE001
                rows.append(row + ["error", math.nan, "", f"{type(e).__name__}: {e}"[:300]])


# ---------------------------------------------------------------------------- model steps
def training_step(model, prov, batch, dtype, device):
    """A closure running one SGD step of `model` on a random CIFAR batch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    memory_format = torch.channels_last if prov.channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (batch,), device=device)
    autocast = prov.autocast_context(device, dtype)

    def step():
        opt.zero_grad(set_to_none=True)
        with prov.launch_context():
            with autocast:
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
        opt.step()
    return step


def largest_batch(prov, name, dtype, device, start: int, limit: int = 4096) -> int:
    """The largest batch (doubling from `start`) whose training step fits in GPU memory."""
    fits = 0
    batch = start
    while batch <= limit:
        try:
            model = build_model(prov, name, device)
            training_step(model, prov, batch, dtype, device)()
            torch.cuda.synchronize()
            fits = batch
        except torch.OutOfMemoryError:
            break
        finally:
            model = None
            torch.cuda.empty_cache()
        batch *= 2
    return fits


def run_model_case(name, batch, dtype_name, provs, device, rows, measure):
    dtype = DTYPES[dtype_name]
    for prov in provs:
        if dtype != torch.float32 and not prov.autocast:
            continue
        if prov.compile_mode and (dtype_name != "bf16" or name == "preact_resnet1001"):
            continue  # compile time
        row = [name, prov.name, dtype_name, "train_step"]
        try:
            model = build_model(prov, name, device)
            step = training_step(model, prov, batch, dtype, device)
            step = cuda_graph_replay(step) if prov.cuda_graph else step
            step()
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            ms = measure(step)
            rows.append(row + ["images_per_s", batch / (ms * 1e-3), "img/s", f"batch={batch}"])
            rows.append(row + ["time_ms", float(ms), "ms", f"batch={batch}"])
            if device == "cuda" and not prov.cuda_graph:
                rows.append(row + ["peak_memory_bytes", torch.cuda.max_memory_allocated(), "B", f"batch={batch}"])
                rows.append(row + ["gpu_time_ms", gpu_time_ms(step, 3), "ms", "summed kernel time (torch.profiler)"])
            model = step = None
            # Largest batch: eager against our fast backend (each try of the slower ones costs
            # minutes at the batch sizes that fill the GPU).
            if (device == "cuda" and name == "preact_resnet1001" and dtype_name == "bf16"
                    and not prov.compile_mode and not prov.cuda_graph and prov.fused_backend in (None, "triton")):
                rows.append(row + ["largest_batch", largest_batch(prov, name, dtype, device, batch), "images", ""])
        except Exception as e:  # noqa: BLE001
            rows.append(row + ["error", math.nan, "", f"{type(e).__name__}: {e}"[:300]])


def write_results(out: Path, rows: list[list], meta: dict) -> None:
    columns = [k for k in meta if k != "ceilings"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FIELDS + columns)
        for row in rows:
            writer.writerow(row + [meta[k] for k in columns])
    (out / "meta.json").write_text(json.dumps(meta, indent=2))


def work_in_priority_order(block_cases, model_cases, dtypes) -> list[tuple]:
    """Per dtype in the order given: the first block case (the headline target), the model
    steps, then the other blocks, so a time budget cuts the least important work."""
    work = []
    for dtype_name in dtypes:
        blocks = [("block", c, dtype_name) for c in block_cases]
        work += blocks[:1] + [("model", m, dtype_name) for m in model_cases] + blocks[1:]
    return work


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for results.csv, meta.json")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default: all on GPU, fp32 on CPU)")
    parser.add_argument("--max-autotune", action="store_true", help="also torch.compile(mode='max-autotune-no-cudagraphs')")
    parser.add_argument("--no-models", action="store_true", help="skip the model training steps")
    parser.add_argument("--cases", default=None,
                        help="comma list of block case / model names to run (default: all); "
                             "splits a long sweep over several calls")
    parser.add_argument("--modes", default="fwd,fwdbwd",
                        help=f"comma list of block modes, of {','.join(BLOCK_MODES)} (fwd-input-grad: the "
                             "forward and torch.autograd.grad(out, [x]), an attack's step)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting new cases after this many seconds (the rest is recorded as skipped)")
    args = parser.parse_args(argv)
    modes = tuple(args.modes.split(","))
    if set(modes) - set(BLOCK_MODES):
        parser.error(f"--modes: unknown {sorted(set(modes) - set(BLOCK_MODES))}; known: {list(BLOCK_MODES)}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cpu":
        print("fused_preact benchmarks: no GPU here, running the small CPU default "
              "(reference backend vs eager). GPU numbers need a GPU.")
    dtypes = (args.dtypes or ("bf16,fp16,fp32" if device == "cuda" else "fp32")).split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = metadata(device)
    meta["ceilings"] = ceil = ceilings(device)
    provs: list[Provider] = providers(device, args.max_autotune)
    measure = timer(device)
    block_cases = C.GPU_BLOCKS if device == "cuda" else C.CPU_BLOCKS
    model_cases = [] if args.no_models else (C.GPU_MODELS if device == "cuda" else C.CPU_MODELS)
    if args.cases:
        wanted = set(args.cases.split(","))
        known = {c.name for c in block_cases} | {m for m, _ in model_cases}
        if wanted - known:
            parser.error(f"--cases: unknown {sorted(wanted - known)}; known: {sorted(known)}")
        block_cases = [c for c in block_cases if c.name in wanted]
        model_cases = [m for m in model_cases if m[0] in wanted]
    work = work_in_priority_order(block_cases, model_cases, dtypes)
    deadline = time.monotonic() + args.budget_s if args.budget_s else math.inf
    try:
        from tqdm import tqdm
        work_iter = tqdm(work, desc="benchmarks")
    except ImportError:
        work_iter = work
    rows: list[list] = []
    for kind, case, dtype_name in work_iter:
        if time.monotonic() > deadline:
            name = case.name if kind == "block" else case[0]
            rows.append([name, "-", dtype_name, "-", "skipped", math.nan, "", f"--budget-s {args.budget_s:g} spent"])
        elif kind == "block":
            run_block_case(case, dtype_name, provs, device, ceil, rows, measure, modes)
        else:
            run_model_case(*case, dtype_name, provs, device, rows, measure)
        write_results(out, rows, meta)  # after every case: a run cut short keeps what it measured
    print(f"wrote {len(rows)} rows to {out / 'results.csv'}")


if __name__ == "__main__":
    main()
