#!/usr/bin/env bash
# benchmarks.sass at dc1ea69, triton 3.6 (the GPU machines' version, a separate venv), sm_90, bf16:
# each GPU block case with the benchmark's one launch config (4 warps, 3 stages) and with 8 warps.
set -e
cd "<checkout>"
for case in r18-s1-id r18-s2-proj r18-s2-id r18-s3-id in-r50-56 in-r50-28 in-r50-14 in-r50-28-proj; do
  python -m benchmarks.sass --case $case --json "$OUT/$case-config.json" > "$OUT/$case-config.txt"
  python -m benchmarks.sass --case $case --warps 8 --json "$OUT/$case-8warps.json" > "$OUT/$case-8warps.txt"
done
