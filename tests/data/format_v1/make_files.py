"""Writes the files today's release (format version 1) produces, for tests/data/format_v1."""
import os, shutil, sys, signal
import numpy as np, torch
from torch import nn
import torcheras
from torcheras import callbacks

out = sys.argv[1]
torch.manual_seed(0)
x = torch.randn(24, 4); y = (x.sum(1) > 0).long()
net = nn.Sequential(nn.Linear(4, 3))
model = torcheras.Model(net)
model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"], device="cpu", ema_momentum=0.9)

class Stop(callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if self.model.loop.global_step == 4:
            raise KeyboardInterrupt
backup = os.path.join(out, "backup")
try:
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=[
        callbacks.ModelCheckpoint(os.path.join(out, "checkpoint.pt")),
        callbacks.ModelCheckpoint(os.path.join(out, "weights.pt"), save_weights_only=True),
        callbacks.BackupAndRestore(backup, save_freq=1, delete_checkpoint=False), Stop()])
except KeyboardInterrupt:
    pass
shutil.move(os.path.join(backup, "latest.pt"), os.path.join(out, "backup.pt"))
shutil.rmtree(backup)
model.save(os.path.join(out, "model.pt"))
torch.save({"x": x, "y": y, "weights": model.state_dict()}, os.path.join(out, "expected.pt"))
