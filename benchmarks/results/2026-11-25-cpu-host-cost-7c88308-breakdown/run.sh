#!/bin/bash
# host_cost with the layers of a basic block forward, at 7c88308, on this 2-core VM
TRITON_INTERPRET=1 python -m benchmarks.host_cost --breakdown --out <this folder>
