"""Two ways to build a model, as in Keras's Functional API and Model subclassing:

1. a graph of modules with two inputs (an image and a table of numbers) merged into one
   head, wrapped in ``torcheras.Model``: ``fit`` gets ``(x_image, x_table)`` tuples;
2. a subclass of ``torcheras.Model`` with its own layers, ``forward`` and a custom
   ``train_step`` (here: an extra penalty on the logits, logged with ``self.log``).

    python examples/functional_and_subclass.py [--smoke]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import torcheras


class TwoInputs(nn.Module):
    """Functional style: an image branch and a tabular branch, concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten())
        self.table = nn.Sequential(nn.Linear(2, 8), nn.ReLU())
        self.head = nn.Linear(8 * 8 * 8 + 8, 10)

    def forward(self, image: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.image(image), self.table(table)], dim=1))


class PenalisedClassifier(torcheras.Model):
    """Subclassing: layers as attributes, forward, and a train_step of our own."""

    def __init__(self, penalty: float = 1e-3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        self.penalty = penalty

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def train_step(self, batch):
        x, y, _ = torcheras.data.unpack(batch)
        self.optimizer.zero_grad()
        logits = self(x)
        loss = self.compute_loss(x, y, logits)
        logit_penalty = self.penalty * logits.pow(2).mean()
        self.backward(loss + logit_penalty)
        self.optimizer_step()
        self.update_metrics(logits, y)
        self.log("logit_penalty", logit_penalty.detach())
        return {"loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="2 epochs each: a quick check")
    args = parser.parse_args()
    epochs = 2 if args.smoke else 15
    torch.manual_seed(0)
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    # a second input: each image's mean ink and its left-right asymmetry
    table = np.stack(
        [images.mean(axis=(1, 2, 3)), (images - images[..., ::-1]).std(axis=(1, 2, 3))], axis=1
    ).astype(np.float32)
    y = digits.target.astype(np.int64)

    functional = torcheras.Model(TwoInputs())
    functional.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    history = functional.fit((images, table), y, epochs=epochs, validation_split=0.2, verbose=0)
    print(f"functional: val_accuracy {history.history['val_accuracy'][-1]:.4f}")

    subclassed = PenalisedClassifier()
    subclassed.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    history = subclassed.fit(images, y, epochs=epochs, validation_split=0.2, verbose=0)
    print(
        f"subclassed: val_accuracy {history.history['val_accuracy'][-1]:.4f}, "
        f"logit_penalty {history.history['logit_penalty'][-1]:.5f}"
    )


if __name__ == "__main__":
    main()
