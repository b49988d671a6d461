"""Launch a short 2-process torchrun fit many times and count the launches that did not
exit cleanly (an abort at exit, "terminate called without an active exception", shows as a
non-zero exit code of a run that trained to the end).

    python benchmarks/torchrun_exits.py --launches 200
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time

SCRIPT = """
import sys, torch, torcheras
from torcheras import callbacks as cb
torch.manual_seed(0)
torch.set_num_threads(1)
x, y = torch.randn(128, 6), torch.randint(0, 3, (128,))
model = torcheras.Model(torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                            torch.nn.Linear(8, 3)))
model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
model.fit(x, y, epochs=2, batch_size=32, validation_split=0.25, verbose=0,
          callbacks=[cb.ModelCheckpoint(sys.argv[1] + "/best.pt", save_best_only=True),
                     cb.BackupAndRestore(sys.argv[1] + "/backup")])
print("trained", flush=True)
"""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--launches", type=int, default=200)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHERAS_DIST_TIMEOUT": "60"}
    outcomes: collections.Counter[str] = collections.Counter()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "fit.py")
        with open(script, "w") as handle:
            handle.write(SCRIPT)
        for i in range(args.launches):
            out = os.path.join(tmp, f"run{i}")
            os.makedirs(out)
            done = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node=2", script, out],
                capture_output=True, text=True, env=env, timeout=300,
            )  # fmt: skip
            trained = done.stdout.count("trained") == 2
            if done.returncode == 0 and trained:
                outcomes["clean"] += 1
            else:
                key = f"exit {done.returncode}, trained={trained}"
                outcomes[key] += 1
                tail = [line for line in done.stderr.splitlines() if line.strip()][-6:]
                print(f"launch {i}: {key}", *tail, sep="\n  ", flush=True)
    took = time.perf_counter() - started
    print(f"{args.launches} launches in {took:.0f} s: {dict(outcomes)}")
    return 0 if outcomes["clean"] == args.launches else 1


if __name__ == "__main__":
    sys.exit(main())
