#!/usr/bin/env bash
# Everything that needs a GPU (the 2026-11-24 H100 runs: build 60 s, the whole test suite 380 s with
# 15 workers, conformance + test_gpu alone 122 s, sanitizer 30 s, profile 30 s, headline +
# tiny-overhead blocks in bf16 65 s, benchmarks.kernels 60 s; on 2026-11-22 the PreActResNet-18
# step 77 s and ResNet-164 164 s more). A session has 15 minutes of device time in all, a machine's
# start included, and 10 minutes per call: the most that fits one call of about 8 minutes, with the
# nvidia-cutlass wheel carried in .whl (see the build step) and timeout_s 600:
#   PACK=$OUT/gpu_all.tar.gz STEPS="tests kernels profile bench" TESTS_TIMEOUT_S=200 \
#   TESTS="tests/test_triton.py tests/test_conformance.py tests/test_gpu.py tests/test_convert.py" \
#   BENCH_CASES=r18-s1-id,tiny-overhead BENCH_DTYPES=bf16 bash scripts/gpu_all.sh /tmp/gpu_all
# (test_convert.py: the drop-path and avg_down blocks, never yet on a GPU, in float32 on the device, the
# exact-float32 Triton kernels included as tests/conftest.py asks; test_gpu.py has them in bf16 / fp16)
# and, with the time left, on the same warm machine (the build is kept):
#   PACK=$OUT/sanitizer.tar.gz STEPS=sanitizer bash scripts/gpu_all.sh /tmp/gpu_sanitizer
# build the extension in place, run the whole test suite on the GPU (the Triton tests
# run compiled; tests/test_gpu.py checks the cuda backend too), compute-sanitizer on a
# small run of each GPU backend's kernels (scripts/sanitizer_smoke.py), then the benchmark suite and its report. No network needed.
#   bash scripts/gpu_all.sh OUT_FOLDER
# STEPS (default "tests sanitizer profile kernels bench"): which steps run after the build, so a
# later call can spend its minutes on the benchmark sweep alone.
# BENCH_BUDGET_S (default 60): seconds after which the benchmark starts no new case
# (the rest is recorded as skipped, most important cases first). BENCH_CASES / BENCH_DTYPES:
# comma lists for benchmarks.run --cases / --dtypes (default: all); BENCH_ARGS: more of its options
# (e.g. --max-autotune, --no-models, --modes fwd,fwdbwd,fwd-input-grad: an attack step too). PROFILE_CASES (default
# "r18-s1-id tiny-overhead"): blocks for benchmarks.profile --host. KERNEL_CASES: block cases for
# benchmarks.kernels (default: the headline and the ImageNet ResNet-50 stages), into OUT/kernels;
# KERNEL_ARGS: more of its options (e.g. --weights default --dtypes bf16). TESTS (default "tests"): test paths
# for the tests step, TESTS_K a pytest -k expression to select within them; TESTS_TIMEOUT_S (420): their limit
# (the whole suite took 380 s with 15 workers on an H100 machine at 5eeb180, 8 workers did not finish in 330 s).
# PACK (optional): a .tar.gz that holds everything OUT_FOLDER has so far, rewritten before each step and at
# the end. A device call brings back at most 8 files from $OUT, and this script writes more (logs, results
# of several steps), so give it a folder outside $OUT and PACK=$OUT/gpu_all.tar.gz: a call stopped by its
# time limit still brings back every step it finished.
set -uo pipefail
out=${1:?usage: gpu_all.sh OUT_FOLDER}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
steps=" ${STEPS:-tests sanitizer profile kernels bench} "
start=$SECONDS
pack() { if [[ -n ${PACK:-} ]]; then tar -czf "$PACK.part" -C "$out" . && mv "$PACK.part" "$PACK"; fi; }
step() { pack; echo "== [$((SECONDS - start)) s] $*"; }
wanted() { [[ $steps == *" $1 "* ]]; }

step build
# The CuTe kernels need nvidia-cutlass's headers (a build requirement; the GPU image lacks it
# and has no network): carry its wheel in .whl/ (echo /.whl/ >> .git/info/exclude; pip download
# --no-deps -d .whl nvidia-cutlass==4.2.0.0; name .whl in the run's carry).
if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('cutlass_library') is None)"; then
  python -m pip install -q --no-index --no-deps --target /tmp/cutlass-site .whl/nvidia_cutlass-*.whl \
    || { echo "no nvidia-cutlass here: carry its wheel in .whl/ (see above)"; exit 1; }
  export PYTHONPATH=/tmp/cutlass-site${PYTHONPATH:+:$PYTHONPATH}
fi
python -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
python -m fused_preact.info | tee "$out/info.txt"

if wanted tests; then
step tests
# Parallel workers where pytest-xdist is installed: the Triton compilation is CPU-bound.
workers=$(python -c "import xdist" 2>/dev/null && echo "-n 15" || echo "")
# A session limit that still prints the report (pytest-timeout >= 2.3), else a hard one.
if python -m pytest --help 2>/dev/null | grep -q -- --session-timeout; then
  timeout_flag="--timeout 240 --session-timeout ${TESTS_TIMEOUT_S:-420}"
else
  timeout_flag=""
fi
# SIGINT at the hard limit: pytest still prints its summary of failures (a plain kill printed none).
timeout -s INT "$(( ${TESTS_TIMEOUT_S:-420} + 30 ))" python -m pytest -q -p no:cacheprovider $workers $timeout_flag --durations 15 -rfE ${TESTS_K:+-k "$TESTS_K"} ${TESTS:-tests} > "$out/tests.txt" 2>&1
tail -40 "$out/tests.txt"
fi

if wanted sanitizer; then
step compute-sanitizer
# First without a sanitizer: its errors undisturbed, and Triton's kernels compiled (cached) so
# that the sanitized runs only launch them.
timeout 300 python scripts/sanitizer_smoke.py triton > "$out/smoke-triton.txt" 2>&1; tail -3 "$out/smoke-triton.txt"
for backend in cuda triton; do
  for tool in memcheck racecheck; do
    echo "### $tool $backend" >> "$out/sanitizer.txt"
    timeout 200 compute-sanitizer --tool "$tool" python scripts/sanitizer_smoke.py "$backend" >> "$out/sanitizer.txt" 2>&1
    tail -2 "$out/sanitizer.txt"
  done
done
fi

# Autotuning every shape costs minutes of compiling; one launch config (recorded in meta.json).
export FUSED_PREACT_TRITON_AUTOTUNE=0 FUSED_PREACT_ENABLE_CUDA_BACKEND=1

if wanted profile; then
step profile
for case in ${PROFILE_CASES:-r18-s1-id tiny-overhead}; do
  timeout 120 python -m benchmarks.profile --case "$case" --host >> "$out/profile.txt" 2>&1
done
grep "wall" "$out/profile.txt"
fi

if wanted kernels; then
step "conv kernels vs cuDNN (benchmarks.kernels)"
timeout 240 python -m benchmarks.kernels --out "$out/kernels" ${KERNEL_CASES:+--cases "$KERNEL_CASES"} ${KERNEL_ARGS:-} 2>&1 | tail -30
fi

if wanted bench; then
step benchmarks
python -m benchmarks.run --out "$out" --budget-s "${BENCH_BUDGET_S:-60}" \
  ${BENCH_CASES:+--cases "$BENCH_CASES"} ${BENCH_DTYPES:+--dtypes "$BENCH_DTYPES"} ${BENCH_ARGS:-} 2>&1 | tail -3
python -m benchmarks.report "$out"
tail -60 "$out/results.md"
fi
step done
