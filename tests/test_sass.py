"""What the GPU will run, checked without one (benchmarks.sass): every Triton kernel of the
headline block compiled for sm_90 and sm_80 with the installed Triton. Conv kernels must use
the tensor cores (HGMMA on Hopper, HMMA on Ampere), nothing may spill, ptxas must not
report serialised wgmma (C7514/C7515), and no conv tile may load element by element. These
facts belong to the installed Triton; the GPU machines run 3.6 (benchmarks/results/ keeps
what each version produced)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def sass_rows(arch: int, tmp_path, case: str = "r18-s1-id") -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    out = tmp_path / f"{case}-sm{arch}.json"
    subprocess.run([sys.executable, "-m", "benchmarks.sass", "--case", case, "--arch", str(arch), "--json", str(out)],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    return json.loads(out.read_text())["kernels"]


# Known violations, as data ((triton major.minor, arch, kernel, what): what was seen), read with
# this tool at the headline shapes (bf16, 4 warps, 3 stages); strict: one that goes away fails
# too, so the list stays true. The GPU machines run triton 3.6.
C7514_DGRAD = ("serialised: (C7514) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
               "non wgmma instructions reading accumulator registers of  a wgmma between start and end of the "
               "pipeline stage in the function 'bn_relu_conv_dgrad_kernel' in line 0")
KNOWN = {
    ("3.9", 90, "bn_relu_conv_dgrad_kernel", C7514_DGRAD): "channels_last weights (3.6 does not serialise)",
}


@pytest.mark.slow
@pytest.mark.parametrize("arch,mma", [(90, "hgmma"), (80, "hmma")])
def test_headline_kernels_use_tensor_cores_without_spills_or_serialisation(arch, mma, tmp_path):
    rows = sass_rows(arch, tmp_path)
    assert sum(r["conv"] for r in rows) == 3  # forward, dgrad, wgrad
    found = set()
    for r in rows:
        if r["spill_bytes"] or r["local_bytes"]:
            found.add((arch, r["kernel"], "spills"))
        if r["advisories"]:
            found.add((arch, r["kernel"], "serialised: " + " ".join(r["advisory_text"])))
        if r["conv"] and not (r[mma] > 0 and r["main_loop_instructions"]):
            found.add((arch, r["kernel"], f"no {mma.upper()} in a main loop"))
    import triton
    version = ".".join(triton.__version__.split(".")[:2])
    known = {k[1:] for k in KNOWN if k[:2] == (version, arch)}
    assert found == known, f"new: {sorted(found - known)}; gone (drop from KNOWN): {sorted(known - found)}"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["r18-s2-id", "in-r50-28"])
def test_wide_tiles_get_the_warps_their_accumulators_need(case, tmp_path):
    """With one launch config (autotuning off, as the benchmark runs), a 128 x 128 forward or
    dgrad tile launches with 8 warps: at the config's 4 its float32 accumulator alone fills
    half the registers, and sm_90 spilled up to 2.5 KB per thread (at most 232 B at 8 warps:
    benchmarks/results/2026-11-25-cpu-sass-dc1ea69-warps)."""
    rows = sass_rows(90, tmp_path, case)
    wide = [r for r in rows if r["conv"] and r["config"]["BM"] * r["config"]["BN"] > 128 * 64]
    assert wide and all(r["num_warps"] == 8 for r in wide)
    assert max(r["spill_bytes"] for r in rows if r["conv"]) <= 256, [(r["kernel"], r["spill_bytes"]) for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["r18-s2-proj", "in-r50-56"])
def test_conv_tiles_load_no_element_alone(case, tmp_path):
    """The conv kernels' main loops load their 16-bit tiles in vectors, not element by
    element, 1x1 filters in PyTorch's default weight layout included: its size-1 dimensions
    have stride 1, and while the tap's offset r * stride + s * stride was computed the
    compiler could not prove the weight tile aligned, so the forward and dgrad loaded it
    with 32 2-byte loads and 32 shared stores per iteration (in-r50-56, triton 3.6, sm_90).
    (Triton 3.9 loads a forward's per-channel BN parameters in 4-byte pieces: allowed.)"""
    rows = sass_rows(90, tmp_path, case)
    elementwise = [(r["kernel"], r["config"], r["main_loop_load_bytes"]) for r in rows
                   if r["conv"] and any(int(size) < 4 for size in r["main_loop_load_bytes"])]
    assert not elementwise


@pytest.mark.slow
def test_weight_gradient_partials_move_in_vectors(tmp_path):
    """The weight gradient's float32 split partials are stored and summed in 16-byte vectors:
    laid out [R * S, K, C], each tap's tile is contiguous along C. In the weight's own
    [K, C, R, S] order a 3x3 tile's elements lay 9 apart: 64 4-byte stores and 64 4-byte
    loads per thread (headline, triton 3.6, sm_90)."""
    rows = sass_rows(90, tmp_path)
    wgrad = [r for r in rows if r["kernel"] == "bn_relu_conv_wgrad_kernel"]
    assert wgrad and all(r["config"]["SPLIT"] > 1 for r in wgrad)
    word_sized = [(r["load_bytes"], r["store_bytes"]) for r in wgrad
                  if "4" in r["load_bytes"] or "4" in r["store_bytes"]]
    assert not word_sized
