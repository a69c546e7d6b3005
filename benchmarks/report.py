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


def load(folder: Path):
    with open(folder / "results.csv") as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((folder / "meta.json").read_text())


def block_table(rows) -> list[str]:
    times = defaultdict(dict)  # (case, dtype, mode) -> provider -> ms
    saved = defaultdict(dict)
    problems = []
    for r in rows:
        key = (r["case"], r["dtype"], r["mode"])
        if r["metric"] == "time_ms":
            times[key][r["provider"]] = float(r["value"])
        elif r["metric"] == "saved_activation_bytes":
            saved[key][r["provider"]] = float(r["value"])
        elif r["metric"] in ("wrong", "error", "skipped"):
            problems.append(f"- {r['case']} {r['dtype']} {r['mode']} **{r['provider']}**: {r['metric']} {r['note']}")
    providers = sorted({p for t in times.values() for p in t if p != "floor"})
    # Speedups for the fast backends; the reference backend's times are in its column.
    fused = [p for p in providers if p.startswith("fused-") and p != "fused-reference"]
    ratio_pairs = [(f, b) for f in fused for b in BASELINES if b in providers]
    header = ["case", "dtype", "mode", *(f"{p} ms" for p in providers), *(f"{f} vs {b}" for f, b in ratio_pairs),
              "saved act. fused/eager"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, t in times.items():
        cells = [f"{t[p]:.3f}" if p in t else "-" for p in providers]
        ratios = [f"{t[b] / t[f]:.2f}x" if f in t and b in t else "-" for f, b in ratio_pairs]
        s = saved.get(key, {})
        mem = next((f"{s[f] / s['eager-cl-amp']:.2f}" for f in sorted(s) if f.startswith("fused-")
                    and s.get("eager-cl-amp")), "-")
        lines.append("| " + " | ".join([*key, *cells, *ratios, mem]) + " |")
    table = lines if times else []  # a model-only run has no block table
    return table + ([""] + ["Not timed:"] + problems if problems else [])


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


def plot_speedups(rows, folder: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install .[bench])")
        return
    times = defaultdict(dict)
    for r in rows:
        if r["metric"] == "time_ms" and r["mode"] == "fwdbwd":
            times[(r["case"], r["dtype"])][r["provider"]] = float(r["value"])
    base = "eager-cl-amp"
    fused = sorted({p for t in times.values() for p in t if p.startswith("fused-")})
    keys = [k for k in times if base in times[k]]
    if not keys:
        return
    fig, ax = plt.subplots(figsize=(max(6, len(keys) * 0.6), 4))
    width = 0.8 / max(len(fused), 1)
    for i, p in enumerate(fused):
        ax.bar([j + i * width for j in range(len(keys))],
               [times[k][base] / times[k][p] if p in times[k] else 0 for k in keys], width, label=p)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(keys)), [f"{c}\n{d}" for c, d in keys], rotation=60, fontsize=7)
    ax.set_ylabel(f"speedup vs {base} (fwd+bwd)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "speedup_blocks.png", dpi=120)


def source_line(meta: dict) -> str:
    """The commit, and where the files differed from it, the tree they had (find its commit
    with `git log --format='%h %T' | grep TREE`)."""
    line = f"commit {meta['git_commit'][:10]}"
    if meta.get("source_is_commit") is False:
        line += f" with uncommitted changes (source tree {meta['source_tree'][:10]})"
    return line


def main(argv=None) -> None:
    folder = Path((argv or sys.argv[1:])[0])
    rows, meta = load(folder)
    header = [f"# Benchmark results: {meta['device']}",
              "", f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
              f"{source_line(meta)}, {meta['date']}"
              + ("" if meta.get("triton_autotune", True) else ", Triton autotuning off (one launch config)")
              + (f", fp32 convolutions {meta['fp32_convolutions']}" if "fp32_convolutions" in meta else ""), ""]
    if meta.get("ceilings"):
        c = meta["ceilings"]
        header += [f"Measured ceilings: copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), "
                   f"bf16 matmul {c['bf16_flop_per_s'] / 1e12:.0f} TFLOP/s.", ""]
    blocks, floors, models = block_table(rows), floor_table(rows), model_table(rows)
    text = header + (["## Blocks (median ms; speedup = baseline time / fused time)", ""] + blocks if blocks else []) \
        + (["", "## Blocks: time over the floor (max(minimum bytes / copy rate, FLOPs / bf16 matmul rate), "
            "from the ceilings above)", ""] + floors if floors else []) \
        + (["", "## Model training steps", ""] + models if len(models) > 2 else [])
    (folder / "results.md").write_text("\n".join(text) + "\n")
    plot_speedups(rows, folder)
    print(f"wrote {folder / 'results.md'}")


if __name__ == "__main__":
    main()
