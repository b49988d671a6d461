"""Resume exactly after a crash: run this twice; the first run dies half-way.

python examples/resume_after_a_crash.py runs/resume-example   # crashes at step 25, exit code 1
python examples/resume_after_a_crash.py runs/resume-example   # resumes at the last backup
python examples/resume_after_a_crash.py --smoke               # both runs in one command

``--smoke`` runs the first run in a child process (which crashes), resumes in this one, then
trains once more without a crash and checks that the resumed weights are the same.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import torch

import torcheras
from torcheras.callbacks import BackupAndRestore, Callback, CSVLogger

CRASH_STEP = 25


class CrashOnce(Callback):
    """Simulates a crash the first time the script runs in a folder."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def on_train_batch_end(self, batch, logs=None):
        if self.model.loop.global_step == CRASH_STEP and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            print(
                f"Simulated crash at training step {CRASH_STEP}: the process dies as a killed "
                "one does (exit code 1, no cleanup). Run the same command again: it resumes "
                "from the last backup.",
                file=sys.stderr,
                flush=True,
            )
            os._exit(1)  # dies like a killed process: no cleanup at all


def train(folder: str, crash: bool = True) -> torcheras.Model:
    torch.manual_seed(0)
    x = torch.randn(320, 8)
    y = (x.sum(1) > 0).long()
    model = torcheras.Model(
        torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 2))
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    os.makedirs(folder, exist_ok=True)
    callbacks = [
        BackupAndRestore(os.path.join(folder, "backup"), save_freq=5),
        CSVLogger(os.path.join(folder, "log.csv")),
    ]
    if crash:
        callbacks.append(CrashOnce(os.path.join(folder, "crashed-once")))
    history = model.fit(x, y, epochs=4, batch_size=32, verbose=0, callbacks=callbacks)
    print("epochs:", history.epoch, "final accuracy:", round(history.history["accuracy"][-1], 4))
    return model


def smoke(folder: str) -> None:
    """Both runs in one command: a child process crashes, this one resumes."""
    os.makedirs(folder, exist_ok=True)
    for leftover in ("crashed-once", "backup"):  # start afresh, so that the first run crashes
        path = os.path.join(folder, leftover)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    first = subprocess.run([sys.executable, os.path.abspath(__file__), folder])
    if first.returncode != 1:
        sys.exit(f"The first run should have crashed (exit code 1); it exited {first.returncode}.")
    print("first run: crashed as planned (exit code 1); resuming from the backup")
    resumed = train(folder)
    print("an uninterrupted run, for comparison:")
    uninterrupted = train(os.path.join(folder, "uninterrupted"), crash=False)
    same = all(
        torch.equal(a, b)
        for a, b in zip(resumed.state_dict().values(), uninterrupted.state_dict().values())
    )
    print("resumed weights identical to the uninterrupted run's:", same)
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    folders = [a for a in sys.argv[1:] if a != "--smoke"]
    if "--smoke" in sys.argv:
        smoke(folders[0] if folders else tempfile.mkdtemp(prefix="resume-example-"))
    else:
        train(folders[0] if folders else "runs/resume-example")
