"""A training script for the resume tests: run it, kill it, run it again.

python train_script.py WORKDIR [--kill-at N] [--kill-how batch|epoch|save|sigterm|sigint]
                       [--save-freq epoch|N] [--double] [--validation-interval N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import numpy as np
import torch

import torcheras
from torcheras import callbacks as cb
from torcheras import checkpoint

parser = argparse.ArgumentParser()
parser.add_argument("workdir")
parser.add_argument("--kill-at", type=int, default=-1)
parser.add_argument("--kill-how", default="batch")
parser.add_argument("--save-freq", default="1")
parser.add_argument("--double", action="store_true")
parser.add_argument("--validation-interval", type=int, default=None)
args = parser.parse_args()
save_freq = "epoch" if args.save_freq == "epoch" else int(args.save_freq)
work = args.workdir

torch.set_num_threads(1)
torch.manual_seed(0)
np.random.seed(0)
g = torch.Generator().manual_seed(123)
x = torch.randn(200, 8, generator=g)
y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()

net = torch.nn.Sequential(
    torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 3)
)
model = torcheras.Model(net)
model.compile(
    "adam",
    "sparse_categorical_crossentropy",
    metrics=["accuracy"],
    device="cpu",
    learning_rate=0.05,
)


class Killer(cb.Callback):
    """Kills this process at a chosen point, as a crash or a preemption would; counts the
    batches this process really trained (a resumed run trains only what was left)."""

    batches_run = 0

    def on_train_batch_end(self, batch, logs=None):
        Killer.batches_run += 1
        if self.model.loop.global_step == args.kill_at:
            if args.kill_how == "batch":
                checkpoint.wait_for_writes()  # the kill comes after the last backup landed
                os.kill(os.getpid(), signal.SIGKILL)
            if args.kill_how in ("sigterm", "sigint"):
                os.kill(
                    os.getpid(), signal.SIGTERM if args.kill_how == "sigterm" else signal.SIGINT
                )

    def on_epoch_begin(self, epoch, logs=None):
        if args.kill_how == "epoch" and epoch == args.kill_at:
            checkpoint.wait_for_writes()
            os.kill(os.getpid(), signal.SIGKILL)

    def on_exception(self, exception):
        print(f"on_exception: {type(exception).__name__}", flush=True)


if args.kill_how == "save" and args.kill_at >= 0:
    real_atomic_write = checkpoint.atomic_write
    saves = {"n": 0}

    def dying_write(path, write):
        if str(path).endswith("latest.pt"):
            saves["n"] += 1
            if saves["n"] == args.kill_at:

                def half(f):
                    import io

                    buffer = io.BytesIO()
                    write(buffer)
                    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                    f.flush()
                    os.kill(os.getpid(), signal.SIGKILL)

                return real_atomic_write(path, half)
        return real_atomic_write(path, write)

    checkpoint.atomic_write = dying_write

callbacks = [
    cb.BackupAndRestore(
        os.path.join(work, "backup"), save_freq=save_freq, double_checkpoint=args.double
    ),
    cb.EarlyStopping(monitor="val_loss", patience=20, restore_best_weights=True),
    cb.ReduceLROnPlateau(monitor="val_loss", patience=1, factor=0.5),
    cb.ModelCheckpoint(os.path.join(work, "best.pt"), save_best_only=True),
    cb.CSVLogger(os.path.join(work, "log.csv")),
    cb.TensorBoard(os.path.join(work, "tb"), update_freq=3, write_graph=False),
    Killer(),
]
interval = (
    {} if args.validation_interval is None else {"validation_interval": args.validation_interval}
)
history = model.fit(
    x, y, epochs=5, batch_size=16, validation_split=0.2, verbose=0, callbacks=callbacks, **interval
)
torch.save(model.state_dict(), os.path.join(work, "final.pt"))
with open(os.path.join(work, "history.json"), "w") as f:
    json.dump(
        {
            "history": history.history,
            "epoch": history.epoch,
            "batches_run": Killer.batches_run,
            "validation_history": history.validation_history,
        },
        f,
    )
print("finished", flush=True)
sys.exit(0)
