"""Resume exactly after a crash: run this twice; the first run dies half-way.

python examples/resume_after_a_crash.py runs/resume-example   # crashes at batch 25
python examples/resume_after_a_crash.py runs/resume-example   # resumes at the last backup
"""

from __future__ import annotations

import os
import sys

import torch

import torcheras
from torcheras.callbacks import BackupAndRestore, Callback, CSVLogger


class CrashOnce(Callback):
    """Simulates a crash the first time the script runs."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def on_train_batch_end(self, batch, logs=None):
        if self.model.loop.global_step == 25 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)  # dies like a killed process: no cleanup at all


def main(folder: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(320, 8)
    y = (x.sum(1) > 0).long()
    model = torcheras.Model(
        torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 2))
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    os.makedirs(folder, exist_ok=True)
    history = model.fit(
        x,
        y,
        epochs=4,
        batch_size=32,
        verbose=0,
        callbacks=[
            BackupAndRestore(os.path.join(folder, "backup"), save_freq=5),
            CSVLogger(os.path.join(folder, "log.csv")),
            CrashOnce(os.path.join(folder, "crashed-once")),
        ],
    )
    print("epochs:", history.epoch, "final accuracy:", round(history.history["accuracy"][-1], 4))


if __name__ == "__main__":
    folders = [a for a in sys.argv[1:] if a != "--smoke"]  # --smoke: it is quick already
    main(folders[0] if folders else "runs/resume-example")
