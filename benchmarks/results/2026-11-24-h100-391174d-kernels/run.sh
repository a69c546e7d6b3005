#!/usr/bin/env bash
# Third GPU call: conv kernels (triton, cuda WMMA, cuda CuTe sm80) vs cuDNN; compile test alone.
set -u
export PYTHONUNBUFFERED=1
start=$SECONDS
python -m pip install -q --no-index --no-deps --target /tmp/cutlass-site .whl/nvidia_cutlass-*.whl && export PYTHONPATH=/tmp/cutlass-site
python -m pip install --no-build-isolation --no-deps -e . > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
echo "== [$((SECONDS-start)) s] kernels"
export FUSED_PREACT_TRITON_AUTOTUNE=0
timeout 140 python -m benchmarks.kernels --out $OUT/kernels --cases r18-s1-id,in-r50-56,in-r50-28,in-r50-14 --dtypes bf16 2>&1 | tail -45
echo "== [$((SECONDS-start)) s] compile fullgraph test alone"
timeout 90 python -m pytest -q -p no:cacheprovider --timeout 85 -rfE tests/test_integration.py -k "fullgraph" 2>&1 | tail -4
echo "== [$((SECONDS-start)) s] done"
