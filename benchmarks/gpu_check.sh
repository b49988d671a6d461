#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (torch, pytest-xdist, Lightning preinstalled):
# the whole suite on CUDA, then the CUDA table (raw / torcheras / Lightning; no callbacks and
# the typical set; data on the CPU and on the GPU; bf16-mixed, 16-mixed; jit_compile).
#   run: bash benchmarks/gpu_check.sh      results: $OUT/results_cuda.md (or benchmarks/)
set -u
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-benchmarks}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 300 python -m pytest -n 8 -q -p no:randomly -x 2>&1 | tail -25
timeout 260 python benchmarks/peers.py --device cuda --workloads tiny,cnn --quick \
    --output "$out/results_cuda.md" 2>&1 | tail -25
