"""How the files in this folder were made: by the release of format 2.

Kept as they are, so that later loaders are tested against what users have: ``model.pt``
(model.save), ``checkpoint.pt`` (a full ModelCheckpoint file, kind "model"), ``weights.pt``
(weights only), ``backup.pt`` (a mid-epoch BackupAndRestore backup).
``python make_files.py FOLDER``.
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
