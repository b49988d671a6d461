"""TerminateOnNaN: stop training when the loss becomes NaN or infinite."""

from __future__ import annotations

import math
from typing import Any

import torch

from torcheras.callbacks.callback import Callback
from torcheras.logs import BatchLogs, _as_floats

__all__ = ["TerminateOnNaN"]

# Batches kept unread at most: beyond this the callback reads once (one sync per this many).
MAX_UNREAD = 1024
# The same where the loss is on the CPU and reading it waits for nothing: kept batch logs are
# few enough that they die young (hundreds kept would be promoted by Python's garbage
# collector and make it sweep every object of the process now and then: ~1-2% of a small
# model's training time).
CPU_UNREAD = 32


class TerminateOnNaN(Callback):
    """Stop training when the training loss is NaN or infinite.

    Args:
        raise_error: raise a RuntimeError (``on_train_end`` is then not called) instead of
            setting ``model.stop_training`` (the epoch then finishes: validation and
            ``on_epoch_end`` run). Default False.

    As in Keras, the loss checked is the one in the batch logs (as the callbacks before this
    one left it): the running mean of the epoch, which stays NaN (or infinite) from the batch
    where a bad loss appeared. Unlike Keras, the check never stalls the device: it reads the
    newest loss only after every 1024 batches (32 on the CPU, where a read waits for nothing),
    when somebody read the logs anyway (the progress bar, at most every 0.1 s), and after the
    epoch's last batch, before validation; when that loss is bad, it finds the batch where it
    first went bad. Inside ``fit``, when no other callback has a batch-end hook (with
    ``verbose=0``: the progress bar has one), it keeps each batch's loss instead of its logs
    and rebuilds the running means only when the newest is bad (``model.loop.watch_loss``):
    no batch logs are built at all. The message names
    the batch where the loss first went bad, the History and the epoch where training stops
    are Keras's. The difference: the batches run between that batch and the check, whose
    weights are NaN; a batch-level save in between
    (``BackupAndRestore(save_freq=N)``, ``ModelCheckpoint(save_freq=N)``) holds them. With
    ``raise_error=True`` on the CPU every batch is checked (free there), so the error comes
    at the bad batch, before any later save, as in Keras.

    Example:
        ```python
        model.fit(x, y, epochs=10, callbacks=[TerminateOnNaN()])
        ```
    """

    def __init__(self, raise_error: bool = False) -> None:
        self.raise_error = raise_error
        self._unread: list[tuple[int, Any]] = []
        self._max_unread = MAX_UNREAD
        self._watch: Any = None  # fit's loss watch (LossWatch), when fit could give one

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._unread = []
        device = getattr(self.model, "device", None)
        on_cpu = isinstance(device, torch.device) and device.type == "cpu"
        # raise_error on the CPU: at the bad batch itself, before a later callback saves
        self._max_unread = (1 if self.raise_error else CPU_UNREAD) if on_cpu else MAX_UNREAD
        loop = getattr(self.model, "loop", None)
        running = getattr(loop, "running", False) is True  # inside fit (not a loop of yours)
        watchable = running and not self._own_batch_hook()
        self._watch = loop.watch_loss(self, self._max_unread, self._check) if watchable else None

    def _own_batch_hook(self) -> bool:
        """A subclass's (or an instance's) own batch-end hook, which must still be called."""
        cls = type(self)
        return (
            cls.on_batch_end is not TerminateOnNaN.on_batch_end
            or cls.on_train_batch_end is not Callback.on_train_batch_end
            or "on_batch_end" in vars(self)
            or "on_train_batch_end" in vars(self)
        )

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._watch = None  # the fit's, let go of with it

    def on_exception(self, exception: BaseException) -> None:
        self._watch = None

    def on_train_batches_end(self, epoch: int) -> None:
        self._settle()  # after the epoch's last batch, before validation

    def on_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._watch is not None:  # fit's watch sees every batch's loss already
            return
        if type(logs) is not BatchLogs:  # plain floats (a hand-written loop): check now
            if logs and "loss" in logs:
                self._check(batch, float(logs["loss"]))
            return
        unread = self._unread
        if unread and unread[-1][1].materialized:  # read already: checking it is free
            self._settle()
            unread = self._unread
        unread.append((batch, logs))
        if len(unread) >= self._max_unread:
            self._settle()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._settle()  # a hand-written loop has no end-of-batches point: check here

    def _settle(self) -> None:
        """Read the newest unread loss (one value; every value when a callback edited some);
        if it is bad, find the first bad batch."""
        unread, self._unread = self._unread, []  # empty while fit's watch runs: fit checks
        if not unread:
            return
        if not any(logs.edited for _, logs in unread):  # the loop's values, none edited
            newest = unread[-1][1]
            if "loss" not in newest or math.isfinite(float(newest.raw("loss"))):
                return  # the epoch's running mean is finite: so was every one before it
        unread = [entry for entry in unread if "loss" in entry[1]]
        if not unread:
            return
        values = _as_floats([logs.raw("loss") for _, logs in unread])  # float64: one read
        finite = [math.isfinite(v) for v in values]
        if all(finite):  # edited values, every one finite
            return
        first = finite.index(False)
        self._check(unread[first][0], values[first])

    def _check(self, batch: int, loss: float) -> None:
        if math.isnan(loss) or math.isinf(loss):
            if self.raise_error:
                raise RuntimeError(
                    f"NaN or Inf loss encountered at batch {batch}. Loss value: "
                    f"{loss}. Terminating training immediately."
                )
            print(f"Batch {batch}: Invalid loss, terminating training")
            epoch = getattr(getattr(self.model, "loop", None), "epoch", None)
            where = f"batch {batch}" if epoch is None else f"epoch {epoch + 1}, batch {batch}"
            self.stop_training(f"loss was {loss} at {where}")
