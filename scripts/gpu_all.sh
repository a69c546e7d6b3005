#!/usr/bin/env bash
# Everything that needs a GPU, in one call (it fit one 10-minute call on an H100, 2026-11-22):
# build the extension in place, run the whole test suite on the GPU (the Triton tests
# run compiled; tests/test_gpu.py checks the cuda backend too), compute-sanitizer on a
# small run of each cuda kernel, then the benchmark suite and its report. No network needed.
#   bash scripts/gpu_all.sh OUT_FOLDER
# BENCH_BUDGET_S (default 100): seconds after which the benchmark starts no new case
# (the rest is recorded as skipped, most important cases first). TESTS_TIMEOUT_S (330): the tests' limit.
set -uo pipefail
out=${1:?usage: gpu_all.sh OUT_FOLDER}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
start=$SECONDS
step() { echo "== [$((SECONDS - start)) s] $*"; }

step build
python -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
python -m fused_preact.info | tee "$out/info.txt"

step tests
# Parallel workers where pytest-xdist is installed: the Triton compilation is CPU-bound.
workers=$(python -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
# A session limit that still prints the report (pytest-timeout >= 2.3), else a hard one.
if python -m pytest --help 2>/dev/null | grep -q -- --session-timeout; then
  timeout_flag="--timeout 240 --session-timeout ${TESTS_TIMEOUT_S:-330}"
else
  timeout_flag=""
fi
timeout "$(( ${TESTS_TIMEOUT_S:-330} + 60 ))" python -m pytest -q -p no:cacheprovider $workers $timeout_flag --durations 15 -rfE tests > "$out/tests.txt" 2>&1
tail -40 "$out/tests.txt"

step compute-sanitizer
for tool in memcheck racecheck; do
  echo "### $tool" >> "$out/sanitizer.txt"
  timeout 150 compute-sanitizer --tool "$tool" python scripts/cuda_smoke.py >> "$out/sanitizer.txt" 2>&1
  tail -2 "$out/sanitizer.txt"
done

step benchmarks
# Autotuning every shape costs minutes of compiling; one launch config (recorded in meta.json).
FUSED_PREACT_TRITON_AUTOTUNE=0 FUSED_PREACT_ENABLE_CUDA_BACKEND=1 \
  python -m benchmarks.run --out "$out" --budget-s "${BENCH_BUDGET_S:-100}" 2>&1 | tail -3
python -m benchmarks.report "$out"
step done
tail -60 "$out/results.md"
