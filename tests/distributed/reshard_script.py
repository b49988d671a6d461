"""Training under torchrun (or alone) with BackupAndRestore, for test_resharding.py: killed with
kill -9, then rerun on another number of processes.

    torchrun --standalone --nproc_per_node=N reshard_script.py OUT [--sharded] [--kill-at STEP]
                                                            [--dropout] [--strategy fsdp]

Each rank saves what it ended with under OUT/result<rank>/ (the full weights, gathered when
the model is sharded, the History and the batches it trained).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
import torcheras  # noqa: E402
from torcheras import callbacks as cb  # noqa: E402
from torcheras import checkpoint, state  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--sharded", action="store_true")
parser.add_argument("--kill-at", type=int, default=-1, help="kill -9 of the whole job at a step")
parser.add_argument("--dropout", action="store_true", help="training draws random numbers")
parser.add_argument("--strategy", default=None)
parser.add_argument("--loader", action="store_true", help="a DataLoader instead of arrays")
parser.add_argument("--kill-renaming", default=None, help="kill -9 as this folder gets its name")
args = parser.parse_args()
if args.kill_renaming:  # the moment every shard is written, before the folder is named
    rename = os.rename

    def rename_or_die(source, target):
        if os.path.basename(target) == args.kill_renaming:
            os.kill(os.getpid(), signal.SIGKILL)
        rename(source, target)

    os.rename = rename_or_die
rank = int(os.environ.get("RANK", "0"))
torch.manual_seed(0)
np.random.seed(0)
torch.set_num_threads(1)

rng = np.random.default_rng(0)
x = rng.normal(size=(96, 6)).astype("float32")
y = (x[:, 0] + x[:, 1] > 0).astype("int64") + (x[:, 2] > 1).astype("int64")
layers: list[torch.nn.Module] = [torch.nn.Linear(6, 16), torch.nn.Tanh()]
if args.dropout:
    layers.append(torch.nn.Dropout(0.2))
net = torch.nn.Sequential(*layers, torch.nn.Linear(16, 3))
model = torcheras.Model(net)
extra = {} if args.strategy is None else {"strategy": args.strategy}
model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"], device="cpu",
              learning_rate=0.02, **extra)  # fmt: skip
trained: list[int] = []
callbacks = [
    cb.BackupAndRestore(
        os.path.join(args.out, "backup"), save_freq=2, sharded=args.sharded or None
    ),
    cb.LambdaCallback(
        on_train_batch_end=lambda batch, logs: trained.append(model.loop.global_step)
    ),
]


def kill_job(batch, logs):
    if model.loop.global_step != args.kill_at or rank != 0:
        return
    checkpoint.wait_for_writes()  # the backup at this step has landed (rank 0 renamed it)
    if "RANK" in os.environ:  # the whole job: every worker and the torchrun agent
        parent = os.getppid()
        for pid in os.listdir("/proc"):
            if pid.isdigit() and int(pid) != os.getpid():
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == parent:
                            os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError, IndexError):
                    pass
        os.kill(parent, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


callbacks.append(cb.LambdaCallback(on_train_batch_end=kill_job))
seen: dict[int, list[int]] = {}  # steps done when a sample was loaded -> the samples


class Recorded(torch.utils.data.Dataset):
    def __len__(self):
        return len(x)

    def __getitem__(self, i):
        seen.setdefault(model.loop.global_step, []).append(int(i))
        return torch.as_tensor(x[i]), torch.as_tensor(y[i])


if args.loader:  # the global batch of 16: a DistributedSampler's 16 / N per process
    data = {"x": torch.utils.data.DataLoader(Recorded(), batch_size=16, shuffle=True)}
else:
    data = {"x": x, "y": y, "batch_size": 16}  # the global batch, whatever the processes
history = model.fit(**data, epochs=3, verbose=0, callbacks=callbacks)
weights = state.own_weights(model)  # gathered whole when sharded (rank 0's)
os.makedirs(os.path.join(args.out, f"result{rank}"), exist_ok=True)
torch.save({"weights": weights}, os.path.join(args.out, f"result{rank}", "final.pt"))
with open(os.path.join(args.out, f"result{rank}", "history.json"), "w") as f:
    json.dump({"history": history.history, "trained": trained, "seen": seen}, f)
