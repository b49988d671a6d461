"""A custom callback: gradient norms per epoch, read without a device sync per batch.

python examples/custom_callback.py
"""

from __future__ import annotations

import torch

import torcheras
from torcheras.callbacks import Callback


class GradientNorm(Callback):
    """Track the largest gradient norm of each epoch (gradients are ready after backward)."""

    def on_epoch_begin(self, epoch, logs=None):
        self.norms = []

    def on_after_backward(self, batch):
        grads = [p.grad.norm() for p in self.model.parameters() if p.grad is not None]
        self.norms.append(torch.stack(grads).norm())  # stays on the device

    def on_epoch_end(self, epoch, logs=None):
        largest = torch.stack(self.norms).max().item()  # one read per epoch
        print(f"epoch {epoch + 1}: loss {logs['loss']:.4f}, largest gradient norm {largest:.3f}")


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 10)
    y = (x[:, 0] > 0).long()
    model = torcheras.Model(
        torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=3, verbose=0, callbacks=[GradientNorm()])


if __name__ == "__main__":
    main()
