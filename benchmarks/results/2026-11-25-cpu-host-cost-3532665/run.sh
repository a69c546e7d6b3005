#!/bin/bash
# host_cost at be474ce, 74c9c19 and 3532665 (each its own tool copy, a git worktree), three interleaved runs
for i in 1 2 3; do
  for pair in be474ce:<worktree of be474ce> 74c9c19:<worktree of 74c9c19> 3532665:<worktree of 3532665>; do
    c=${pair%%:*}; tree=${pair#*:}
    (cd $tree && TRITON_INTERPRET=1 PYTHONPATH=$tree python -m benchmarks.host_cost --out /tmp/hc_$c > /tmp/hc_$c.txt 2>&1)
    cp /tmp/hc_$c/host_cost.json <checkout>/benchmarks/results/2026-11-25-cpu-host-cost-3532665/$c-run$i.json
    echo "run $i $c: $(grep -E '^(basic|bottleneck|projection)' /tmp/hc_$c.txt | tr '\n' ' ')"
  done
done
