#!/usr/bin/env bash
# Everything that needs a GPU, in one call (under 8 minutes on an H100):
# build the extension in place, run the whole test suite on the GPU (the Triton tests
# run compiled; tests/test_gpu.py checks the cuda backend too), compute-sanitizer on a
# small run of each cuda kernel, then the benchmark suite and its report. No network needed.
#   bash scripts/gpu_all.sh OUT_FOLDER
set -uo pipefail
out=${1:?usage: gpu_all.sh OUT_FOLDER}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
python -m fused_preact.info | tee "$out/info.txt"
python -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$out/tests.txt" | tail -40
for tool in memcheck racecheck; do
  compute-sanitizer --tool "$tool" python scripts/cuda_smoke.py > "$out/sanitizer_$tool.txt" 2>&1
  tail -3 "$out/sanitizer_$tool.txt"
done
FUSED_PREACT_CUDA_UNVERIFIED=1 python -m benchmarks.run --out "$out" 2>&1 | tail -5
python -m benchmarks.report "$out"
