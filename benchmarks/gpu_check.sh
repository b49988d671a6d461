#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (torch, pytest-xdist, Lightning preinstalled):
# the whole suite on CUDA, then the CUDA table (raw / torcheras / Lightning; no callbacks and
# the typical set; data on the CPU and on the GPU; bf16-mixed, 16-mixed; jit_compile) on the
# launch-bound tiny MLP (one round: raw between every peer, 5 runs a row, fits in 260 s).
#   run: bash benchmarks/gpu_check.sh      results: $OUT/results_cuda.md (or benchmarks/)
set -u
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-benchmarks}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 300 python -m pytest -n 8 -q -p no:randomly -x 2>&1 | tail -25
# torchrun on NCCL: 2 ranks with a GPU each where there are 2 GPUs, else 1 rank; the ranks
# must end identical and equal (to float tolerance) to one process with the same global batch.
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
ranks=$(( gpus >= 2 ? 2 : 1 ))
ddp="$out/ddp_nccl"
rm -rf "$ddp"
timeout 120 python -m torch.distributed.run --standalone --nproc_per_node=$ranks \
    tests/distributed/ddp_script.py "$ddp/job" --device cuda --batch-size 85 2>&1 | tail -5
timeout 60 python tests/distributed/ddp_script.py "$ddp/single" --device cuda --batch-size 85 \
    2>&1 | tail -2
python - "$ddp" "$ranks" <<'EOF' | tee "$out/ddp_nccl.md"
import sys, torch
ddp, ranks = sys.argv[1], int(sys.argv[2])
load = lambda run, r: torch.load(f"{ddp}/{run}/result{r}/final.pt", map_location="cpu")
single = load("single", 0)["weights"]
for r in range(ranks):
    got = load("job", r)["weights"]
    diff = max((got[k] - single[k]).abs().max().item() for k in got)
    print(f"NCCL, {ranks} rank(s): rank {r} max |w - one process| = {diff:.2e}")
EOF
# FSDP2 on NCCL: the example under torchrun (2 GPUs: sharded over 2 ranks; 1 GPU: 1 rank)
timeout 120 python -m torch.distributed.run --standalone --nproc_per_node=$ranks \
    examples/fsdp_train.py --smoke --device cuda 2>&1 | tail -3
timeout 260 python benchmarks/peers.py --device cuda --workloads tiny --quick \
    --output "$out/results_cuda.md" 2>&1 | tail -25
