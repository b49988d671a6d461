"""TerminateOnNaN: stop training when the loss becomes NaN or infinite."""

from __future__ import annotations

import math
from typing import Any

import torch

from torcheras.callbacks.callback import Callback

__all__ = ["TerminateOnNaN"]


class TerminateOnNaN(Callback):
    """Stop training when the training loss is NaN or infinite (checked every batch).

    Args:
        raise_error: raise a RuntimeError at once (``on_train_end`` is then not called)
            instead of setting ``model.stop_training`` (the epoch then finishes: validation and
            ``on_epoch_end`` run). Default False.

    On the CPU the check reads the loss each batch, which costs nothing. On CUDA it does not
    stall the GPU: the finiteness flag is copied to pinned host memory without blocking and read
    once that copy has finished, normally at the next batch, so the stop comes one batch late.

    Example::

        model.fit(x, y, epochs=10, callbacks=[TerminateOnNaN()])
    """

    def __init__(self, raise_error: bool = False) -> None:
        self.raise_error = raise_error
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor, Any]] = []

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._pending = []

    def on_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        if "loss" not in logs:
            return
        raw = logs.raw("loss") if hasattr(logs, "raw") else logs["loss"]
        if isinstance(raw, torch.Tensor) and raw.device.type == "cuda":
            self._check_async(batch, raw)
        else:
            self._check(batch, float(raw))

    def _check_async(self, batch: int, loss: torch.Tensor) -> None:
        flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        flag.copy_(torch.isfinite(loss.detach()), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((batch, flag, loss.detach(), event))
        while self._pending and self._pending[0][3].query():
            done_batch, done_flag, done_loss, _ = self._pending.pop(0)
            if not bool(done_flag):
                self._check(done_batch, float(done_loss))
                self._pending.clear()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        for done_batch, done_flag, done_loss, event in self._pending:  # settle what is left
            event.synchronize()
            if not bool(done_flag):
                self._check(done_batch, float(done_loss))
                break
        self._pending = []

    def _check(self, batch: int, loss: float) -> None:
        if math.isnan(loss) or math.isinf(loss):
            if self.raise_error:
                raise RuntimeError(
                    f"NaN or Inf loss encountered at batch {batch}. Loss value: "
                    f"{loss}. Terminating training immediately."
                )
            print(f"Batch {batch}: Invalid loss, terminating training")
            self.model.stop_training = True
