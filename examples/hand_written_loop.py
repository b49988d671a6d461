"""Your own training loop, driven by torcheras callbacks through CallbackList.

python examples/hand_written_loop.py
"""

from __future__ import annotations

import sys
import tempfile

import torch

from torcheras.callbacks import CallbackList, CSVLogger, EarlyStopping, ModelCheckpoint


def main() -> None:
    torch.manual_seed(0)
    epochs = 5 if "--smoke" in sys.argv else 50
    x, y = torch.randn(400, 5), torch.randn(400, 1)
    x_val, y_val = torch.randn(100, 5), torch.randn(100, 1)
    net = torch.nn.Linear(5, 1)
    net.optimizer = torch.optim.SGD(net.parameters(), lr=0.05)  # saved in full checkpoints
    folder = tempfile.mkdtemp()
    callbacks = CallbackList(
        [
            EarlyStopping(patience=2, restore_best_weights=True, verbose=1),
            ModelCheckpoint(f"{folder}/best.pt", save_best_only=True),
            CSVLogger(f"{folder}/log.csv"),
        ],
        add_history=True,
        model=net,
        epochs=epochs,
        steps=8,
    )
    net.stop_training = False
    callbacks.on_train_begin()
    for epoch in range(epochs):
        callbacks.on_epoch_begin(epoch)
        for batch in range(8):
            callbacks.on_train_batch_begin(batch)
            xb, yb = x[batch * 50 : (batch + 1) * 50], y[batch * 50 : (batch + 1) * 50]
            loss = torch.nn.functional.mse_loss(net(xb), yb)
            net.optimizer.zero_grad()
            loss.backward()
            net.optimizer.step()
            callbacks.on_train_batch_end(batch, {"loss": loss.detach()})
        with torch.no_grad():
            val_loss = torch.nn.functional.mse_loss(net(x_val), y_val)
        callbacks.on_epoch_end(epoch, {"loss": loss.item(), "val_loss": val_loss.item()})
        if net.stop_training:
            break
    callbacks.on_train_end()
    print(f"trained {len(net.history.epoch)} epochs; best model and log.csv in {folder}")


if __name__ == "__main__":
    main()
