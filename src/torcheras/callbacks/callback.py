"""The base class of every callback: Keras's hooks, plus a few of our own."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Callback"]


class Callback:
    """Base class for callbacks. Override the hooks you need; every hook is a no-op here.

    Hooks receive ``logs``, a dict of Python floats (batch logs are read from the device only
    when you read a value). ``self.model`` is the model being trained and ``self.params`` holds
    ``{"verbose", "epochs", "steps"}``.

    Beyond Keras: ``on_after_backward(batch)`` fires when the gradients are ready,
    ``on_train_batches_end(epoch)`` after an epoch's last training batch,
    ``on_test_batch_outputs(batch, x, y, y_pred)`` with each evaluation batch's outputs,
    ``on_validation_end(step, logs)`` after each validation of ``fit(validation_interval=N)``,
    ``on_exception(exc)`` before an exception leaves ``fit``, and ``state_dict`` /
    ``load_state_dict`` make a resumed run decide exactly as an uninterrupted one.
    ``unused_hooks`` names the hooks an instance's settings leave idle, so that the loop
    does not call them (a batch hook costs a call per batch).

    Example:
        ```python
        class PrintLoss(Callback):
            def on_epoch_end(self, epoch, logs=None):
                print(f"epoch {epoch + 1}: loss={logs['loss']:.4f}")

        model.fit(x, y, epochs=3, callbacks=[PrintLoss()])
        ```
    """

    _model: Any = None
    params: dict[str, Any] = {}  # noqa: RUF012 - replaced (never mutated) by set_params

    @property
    def model(self) -> Any:
        model = self._model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return model.module
        return model

    @model.setter
    def model(self, model: Any) -> None:
        self._model = model

    # Under torchrun, a callback that only writes (a log, a progress bar) runs on rank 0 alone;
    # callbacks that decide (EarlyStopping...) run on every rank, on the same reduced logs.
    rank_zero_only: bool = False

    # The attributes that tell two callbacks of one class apart (a file, a monitored metric).
    state_key_attributes: tuple[str, ...] = ()

    # Hooks this instance overrides but its settings leave idle (a per-epoch ModelCheckpoint
    # has nothing to do per batch): the dispatcher never calls them. Set it in ``__init__``.
    unused_hooks: tuple[str, ...] = ()

    @property
    def state_key(self) -> str:
        """The name this callback's state is saved under in a backup: the class name plus
        the arguments that identify it, e.g. ``ModelCheckpoint(filepath='best.pt')``. A
        resumed script may add, drop or reorder callbacks and each state still finds its
        own; two callbacks with the same key are numbered (``...:2``) in list order."""
        name = type(self).__name__
        parts = [f"{a}={str(getattr(self, a, None))!r}" for a in self.state_key_attributes]
        return f"{name}({', '.join(parts)})" if parts else name

    def set_model(self, model: Any) -> None:
        self._model = model

    def set_params(self, params: dict[str, Any]) -> None:
        self.params = params

    # --- training -----------------------------------------------------------------------------
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        """Called once at the start of ``fit``."""

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        """Called once at the end of ``fit`` with the last epoch's logs (not after an error)."""

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Called at the start of each epoch (0-based ``epoch``)."""

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Called at the end of each epoch: train metrics, ``val_*`` and ``learning_rate``."""

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        """Called before each training batch; forwards to ``on_batch_begin``."""
        self.on_batch_begin(batch, logs=logs)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        """Called after each training batch with running means over the epoch so far."""
        self.on_batch_end(batch, logs=logs)

    def on_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        """Alias of ``on_train_batch_begin`` (training batches only)."""

    def on_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        """Alias of ``on_train_batch_end`` (training batches only)."""

    def on_after_backward(self, batch: int) -> None:
        """Called when the gradients of an optimizer step are complete (after the last
        backward of an accumulation group, unscaled under mixed precision), before clipping
        and the optimizer step."""

    def on_train_batches_end(self, epoch: int) -> None:
        """Called after the epoch's last training batch (and the optimizer step of a short
        last accumulation group), before validation and ``on_epoch_end``: the point to settle
        what batch hooks deferred, in time to stop training in this epoch."""

    def on_exception(self, exception: BaseException) -> None:
        """Called when an exception (KeyboardInterrupt too) is about to leave fit and co."""

    def on_validation_end(self, step: int, logs: dict[str, Any] | None = None) -> None:
        """Called after each validation pass of ``fit(validation_interval=N)``: every N
        optimizer steps inside the epochs and at the epochs' ends, each pass once. ``step``
        is the number of optimizer steps done (``model.loop.optimizer_steps``; the epoch is
        ``model.loop.epoch``); ``logs`` hold the validation results, ``val_``-prefixed.
        Never called without ``validation_interval`` (Keras's epoch-end validations go to
        ``on_epoch_end`` alone). EarlyStopping, ModelCheckpoint(save_best_only=True) and
        ReduceLROnPlateau watching a ``val_*`` key decide here then, not at epoch end."""

    # --- evaluation and prediction ------------------------------------------------------------
    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        """Called at the start of ``evaluate`` and of validation inside ``fit``."""

    def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
        """Called at the end of evaluation with the (unprefixed) results."""

    def on_test_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        """Called before each evaluation batch."""

    def on_test_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        """Called after each evaluation batch with running means."""

    def on_test_batch_outputs(self, batch: int, x: Any, y: Any, y_pred: Any) -> None:
        """Called after each evaluation batch (validation too) with its inputs, targets and
        the model's outputs from that same pass, still on the device: no second pass, no
        synchronisation. The outputs are those of the last call of the model itself in
        ``test_step`` (``self.call_on(x)`` or ``self(x)``, an overridden ``test_step`` too;
        not a call of a submodule alone). Only a callback that overrides it makes the loop
        capture outputs."""

    def on_predict_begin(self, logs: dict[str, Any] | None = None) -> None:
        """Called at the start of ``predict``."""

    def on_predict_end(self, logs: dict[str, Any] | None = None) -> None:
        """Called at the end of ``predict``."""

    def on_predict_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        """Called before each prediction batch."""

    def on_predict_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        """Called after each prediction batch; ``logs["outputs"]`` holds its predictions."""

    # --- stopping -----------------------------------------------------------------------------
    def stop_training(self, reason: str) -> None:
        """Stop ``fit`` after this batch or epoch (as ``self.model.stop_training = True``)
        and say why: ``History.stop_reason`` and a verbose fit's last line read
        ``"<ClassName>: <reason>"`` (the first reason given wins).

        Example:
            ```python
            class StopAtAccuracy(Callback):
                def on_epoch_end(self, epoch, logs=None):
                    if logs["accuracy"] > 0.99:
                        self.stop_training(f"accuracy {logs['accuracy']:.3f} > 0.99")
            ```
        """
        model = self.model
        model.stop_training = True
        if getattr(model, "stop_reason", None) is None:
            model.stop_reason = f"{type(self).__name__}: {reason}"

    # --- state for exact resume ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What this callback needs to decide after a resume as it would have without one."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
