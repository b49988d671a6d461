"""LearningRateScheduler: set the learning rate from a schedule, per epoch or per batch."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from torcheras.callbacks.callback import Callback
from torcheras.callbacks.reduce_lr_on_plateau import log_learning_rate, optimizer_of
from torcheras.optimizers import get_learning_rate, set_learning_rate

__all__ = ["LearningRateScheduler"]


class LearningRateScheduler(Callback):
    """Set the learning rate at the start of each epoch (or batch) from ``schedule``.

    Args:
        schedule: ``schedule(epoch, lr) -> float`` (0-based epoch, current rate of the first
            param group), or the one-argument ``schedule(epoch)``; see
            :mod:`torcheras.schedules` for ready ones. The value goes to the first param group
            and the others keep their ratio to it; NaN, inf or a non-number is a ValueError.
            Beyond Keras, a ``torch.optim.lr_scheduler`` object built on the model's optimizer,
            stepped after each epoch (or batch).
        verbose: 1 prints each new rate.
        interval: ``"epoch"`` (default) or ``"batch"``. With a function and ``"batch"``, the
            first argument is the global batch index. With ``gradient_accumulation_steps``,
            "batch" means an optimizer step: the schedule counts and acts once per group.

    With ReduceLROnPlateau: a schedule that scales the ``lr`` it receives (``lr * 0.9``), and
    torch's chainable schedulers (StepLR, ExponentialLR...), keep the plateau reductions; a
    schedule that returns absolute values overrides them at its next step.

    Example:
        ```python
        LearningRateScheduler(lambda epoch, lr: lr if epoch < 10 else lr * 0.9)
        LearningRateScheduler(torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=1000),
                              interval="batch")
        ```
    """

    def __init__(self, schedule: Any, verbose: int = 0, interval: str = "epoch") -> None:
        if interval not in ("epoch", "batch"):
            raise ValueError(
                f"LearningRateScheduler: `interval` must be 'epoch' or 'batch'; got {interval!r}."
            )
        if isinstance(schedule, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise ValueError(
                "LearningRateScheduler cannot step torch's ReduceLROnPlateau (it "
                "needs a metric): use torcheras.callbacks.ReduceLROnPlateau."
            )
        self.is_torch_scheduler = isinstance(schedule, torch.optim.lr_scheduler.LRScheduler)
        if not self.is_torch_scheduler and not callable(schedule):
            raise ValueError(
                "LearningRateScheduler: `schedule` must be a function "
                "schedule(epoch, lr) or a torch.optim.lr_scheduler object; got "
                f"{type(schedule).__name__}."
            )
        self.schedule = schedule
        self.verbose = verbose
        self.interval = interval
        self.global_step = 0
        self.applied_epoch: int | None = None
        self.unused_hooks = (
            ("on_train_batch_begin", "on_train_batch_end")
            if interval == "epoch"
            else ("on_epoch_begin", "on_epoch_end")
        )

    def _apply(self, step: int, label: str) -> None:
        optimizer = optimizer_of(self.model)
        current = get_learning_rate(optimizer)
        try:
            lr = self.schedule(step, current)
        except TypeError:  # the one-argument form, schedule(epoch)
            lr = self.schedule(step)
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr):
            name = getattr(self.schedule, "__name__", type(self.schedule).__name__)
            where = "batch" if self.interval == "batch" else "epoch"
            raise ValueError(
                f"The output of the `schedule` function should be a float. Got: {lr!r} from "
                f"schedule {name!r} at {where} {step} (0-based). Return a finite number, "
                "e.g. `return lr * 0.9`."
            )
        set_learning_rate(optimizer, float(lr))  # the other param groups keep their ratio
        if self.verbose > 0:
            print(f"\n{label}: LearningRateScheduler setting learning rate to {float(lr)}.")

    def _step_torch(self, label: str) -> None:
        self.schedule.step()
        if self.verbose > 0:
            print(
                f"\n{label}: LearningRateScheduler setting learning rate to "
                f"{self.schedule.get_last_lr()[0]}."
            )

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.applied_epoch = None
        if self.is_torch_scheduler and self.schedule.optimizer is not optimizer_of(self.model):
            raise ValueError(
                "LearningRateScheduler: the torch scheduler is bound to another optimizer than "
                "the model's, so stepping it would not change the rate used for training. Build "
                "it on model.optimizer (after compile): "
                "torch.optim.lr_scheduler.StepLR(model.optimizer, step_size=10)."
            )

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        # A run resumed mid-epoch already has this epoch's rate: do not apply it twice.
        if not self.is_torch_scheduler and epoch != self.applied_epoch:
            self._apply(epoch, f"Epoch {epoch + 1}")
            self.applied_epoch = epoch

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        log_learning_rate(self.model, logs)  # the epoch's rate, as Keras's (a loop's own)
        if self.is_torch_scheduler:
            self._step_torch(f"Epoch {epoch + 1}")

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        loop = getattr(self.model, "loop", None)
        if not self.is_torch_scheduler and (loop is None or loop.micro_step == 0):
            self._apply(self.global_step, f"Batch {self.global_step}")

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        loop = getattr(self.model, "loop", None)
        if loop is not None and loop.accumulating:  # per batch means per optimizer step
            return
        if self.is_torch_scheduler:
            self._step_torch(f"Batch {self.global_step}")
        self.global_step += 1

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "global_step": self.global_step,
            "applied_epoch": self.applied_epoch,
        }
        if self.is_torch_scheduler:
            state["scheduler"] = self.schedule.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_step = state["global_step"]
        self.applied_epoch = state.get("applied_epoch")
        if self.is_torch_scheduler and "scheduler" in state:
            self.schedule.load_state_dict(state["scheduler"])
