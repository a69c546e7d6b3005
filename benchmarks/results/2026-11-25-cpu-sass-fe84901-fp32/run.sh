#!/usr/bin/env bash
# benchmarks.sass at fe84901 with float32 tensors (tf32 dots), triton 3.6 (a separate venv),
# sm_90 and sm_80, the headline and the ImageNet 56x56 bottleneck, the benchmark's one config:
# what a float32 (no autocast) training step runs.
set -e
cd "<checkout>"
for arch in 90 80; do
  for case in r18-s1-id in-r50-56; do
    python -m benchmarks.sass --case $case --arch $arch --dtype fp32 --json "$OUT/fe84901-sm$arch-$case-fp32.json" \
      > "$OUT/fe84901-sm$arch-$case-fp32.txt"
  done
done
