"""How the files in format_v1/ and format_v2/ were made: ``python make_files.py FOLDER``, run
with the release that wrote that format (format 1: before ModelCheckpoint wrote saved models).

Kept as they are, so that today's loaders are tested against what users already have:
``model.pt`` (model.save), ``checkpoint.pt`` (a full ModelCheckpoint file: kind "checkpoint"
in format 1, "model" in format 2), ``weights.pt`` (weights only), ``backup.pt`` (a mid-epoch
BackupAndRestore backup). A new format adds a folder made the same way.
"""

import contextlib
import os
import shutil
import sys

import torch
from torch import nn

import torcheras
from torcheras import callbacks

out = sys.argv[1]
torch.manual_seed(0)
x = torch.randn(24, 4)
y = (x.sum(1) > 0).long()
model = torcheras.Model(nn.Sequential(nn.Linear(4, 3)))
model.compile(
    "adam", "sparse_categorical_crossentropy", metrics=["accuracy"], device="cpu", ema_momentum=0.9
)


class Stop(callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if self.model.loop.global_step == 4:
            raise KeyboardInterrupt


backup = os.path.join(out, "backup")
with contextlib.suppress(KeyboardInterrupt):
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=[
        callbacks.ModelCheckpoint(os.path.join(out, "checkpoint.pt")),
        callbacks.ModelCheckpoint(os.path.join(out, "weights.pt"), save_weights_only=True),
        callbacks.BackupAndRestore(backup, save_freq=1, delete_checkpoint=False),
        Stop(),
    ])  # fmt: skip
shutil.move(os.path.join(backup, "latest.pt"), os.path.join(out, "backup.pt"))
shutil.rmtree(backup)
model.save(os.path.join(out, "model.pt"))
torch.save({"x": x, "y": y, "weights": model.state_dict()}, os.path.join(out, "expected.pt"))
