"""The same script on one process or several: torchrun launches it, torcheras does the rest.

python examples/ddp_train.py                                  # one process
torchrun --standalone --nproc_per_node=2 examples/ddp_train.py  # two processes (gloo on CPU)

Under torchrun, `fit` joins the process group, wraps the network in DistributedDataParallel,
gives each rank its half of every batch of 64 (the global batch, as in one process), and
reduces the logs over the ranks before any callback sees them: EarlyStopping decides the same
on every rank, and only rank 0 prints and writes files.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
from sklearn.datasets import load_digits

import torcheras
from torcheras.callbacks import CSVLogger, EarlyStopping, ModelCheckpoint

torch.manual_seed(0)  # the same seed on every rank: the same initial weights and order
digits = load_digits()
x = (digits.data / 16.0).astype("float32")
y = digits.target.astype("int64")

net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
model = torcheras.Model(net)
model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"], device="cpu")
folder = os.environ.get("EXAMPLE_OUT") or tempfile.mkdtemp()
history = model.fit(
    x,
    y,
    batch_size=64,
    epochs=3 if "--smoke" in sys.argv else 8,
    validation_split=0.2,
    verbose=2,
    callbacks=[
        EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True),
        ModelCheckpoint(os.path.join(folder, "best.pt"), save_best_only=True),
        CSVLogger(os.path.join(folder, "log.csv")),
    ],
)
rank = int(os.environ.get("RANK", "0"))
print(f"rank {rank}: trained {len(history.epoch)} epochs, "
      f"val_accuracy {history.history['val_accuracy'][-1]:.3f}")  # fmt: skip
