"""The benchmark suite on CPU: its correctness guard, its output files, and cheap
pytest-benchmark micro-benchmarks (reference backend vs eager, tiny shapes)."""
import csv
import subprocess
from pathlib import Path

import pytest
import torch

import fused_preact as fp
from benchmarks import cases, providers, readme, report, run
from fused_preact import testing
from fused_preact.testing import PreActBlock as EagerBlock


def test_wrong_provider_is_reported_not_timed(monkeypatch):
    case = cases.BlockCase("tiny", "basic", 4, 4, 1, 2, 6)
    good = providers.Provider("fused-reference", "reference", True, True)
    bad = providers.Provider("fused-broken", "reference", True, True)
    real_build = providers.build_block

    def build(prov, case, state, device):
        module = real_build(prov, case, state, device)
        if prov.name == "fused-broken":
            with torch.no_grad():
                module.conv2.weight.mul_(1.5)  # computes something else
        return module
    monkeypatch.setattr(run, "build_block", build)
    rows = []
    run.run_block_case(case, "fp32", [good, bad], "cpu", {}, rows, run.timer("cpu"))
    by = {(r[1], r[3], r[4]) for r in rows}
    assert ("fused-reference", "fwd", "time_ms") in by and ("fused-reference", "fwdbwd", "time_ms") in by
    assert ("fused-broken", "fwd", "wrong") in by
    assert not any(r[1] == "fused-broken" and r[4] == "time_ms" for r in rows)


def test_compiled_fused_provider_is_checked_and_timed():
    """torch.compile of the fused blocks (on a GPU: compile-fused-triton) goes through the
    same correctness guard as every provider; here on the reference backend."""
    case = cases.BlockCase("tiny", "basic", 4, 4, 1, 2, 6)
    compiled = providers.Provider("compile-fused-reference", "reference", True, True, "default")
    assert "compile-fused-triton" in [p.name for p in providers.providers("cuda", False)]
    rows = []
    run.run_block_case(case, "bf16", [compiled], "cpu", {}, rows, run.timer("cpu"))  # compiled: bf16 only
    by = {(r[1], r[3], r[4]) for r in rows}
    assert ("compile-fused-reference", "fwd", "time_ms") in by
    assert ("compile-fused-reference", "fwdbwd", "time_ms") in by


def test_compiled_fused_model_is_the_users_model_converted(monkeypatch):
    """compile-fused-* compiles what a user would: their eager model after fp.convert."""
    monkeypatch.setitem(providers.EAGER_MODELS, "tiny_resnet",
                        lambda: testing.PreActResNet(testing.PreActBlock, [1, 1, 1, 1]))
    compiled = providers.Provider("compile-fused-reference", "reference", True, True, "default")
    model = providers.build_model(compiled, "tiny_resnet", "cpu")
    inner = model._orig_mod  # torch.compile's wrapper around the module it compiles
    assert type(inner) is testing.PreActResNet
    assert sum(isinstance(m, fp.PreActBlock) for m in inner.modules()) == 4


def test_graph_providers_exist_on_gpus_only():
    on_gpu = {p.name: p for p in providers.providers("cuda", False)}
    assert on_gpu["eager-cl-amp-graph"].cuda_graph and on_gpu["fused-triton-graph"].cuda_graph
    assert not any(p.cuda_graph for p in providers.providers("cpu", False))
    # A captured graph must not replay autocast's cached casts of the warm-up.
    with on_gpu["fused-triton-graph"].autocast_context("cpu", torch.bfloat16):
        assert not torch.is_autocast_cache_enabled()


def test_jit_launch_provider_sends_its_steps_through_kernel_grid(monkeypatch):
    """fused-triton-jit-launch times the same blocks with the direct launch off, for the
    whole step (its backward too), and leaves it as it was after."""
    from fused_preact.backends.triton import launch
    monkeypatch.setattr(launch, "DIRECT", True)
    on_gpu = {p.name: p for p in providers.providers("cuda", False)}
    with on_gpu["fused-triton"].launch_context():
        assert launch.DIRECT
    with on_gpu["fused-triton-jit-launch"].launch_context():
        assert not launch.DIRECT
    assert launch.DIRECT


def test_report_host_share_table():
    block = {"case": "c", "dtype": "bf16", "mode": "fwdbwd", "unit": "", "note": ""}
    model = dict(block, case="m", mode="train_step")
    rows = [dict(block, provider="fused-triton", metric="time_ms", value="2.0"),
            dict(block, provider="fused-triton", metric="gpu_time_ms", value="0.5"),
            dict(block, provider="fused-triton-graph", metric="time_ms", value="0.6"),
            dict(block, provider="eager-cl-amp", metric="time_ms", value="1.0"),
            dict(block, provider="eager-cl-amp-graph", metric="time_ms", value="0.8"),
            dict(model, provider="eager-cl-amp", metric="time_ms", value="10.0"),
            dict(model, provider="eager-cl-amp", metric="gpu_time_ms", value="8.0")]
    host = report.host_table(rows)
    assert host[2] == "| c | bf16 | fwdbwd | fused-triton | 2.000 | 0.500 | 4.00 | 75% | 0.600 |"
    assert host[3] == "| m | bf16 | train_step | eager-cl-amp | 10.000 | 8.000 | 1.25 | 20% | - |"
    blocks = report.block_table(rows)
    assert "fused-triton-graph vs eager-cl-amp-graph" in blocks[0]
    assert "fused-triton-graph vs eager-cl-amp |" not in blocks[0]  # replays compare with replays
    assert not any("train_step" in line for line in blocks)  # model rows are model_table's
    assert report.host_table(rows[:1]) == []


def test_cpu_default_run_writes_results_and_report(tmp_path, monkeypatch):
    monkeypatch.setattr(cases, "CPU_BLOCKS", [cases.BlockCase("tiny", "bottleneck", 8, 2, 2, 2, 6)])
    run.main(["--out", str(tmp_path), "--device", "cpu", "--no-models"])
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["provider"] for r in rows} == {"eager-fp32-nchw", "eager-cl-amp", "fused-reference"}
    assert all(r["device_type"] == "cpu" and r["git_commit"] is not None for r in rows)
    saved = {r["provider"]: float(r["value"]) for r in rows
             if r["metric"] == "saved_activation_bytes" and r["mode"] == "fwd"}
    assert saved["fused-reference"] <= 0.55 * saved["eager-cl-amp"]
    report.main([str(tmp_path)])
    assert "| tiny | fp32 | fwdbwd |" in (tmp_path / "results.md").read_text()


def test_attack_step_mode_times_the_input_gradient(tmp_path, monkeypatch):
    """--modes fwd-input-grad: the forward and torch.autograd.grad(out, [x]), checked against
    eager and timed for every provider, with the floor of two conv passes."""
    monkeypatch.setattr(cases, "CPU_BLOCKS", [cases.BlockCase("tiny", "basic", 8, 8, 1, 2, 6)])
    run.main(["--out", str(tmp_path), "--device", "cpu", "--no-models", "--modes", "fwd-input-grad"])
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["mode"] for r in rows} == {"fwd-input-grad"}
    timed = {r["provider"] for r in rows if r["metric"] == "time_ms"}
    assert timed == {"eager-fp32-nchw", "eager-cl-amp", "fused-reference"}, rows
    with pytest.raises(SystemExit):
        run.main(["--out", str(tmp_path), "--device", "cpu", "--modes", "bwd"])


def test_time_budget_skips_and_records_the_rest(tmp_path):
    run.main(["--out", str(tmp_path), "--device", "cpu", "--budget-s", "1e-9"])
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    expected = {c.name for c in cases.CPU_BLOCKS} | {m for m, _ in cases.CPU_MODELS}
    assert {r["case"] for r in rows if r["metric"] == "skipped"} == expected
    report.main([str(tmp_path)])
    assert "skipped" in (tmp_path / "results.md").read_text()


def test_cases_option_runs_only_the_named_cases(tmp_path):
    run.main(["--out", str(tmp_path), "--device", "cpu", "--cases", "cpu-basic-proj", "--budget-s", "1e-9"])
    with open(tmp_path / "results.csv") as f:
        assert {r["case"] for r in csv.DictReader(f)} == {"cpu-basic-proj"}
    with pytest.raises(SystemExit):
        run.main(["--out", str(tmp_path), "--device", "cpu", "--cases", "no-such-case"])


def test_source_tree_names_the_files_that_ran_not_an_older_head(tmp_path):
    """A GPU machine's copy may carry a .git older than its files: the recorded tree hash
    is the one the commit of exactly those files gets."""
    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    (tmp_path / "kernel.py").write_text("old\n")
    git("add", "-A")
    git("commit", "-qm", "old")
    assert run.source_tree(tmp_path) == (git("rev-parse", "HEAD^{tree}"), True)
    (tmp_path / "kernel.py").write_text("new\n")
    (tmp_path / "added.py").write_text("untracked, not ignored: it travels too\n")
    tree, is_head = run.source_tree(tmp_path)
    assert not is_head
    assert git("diff", "--cached", "--name-only") == ""  # the real index was left alone
    git("add", "-A")
    git("commit", "-qm", "new")
    assert tree == git("rev-parse", "HEAD^{tree}")


def test_priority_order_puts_headline_case_and_models_first():
    work = run.work_in_priority_order(cases.GPU_BLOCKS, cases.GPU_MODELS, ["bf16", "fp32"])
    assert work[0] == ("block", cases.GPU_BLOCKS[0], "bf16")
    assert [w[1] for w in work[1:4]] == cases.GPU_MODELS
    assert {w[2] for w in work[:len(work) // 2]} == {"bf16"}


@pytest.mark.benchmark(group="block-fwdbwd-cpu")
@pytest.mark.parametrize("impl", ["eager", "fused-reference"])
def test_micro_block_fwdbwd(benchmark, impl):
    torch.manual_seed(0)
    block = EagerBlock(16, 16) if impl == "eager" else fp.PreActBlock(16, 16, backend="reference")
    x = torch.randn(8, 16, 16, 16, requires_grad=True)

    def step():
        block(x).sum().backward()
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)


def test_host_cost_runs_with_every_triton_launch_stubbed(tmp_path):
    """In its own process: it replaces the kernels of the triton modules for good."""
    import json
    import sys
    subprocess.run([sys.executable, "-m", "benchmarks.host_cost", "--out", str(tmp_path), "--repeats", "1",
                    "--calls", "1", "--breakdown"], check=True, capture_output=True, cwd=Path(__file__).parent.parent)
    written = json.loads((tmp_path / "host_cost.json").read_text())
    assert written["meta"]["device_type"] == "cpu"
    assert len(written["block_layers"]) == 6 and all(t["min_us"] > 0 for t in written["block_layers"].values())
    assert {(kind, mode) for kind, r in written["results"].items() for mode in r} == {
        (kind, mode) for kind in ("basic", "bottleneck", "projection") for mode in ("fwd", "fwdbwd", "fwd-eval-nograd")}
    assert all(0 < t["min_us"] <= t["median_us"] for r in written["results"].values() for t in r.values())


@pytest.mark.slow
def test_launch_cost_runs_both_launch_paths(tmp_path):
    """In its own process, compiled for sm_90 on the stand-in driver (no TRITON_INTERPRET):
    every block step reaches Triton's launcher on both paths (it once stopped at the
    backend's interpreter probe, which the stand-in cannot run)."""
    import json
    import os
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "benchmarks.launch_cost", "--out", str(tmp_path), "--repeats", "1",
                    "--calls", "1"], check=True, capture_output=True, cwd=Path(__file__).parent.parent, env=env)
    written = json.loads((tmp_path / "launch_cost.json").read_text())
    assert set(written["results"]) == {"basic", "bottleneck", "projection"}
    for result in written["results"].values():
        assert result["launches_per_step"] > 0
        assert all(0 < result[path]["min_us"] <= result[path]["median_us"] for path in ("kernel[grid]", "direct"))


def test_readme_writes_a_short_section_between_its_markers(tmp_path, monkeypatch):
    """Per folder: the headline case's rows and the model steps, copied from results.md, and
    a link to the full tables; other cases stay out; a second run changes nothing."""
    headline = readme.HEADLINE
    monkeypatch.setattr(cases, "CPU_BLOCKS", [cases.BlockCase(headline, "basic", 4, 4, 1, 2, 5),
                                              cases.BlockCase("later", "basic", 4, 4, 1, 2, 5)])
    monkeypatch.setattr(cases, "CPU_MODELS", [])
    measured = tmp_path / "results" / "measured"
    run.main(["--out", str(measured), "--device", "cpu"])
    report.main([str(measured)])
    page = tmp_path / "README.md"
    page.write_text(f"intro\n{readme.START}\nstale table\n{readme.END}\noutro\n")
    readme.main([str(measured)], readme=page)
    once = page.read_text()
    assert once.startswith("intro\n") and once.endswith(f"{readme.END}\noutro\n") and "stale" not in once
    full = (measured / "results.md").read_text()
    headline_rows = [line for line in full.splitlines() if line.startswith(f"| {headline} |")]
    assert headline_rows and all(row in once for row in headline_rows)
    assert "| later |" in full and "| later |" not in once
    assert "[results/measured/results.md](results/measured/results.md)" in once
    readme.main([str(measured)], readme=page)
    assert page.read_text() == once


def test_report_puts_each_time_over_its_floor():
    base = {"case": "c", "dtype": "bf16", "mode": "fwd", "unit": "", "note": ""}
    rows = [dict(base, provider="floor", metric="time_ms", value="0.1"),
            dict(base, provider="fused-triton", metric="time_ms", value="0.3"),
            dict(base, provider="fused-triton", metric="time_over_floor", value="3.0"),
            dict(base, provider="eager-cl-amp", metric="time_over_floor", value="1.5")]
    table = report.floor_table(rows)
    assert table[0] == "| case | dtype | mode | floor ms | eager-cl-amp / floor | fused-triton / floor |"
    assert table[2] == "| c | bf16 | fwd | 0.100 | 1.5x | 3.0x |"
    assert report.floor_table(rows[1:2]) == []


def test_cpu_report_prints_its_tables_and_names_its_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cases, "CPU_BLOCKS", [cases.BlockCase("tiny", "basic", 4, 4, 1, 2, 5)])
    run.main(["--out", str(tmp_path), "--device", "cpu", "--no-models"])
    capsys.readouterr()
    report.main([str(tmp_path)])
    out = capsys.readouterr().out
    text = (tmp_path / "results.md").read_text()
    assert "| tiny | fp32 | fwdbwd |" in out and str(tmp_path / "results.md") in out
    assert "CPU run" in text and "tf32" not in text and "triton" not in text.split("\n")[2]
    assert "speedup" not in text  # no ratio column on a CPU run, so no promise of one
    assert "`eager-cl-amp`: eager PyTorch blocks, channels_last, under autocast" in text and "(at fp32: no autocast)" in text
    spreads = [r for r in csv.DictReader(open(tmp_path / "results.csv")) if r["metric"] == "time_spread"]
    assert spreads and all(float(r["value"]) >= 0 for r in spreads)


def test_report_flags_a_noisy_time():
    base = {"case": "c", "dtype": "fp32", "mode": "fwd", "unit": "", "note": ""}
    rows = [dict(base, provider="eager-cl-amp", metric="time_ms", value="1.0"),
            dict(base, provider="eager-cl-amp", metric="time_spread", value="0.5"),
            dict(base, provider="fused-reference", metric="time_ms", value="2.0"),
            dict(base, provider="fused-reference", metric="time_spread", value="0.05")]
    table = report.block_table(rows)
    assert "| c | fp32 | fwd | 1.000 (noisy) | 2.000 |" in table[2]


# Per basic block inside a converted nn.Sequential, measured by benchmarks.launches at this
# commit; the targets for an identity block are 2 / 8 Triton launches and no torch
# kernel. A projection block runs a third conv, forward, wgrad and dgrad; bn1's backward runs
# once for conv1 and the projection (conv1's dgrad adds the projection's). An attack's step
# (the input gradient only) runs no wgrad. A change that adds a launch or a kernel beside
# them fails here; one that removes some lowers these.
MODES = ("fwd", "fwdbwd", "fwd-amp", "fwdbwd-amp", "fwd-input-grad")
TRITON_LAUNCHES = {"identity": {"fwd": 2, "fwdbwd": 8, "fwd-input-grad": 6},  # (the same under autocast)
                   "projection": {"fwd": 3, "fwdbwd": 11, "fwd-input-grad": 8}}
LAUNCH_BUDGET = {block: {mode: {"triton": launches[mode.replace("-amp", "")], "torch": 0} for mode in MODES}
                 for block, launches in TRITON_LAUNCHES.items()}


@pytest.mark.parametrize("block", sorted(LAUNCH_BUDGET))
def test_launches_per_chained_block_do_not_regress(block):
    import json
    import sys
    code = ("import json; from benchmarks.launches import per_block\n"
            f"print(json.dumps({{m: {{k: dict(c) for k, c in v.items()}} for m, v in per_block({block!r}).items()}}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent)
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    convs = 2 if block == "identity" else 3
    assert counts["fwdbwd"]["triton"]["bn_relu_conv_fwd_kernel"] == convs  # it counts what runs
    for mode, budget in LAUNCH_BUDGET[block].items():
        for kind, most in budget.items():
            assert sum(counts[mode][kind].values()) <= most, (mode, kind, counts[mode][kind])


def test_kernel_benchmark_writes_its_rows_on_a_cpu(tmp_path):
    """benchmarks.kernels' plumbing (the GPU times ours vs cuDNN; here the interpreter vs aten)."""
    import os
    import sys
    env = dict(os.environ, TRITON_INTERPRET="1")
    why_not = subprocess.run([sys.executable, "-c", "from fused_preact.backends.triton.backend import "
                              "interpreter_reason; print(interpreter_reason() or '')"], check=True,
                             capture_output=True, text=True, env=env).stdout.strip()
    if why_not:  # this environment's Triton interpreter (a GPU machine's older triton, say)
        pytest.skip(why_not)
    subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--out", str(tmp_path), "--device", "cpu",
                    "--cases", "tiny-overhead", "--dtypes", "fp32"], check=True, capture_output=True, env=env,
                   cwd=Path(__file__).parent.parent)
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    times = {(r["mode"], r["provider"]) for r in rows if r["metric"] == "time_ms"}
    assert times == {(m, p) for m in ("conv_fwd", "conv_dgrad", "conv_wgrad") for p in ("fused-triton", "aten")}
    ratios = [r for r in rows if r["metric"] == "ratio"]
    assert len(ratios) == 3 and all(float(r["value"]) > 0 for r in ratios)
