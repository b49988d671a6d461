"""Callbacks written from scratch: custom logging, a custom early-stopping rule, saving
predictions, and recording misclassified samples (what the built-in PredictionLogger does,
by hand).

    python examples/custom_callbacks.py [OUT_DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import csv
import os

import torch

import torcheras
from torcheras.callbacks import Callback


class GradientNormLogger(Callback):
    """Custom logging: the largest gradient norm of each epoch, kept on the device until the
    epoch ends (one read per epoch, not one per batch)."""

    def on_epoch_begin(self, epoch, logs=None):
        self.norms = []

    def on_after_backward(self, batch):
        grads = [p.grad.norm() for p in self.model.parameters() if p.grad is not None]
        self.norms.append(torch.stack(grads).norm())

    def on_epoch_end(self, epoch, logs=None):
        largest = torch.stack(self.norms).max().item()
        print(f"epoch {epoch + 1}: loss {logs['loss']:.4f}, largest gradient norm {largest:.3f}")


class StopWhenGapWidens(Callback):
    """A custom early-stopping rule: stop when validation loss exceeds training loss by more
    than ``max_gap`` for ``patience`` epochs in a row (overfitting), and say why."""

    def __init__(self, max_gap: float = 0.1, patience: int = 2):
        self.max_gap, self.patience = max_gap, patience

    def on_train_begin(self, logs=None):
        self.strikes = 0

    def on_epoch_end(self, epoch, logs=None):
        gap = logs["val_loss"] - logs["loss"]
        self.strikes = self.strikes + 1 if gap > self.max_gap else 0
        if self.strikes >= self.patience:
            self.stop_training(f"val_loss - loss = {gap:.3f} > {self.max_gap} for "
                               f"{self.patience} epochs")  # fmt: skip

    def state_dict(self):  # so that a resumed run (BackupAndRestore) decides the same
        return {"strikes": self.strikes}

    def load_state_dict(self, state):
        self.strikes = state["strikes"]


class SavePredictions(Callback):
    """Save the model's predictions on a fixed batch after every epoch (one file per epoch)."""

    def __init__(self, x, folder):
        self.x, self.folder = x, folder

    def on_epoch_end(self, epoch, logs=None):
        predictions = self.model.predict(self.x, verbose=0)
        os.makedirs(self.folder, exist_ok=True)
        torch.save(torch.as_tensor(predictions), f"{self.folder}/epoch{epoch + 1:02d}.pt")


class RecordMisclassified(Callback):
    """Record the misclassified validation samples of the last epoch to a CSV."""

    def __init__(self, x_val, y_val, path):
        self.x_val, self.y_val, self.path = x_val, y_val, path

    def on_train_end(self, logs=None):
        predicted = torch.as_tensor(self.model.predict(self.x_val, verbose=0)).argmax(dim=1)
        wrong = (predicted != self.y_val).nonzero().flatten().tolist()
        with open(self.path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "target", "prediction"])
            writer.writerows([i, int(self.y_val[i]), int(predicted[i])] for i in wrong)
        print(f"{len(wrong)} misclassified validation samples -> {self.path}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?", default="runs/custom-callbacks")
    parser.add_argument("--smoke", action="store_true", help="3 epochs: a quick check")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(600, 10)
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.3 * torch.randn(600) > 0).long()  # some label noise
    x_train, y_train, x_val, y_val = x[:150], y[:150], x[150:], y[150:]  # few: it overfits
    model = torcheras.Model(
        torch.nn.Sequential(torch.nn.Linear(10, 128), torch.nn.ReLU(), torch.nn.Linear(128, 2))
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"],
                  learning_rate=0.01)  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    history = model.fit(
        x_train, y_train,
        epochs=3 if args.smoke else 100,
        batch_size=16,
        validation_data=(x_val, y_val),
        verbose=0,
        callbacks=[
            GradientNormLogger(),
            StopWhenGapWidens(max_gap=0.1, patience=2),
            SavePredictions(x_val[:8], os.path.join(args.out, "predictions")),
            RecordMisclassified(x_val, y_val, os.path.join(args.out, "misclassified.csv")),
        ],
    )  # fmt: skip
    print(f"stopped: {history.stop_reason or 'all epochs ran'}")


if __name__ == "__main__":
    main()
