"""ReduceLROnPlateau: lower the learning rate when a metric has stopped improving."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from torcheras.callbacks.callback import Callback
from torcheras.callbacks.monitor import Monitor
from torcheras.optimizers import get_learning_rate, set_learning_rate

__all__ = ["ReduceLROnPlateau"]


def optimizer_of(model: Any) -> torch.optim.Optimizer:
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        raise ValueError(
            "This callback changes the learning rate, but the model has no "
            "optimizer: call compile(optimizer=...) or set model.optimizer."
        )
    return optimizer


def log_learning_rate(model: Any, logs: dict[str, Any] | None) -> None:
    """Put the optimizer's learning rate in an epoch's ``logs`` as Keras's LR callbacks do,
    where the loop did not (``fit`` adds it itself; a hand-written loop driving a
    ``CallbackList`` may not): the rate the epoch ran with."""
    if logs is None or "learning_rate" in logs:
        return
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        logs["learning_rate"] = float(get_learning_rate(optimizer))


class ReduceLROnPlateau(Callback):
    """Multiply the learning rate by ``factor`` after ``patience`` epochs without improvement.

    Args:
        monitor: the log key to watch. Default ``"val_loss"``.
        factor: the multiplier, below 1. Default 0.1.
        patience: epochs without improvement before reducing. Default 10.
        verbose: 1 prints each reduction.
        mode: ``"auto"``, ``"min"`` or ``"max"``.
        min_delta: the smallest change that counts as an improvement. Default 1e-4.
        cooldown: epochs to wait after a reduction before counting again. Default 0.
        min_lr: the lower bound of the learning rate. Default 0.

    The rate of the first param group is reduced and ``min_lr`` bounds it; the other groups
    keep their ratio to it (:func:`torcheras.optimizers.set_learning_rate`). The epoch logs'
    ``learning_rate`` is the rate used during the epoch, before any reduction.

    With ``fit(validation_interval=N)`` and a ``val_*`` monitor it decides after every
    validation (``on_validation_end``), mid-epoch ones included: ``patience`` and
    ``cooldown`` count validations and a reduction applies from the next batch.

    Example:
        ```python
        reduce = ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2, min_lr=1e-5)
        model.fit(x, y, epochs=50, validation_split=0.2, callbacks=[reduce])
        ```
    """

    state_key_attributes = ("monitor",)

    def __init__(
        self,
        monitor: str = "val_loss",
        factor: float = 0.1,
        patience: int = 10,
        verbose: int = 0,
        mode: str = "auto",
        min_delta: float = 1e-4,
        cooldown: int = 0,
        min_lr: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if factor >= 1.0:
            raise ValueError(
                f"ReduceLROnPlateau does not support a factor >= 1.0. Received factor={factor}"
            )
        if not isinstance(patience, int) or patience < 0:
            raise ValueError(
                f"ReduceLROnPlateau: `patience` must be a non-negative integer; got {patience!r}."
            )
        self.monitor_state = Monitor("ReduceLROnPlateau", monitor, mode, min_delta)
        self.monitor = monitor
        self.factor = factor
        self.patience = patience
        self.verbose = verbose
        self.min_delta = min_delta
        self.cooldown = cooldown
        self.min_lr = min_lr
        self._reset()

    def _reset(self) -> None:
        self.best: float | None = None
        self.cooldown_counter = 0
        self.wait = 0

    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._reset()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        log_learning_rate(self.model, logs)  # before any reduction, as Keras's
        if not self.monitor_state.per_validation(self.params):
            self._check(epoch, logs)

    def on_validation_end(self, step: int, logs: dict[str, Any] | None = None) -> None:
        if self.monitor_state.per_validation(self.params):  # else a training key: per epoch
            self._check(getattr(getattr(self.model, "loop", None), "epoch", 0), logs)

    def _check(self, epoch: int, logs: dict[str, Any] | None) -> None:
        monitor = self.monitor_state
        monitor.resolve(self.model, logs)  # Keras's order: a typo raises, it is never ignored
        current = monitor.get(logs, warn_prefix="Learning rate reduction is conditioned on metric")
        if current is None:
            return
        if self.in_cooldown():
            self.cooldown_counter -= 1
            self.wait = 0
        if monitor.is_improvement(current, self.best):
            self.best = current
            self.wait = 0
        elif not self.in_cooldown():
            self.wait += 1
            if self.wait >= self.patience:
                self._reduce(epoch)

    def _reduce(self, epoch: int) -> None:
        optimizer = optimizer_of(self.model)
        old_lr = get_learning_rate(optimizer)
        if old_lr > np.float32(self.min_lr):
            new_lr = max(old_lr * self.factor, self.min_lr)
            set_learning_rate(optimizer, new_lr)  # the other param groups keep their ratio
            if self.verbose > 0:
                print(f"\nEpoch {epoch + 1}: ReduceLROnPlateau reducing learning rate to {new_lr}.")
            self.cooldown_counter = self.cooldown
            self.wait = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "cooldown_counter": self.cooldown_counter,
            "wait": self.wait,
            "monitor": self.monitor_state.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.wait = state["best"], state["wait"]
        self.cooldown_counter = state["cooldown_counter"]
        self.monitor_state.load_state_dict(state.get("monitor", {}))
