"""Per-rank memory of parameters, gradients and optimizer state: DDP against FSDP2, from the
storage sizes of the tensors each rank holds (a DTensor's local shard; a storage several
tensors view counted once), after a short fit with Adam.

    python benchmarks/fsdp_memory.py                 # N = 2 and 4, on the CPU (gloo)
    python benchmarks/fsdp_memory.py --ranks 2 --width 1024 --device cuda
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

WORKER = r"""
import json, os, sys
import torch, torcheras
width, device = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)

def total(tensors):
    storages = {}
    for t in tensors:
        s = (t.to_local() if hasattr(t, "to_local") else t).untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())

row = {}
for strategy in ("ddp", "fsdp"):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(16, width)]
    for _ in range(4):
        layers += [torch.nn.ReLU(), torch.nn.Linear(width, width)]
    model = torcheras.Model(torch.nn.Sequential(*layers, torch.nn.Linear(width, 4)))
    model.compile("adam", "sparse_categorical_crossentropy", device=device, strategy=strategy)
    x, y = torch.randn(256, 16), torch.randint(0, 4, (256,))
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    params = list(model.parameters())
    state = model.optimizer.state
    row[strategy] = {
        "parameters": total(params),
        "gradients": total([p.grad for p in params if p.grad is not None]),
        "optimizer": total([v for p in params for v in state[p].values()
                            if isinstance(v, torch.Tensor) and v.dim() > 0]),
    }
with open(os.path.join(sys.argv[3], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(row, f)
"""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import json

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    print(f"Linear layers of width {args.width}, Adam; bytes per rank (rank 0), FSDP / DDP:\n")
    print("| ranks | kind | DDP | FSDP | FSDP / DDP |")
    print("|---|---|---:|---:|---:|")
    for ranks in args.ranks:
        with tempfile.TemporaryDirectory() as tmp:
            script = os.path.join(tmp, "worker.py")
            with open(script, "w") as handle:
                handle.write(WORKER)
            done = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={ranks}", script, str(args.width), args.device, tmp],
                capture_output=True, text=True, env=env, timeout=600,
            )  # fmt: skip
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            with open(os.path.join(tmp, "rank0.json")) as f:
                row = json.load(f)
        for kind, ddp in row["ddp"].items():
            fsdp = row["fsdp"][kind]
            print(f"| {ranks} | {kind} | {ddp:,} | {fsdp:,} | {fsdp / ddp:.3f} (1/{ranks} = "
                  f"{1 / ranks:.3f}) |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
