"""Tables and plots from a benchmark results folder (the data, never typed numbers).

    python -m benchmarks.report bench_out     # writes bench_out/results.md and *.png
"""
from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

BASELINES = ("eager-fp32-nchw", "eager-cl-amp", "compile")
GRAPH = "-graph"  # the suffix of a provider replayed from a CUDA graph
NOISY_SPREAD = 0.2  # as benchmarks.run: interquartile range over median above which a time is flagged
LEGEND = {
    "eager-fp32-nchw": "eager PyTorch blocks, float32, NCHW",
    "eager-cl-amp": "eager PyTorch blocks, channels_last, under autocast to the case dtype (at fp32: no autocast)",
    "compile": "torch.compile of the eager block (default mode), channels_last + autocast",
    "compile-max": "torch.compile(mode='max-autotune-no-cudagraphs') of the eager block",
    "fused-triton": "fused_preact blocks, triton backend",
    "fused-cuda": "fused_preact blocks, cuda backend",
    "fused-reference": "fused_preact blocks, reference backend (pure PyTorch: recomputes to save memory)",
    "compile-fused-triton": "torch.compile (default mode) of the fused blocks / of the eager model after fp.convert, "
                            "triton backend",
    "eager-cl-amp-graph": "eager-cl-amp with each timed step captured in one CUDA graph and replayed (no host work)",
    "fused-triton-graph": "fused-triton with each timed step captured in one CUDA graph and replayed (no host work)",
    "fused-triton-jit-launch": "fused-triton with every Triton launch through kernel[grid] (no direct launch of the "
                               "kept compiled kernels)",
    "floor": "max(minimum bytes / copy rate, FLOPs / bf16 matmul rate)",
}


def load(folder: Path):
    with open(folder / "results.csv") as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((folder / "meta.json").read_text())


def block_table(rows) -> list[str]:
    times = defaultdict(dict)  # (case, dtype, mode) -> provider -> ms
    spreads = defaultdict(dict)
    saved = defaultdict(dict)
    problems = []
    for r in rows:
        key = (r["case"], r["dtype"], r["mode"])
        if r["mode"] == "train_step":
            continue  # model_table's
        if r["metric"] == "time_ms":
            times[key][r["provider"]] = float(r["value"])
        elif r["metric"] == "time_spread":
            spreads[key][r["provider"]] = float(r["value"])
        elif r["metric"] == "saved_activation_bytes":
            saved[key][r["provider"]] = float(r["value"])
        elif r["metric"] in ("wrong", "error", "skipped"):
            problems.append(f"- {r['case']} {r['dtype']} {r['mode']} **{r['provider']}**: {r['metric']} {r['note']}")
    providers = sorted({p for t in times.values() for p in t if p != "floor"})
    # Speedups for the fast backends; the reference backend's times are in its column.
    fused = [p for p in providers if p.startswith("fused-") and p != "fused-reference" and not p.endswith(GRAPH)]
    ratio_pairs = [(f, b) for f in fused for b in BASELINES if b in providers] \
        + [(f + GRAPH, b + GRAPH) for f in fused for b in BASELINES if {f + GRAPH, b + GRAPH} <= set(providers)]
    header = ["case", "dtype", "mode", *(f"{p} ms" for p in providers), *(f"{f} vs {b}" for f, b in ratio_pairs),
              "saved act. fused/eager"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    noisy = False
    for key, t in times.items():
        cells = []
        for p in providers:
            flag = spreads[key].get(p, 0.0) > NOISY_SPREAD
            noisy = noisy or flag
            cells.append(f"{t[p]:.3f}" + (" (noisy)" if flag else "") if p in t else "-")
        ratios = [f"{t[b] / t[f]:.2f}x" if f in t and b in t else "-" for f, b in ratio_pairs]
        s = saved.get(key, {})
        mem = next((f"{s[f] / s['eager-cl-amp']:.2f}" for f in sorted(s) if f.startswith("fused-")
                    and s.get("eager-cl-amp")), "-")
        lines.append("| " + " | ".join([*key, *cells, *ratios, mem]) + " |")
    table = lines if times else []  # a model-only run has no block table
    if noisy:
        table += ["", f"(noisy): the interquartile range of its samples is over {NOISY_SPREAD:.0%} of the median; "
                  "rerun before reading much into it."]
    return table + ([""] + ["Not timed:"] + problems if problems else [])


def host_table(rows) -> list[str]:
    """Per timed step (block mode or model training step) and provider: the wall time, the
    summed GPU time of its kernels (torch.profiler), their ratio and the host's share of
    the wall time, and the time of the same step replayed from a CUDA graph where the run
    has that provider's -graph twin (empty without GPU times)."""
    times, gpu = defaultdict(dict), defaultdict(dict)  # (case, dtype, mode) -> provider -> ms
    for r in rows:
        key = (r["case"], r["dtype"], r["mode"])
        if r["metric"] == "time_ms":
            times[key][r["provider"]] = float(r["value"])
        elif r["metric"] == "gpu_time_ms":
            gpu[key][r["provider"]] = float(r["value"])
    lines = ["| case | dtype | mode | provider | wall ms | GPU ms | wall / GPU | host share | CUDA graph replay ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, per_provider in gpu.items():
        for prov, gpu_ms in per_provider.items():
            wall = times[key].get(prov)
            if wall is None:
                continue
            replay = times[key].get(prov + GRAPH)
            lines.append(f"| {' | '.join(key)} | {prov} | {wall:.3f} | {gpu_ms:.3f} | {wall / gpu_ms:.2f} | "
                         f"{max(0.0, 1 - gpu_ms / wall):.0%} | {'-' if replay is None else f'{replay:.3f}'} |")
    return lines if len(lines) > 2 else []


def has_ratios(table: list[str]) -> bool:
    return bool(table) and " vs " in table[0]


def floor_table(rows) -> list[str]:
    """Each provider's time over the block's floor, measured in the run (empty if none)."""
    floors, over = {}, defaultdict(dict)  # (case, dtype, mode) -> ms; -> provider -> x
    for r in rows:
        key = (r["case"], r["dtype"], r["mode"])
        if r["provider"] == "floor" and r["metric"] == "time_ms":
            floors[key] = float(r["value"])
        elif r["metric"] == "time_over_floor":
            over[key][r["provider"]] = float(r["value"])
    providers = sorted({p for o in over.values() for p in o})
    if not providers:
        return []
    lines = ["| case | dtype | mode | floor ms | " + " | ".join(f"{p} / floor" for p in providers) + " |",
             "|" + "---|" * (4 + len(providers))]
    for key, o in over.items():
        cells = [f"{o[p]:.1f}x" if p in o else "-" for p in providers]
        lines.append("| " + " | ".join([*key, f"{floors[key]:.3f}" if key in floors else "-", *cells]) + " |")
    return lines


def model_table(rows) -> list[str]:
    lines = ["| model | provider | dtype | images/s | peak memory MiB | largest batch | note |",
             "|---|---|---|---|---|---|---|"]
    by_key = defaultdict(dict)
    for r in rows:
        if r["mode"] == "train_step":
            by_key[(r["case"], r["provider"], r["dtype"])][r["metric"]] = r
    for (model, prov, dtype), m in by_key.items():
        ips = f"{float(m['images_per_s']['value']):.0f}" if "images_per_s" in m else "-"
        mem = f"{float(m['peak_memory_bytes']['value']) / 2**20:.0f}" if "peak_memory_bytes" in m else "-"
        largest = f"{float(m['largest_batch']['value']):.0f}" if "largest_batch" in m else "-"
        note = m["error"]["note"] if "error" in m else m.get("images_per_s", {}).get("note", "")
        lines.append(f"| {model} | {prov} | {dtype} | {ips} | {mem} | {largest} | {note} |")
    return lines


def plot_summary(rows, meta: dict, folder: Path) -> Path | None:
    """summary.png: fwd+bwd time per block case and provider (median, interquartile bars),
    and the activation memory a block keeps for its backward (ours vs eager); the title
    names the device. Returns its path (None without matplotlib or block rows)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install .[bench])")
        return None
    times, spreads, saved = defaultdict(dict), defaultdict(dict), defaultdict(dict)
    for r in rows:
        if r["mode"] != "fwdbwd" or r["provider"] == "floor":
            continue
        key = f"{r['case']}\n{r['dtype']}"
        if r["metric"] == "time_ms":
            times[key][r["provider"]] = float(r["value"])
        elif r["metric"] == "time_spread":
            spreads[key][r["provider"]] = float(r["value"])
        elif r["metric"] == "saved_activation_bytes":
            saved[key][r["provider"]] = float(r["value"]) / 2**20
    if not times:
        return None
    keys = list(times)
    providers = sorted({p for t in times.values() for p in t})
    fig, (ax_time, ax_mem) = plt.subplots(2, 1, figsize=(max(7, 1.1 * len(keys) + 3), 7.5))
    width = 0.8 / len(providers)
    for i, p in enumerate(providers):
        xs = [j + i * width for j in range(len(keys))]
        ms = [times[k].get(p, 0.0) for k in keys]
        half_iqr = [times[k].get(p, 0.0) * spreads[k].get(p, 0.0) / 2 for k in keys]
        ax_time.bar(xs, ms, width, yerr=half_iqr, capsize=2, label=p)
        ax_mem.bar(xs, [saved[k].get(p, 0.0) for k in keys], width, label=p)
    for ax in (ax_time, ax_mem):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys, fontsize=7)
        ax.legend(fontsize=7)
    ax_time.set_ylabel("fwd+bwd time, ms (median; bar = IQR)")
    ax_time.set_title("time per block step (lower is better)", fontsize=9)
    ax_mem.set_ylabel("saved for backward, MiB")
    largest = [f"{r['case']} {r['provider']} {r['dtype']}: {float(r['value']):.0f}"
               for r in rows if r["metric"] == "largest_batch"]
    ax_mem.set_title("activation memory a block keeps for its backward (lower is better)", fontsize=9)
    fig.suptitle(f"fused_preact benchmarks on {meta['device']} ({meta['device_type']}), {meta['date'][:10]}\n"
                 f"{source_line(meta)}", fontsize=9)
    fig.text(0.01, 0.005, "largest batch that fits: " + ("; ".join(largest) if largest else
             "measured on GPUs only (ResNet-1001 step)"), fontsize=7)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    path = folder / "summary.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def source_line(meta: dict) -> str:
    """The commit, and where the files differed from it, the tree they had (find its commit
    with `git log --format='%h %T' | grep TREE`)."""
    line = f"commit {meta['git_commit'][:10]}"
    if meta.get("source_is_commit") is False:
        line += f" with uncommitted changes (source tree {meta['source_tree'][:10]})"
    return line


def run_line(meta: dict) -> str:
    """Versions, commit and date; on a GPU also the Triton and tf32 settings of the run."""
    if meta.get("device_type") == "cpu":
        return f"CPU run: torch {meta['torch']}, {source_line(meta)}, {meta['date']}"
    return (f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, {source_line(meta)}, {meta['date']}"
            + ("" if meta.get("triton_autotune", True) else ", Triton autotuning off (one launch config)")
            + (f", fp32 convolutions {meta['fp32_convolutions']}" if "fp32_convolutions" in meta else ""))


def main(argv=None) -> None:
    folder = Path((argv or sys.argv[1:])[0])
    rows, meta = load(folder)
    header = [f"# Benchmark results: {meta['device']}", "", run_line(meta), ""]
    if meta.get("ceilings"):
        c = meta["ceilings"]
        header += [f"Measured ceilings: copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), "
                   f"bf16 matmul {c['bf16_flop_per_s'] / 1e12:.0f} TFLOP/s.", ""]
    blocks, floors, models, host = block_table(rows), floor_table(rows), model_table(rows), host_table(rows)
    shown = sorted({r["provider"] for r in rows if r["provider"] in LEGEND})
    header += ["Providers:"] + [f"- `{p}`: {LEGEND[p]}" for p in shown] + [""]
    heading = "## Blocks (median ms" + ("; speedup = baseline time / fused time" if has_ratios(blocks) else "") \
        + "; saved act. = bytes a fused block keeps for backward / eager-cl-amp's)"
    text = header + ([heading, ""] + blocks if blocks else []) \
        + (["", "## Blocks: time over the floor (max(minimum bytes / copy rate, FLOPs / bf16 matmul rate), "
            "from the ceilings above)", ""] + floors if floors else []) \
        + (["", "## Model training steps", ""] + models if len(models) > 2 else []) \
        + (["", "## Host share (wall time against the summed GPU time of the kernels; the CUDA graph replay "
            "runs the same kernels without the host work)", ""] + host if host else [])
    (folder / "results.md").write_text("\n".join(text) + "\n")
    figure = plot_summary(rows, meta, folder)
    print("\n".join([header[0], run_line(meta), ""] + blocks + ([""] + models if len(models) > 2 else [])))
    print(f"\nwrote {folder / 'results.md'}" + (f" and {figure}" if figure else ""))


if __name__ == "__main__":
    main()
