"""OptunaPruning: report a metric to an Optuna trial each epoch and stop the trials Optuna
prunes, on every rank at the same epoch."""

from __future__ import annotations

import os
from typing import Any

from torcheras import distributed
from torcheras.callbacks.callback import Callback
from torcheras.callbacks.monitor import Monitor

__all__ = ["OptunaPruning"]


class OptunaPruning(Callback):
    """Let an Optuna study stop the unpromising trials of a hyper-parameter search.

    After each epoch, ``logs[monitor]`` is reported to ``trial`` at ``step=epoch`` (0-based,
    as ``History.epoch``) and the trial's pruner is asked whether to stop. When it says so,
    training stops after that epoch (``History.stop_reason`` reads ``"OptunaPruning: trial 3
    pruned at epoch 4, val_loss=0.812"``), ``fit`` ends cleanly (every ``on_train_end`` runs,
    checkpoints land) and then raises Optuna's own ``optuna.TrialPruned``, which
    ``study.optimize`` records as a pruned trial. ``pruned_epoch`` is the 0-based epoch of the
    decision (None if the trial ran to the end). Whether a higher or lower value is better is
    the study's ``direction``.

    Under torchrun, rank 0 alone reports and asks the study; its decision is shared, so every
    rank stops at the same epoch and raises ``TrialPruned``. The other ranks never call the
    trial: they may pass whatever trial object they have, or None.

    Args:
        trial: the ``optuna.trial.Trial`` of this objective call (None on ranks other than 0).
        monitor: the log key to report (default ``"val_loss"``). A missing key warns with the
            available ones and reports nothing that epoch.

    Example:
        ```python
        def objective(trial):
            model = build(trial.suggest_float("lr", 1e-4, 1e-1, log=True))
            history = model.fit(x, y, epochs=20, validation_split=0.2,
                                callbacks=[OptunaPruning(trial, monitor="val_loss")])
            return history.history["val_loss"][-1]
        ```
    """

    state_key_attributes = ("monitor",)

    def __init__(self, trial: Any, monitor: str = "val_loss") -> None:
        if trial is None and int(os.environ.get("RANK", "0")) == 0:
            raise ValueError(
                "OptunaPruning: `trial` is None; pass the optuna Trial your objective "
                "receives (only ranks other than 0 under torchrun may pass None)."
            )
        if trial is not None and not (hasattr(trial, "report") and hasattr(trial, "should_prune")):
            raise ValueError(
                "OptunaPruning: `trial` must be an optuna Trial (with report() and "
                f"should_prune()); got {type(trial).__name__}."
            )
        self.monitor_state = Monitor("OptunaPruning", monitor)
        self.trial = trial
        self.monitor = monitor
        self.pruned_epoch: int | None = None
        self._deferred = False
        self._reason = ""

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.pruned_epoch = None
        self._deferred = False

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        main = distributed.is_main()
        if main and self.trial is None:
            raise ValueError("OptunaPruning: rank 0 needs the optuna Trial; got None.")
        current = self.monitor_state.get(
            logs, warn_prefix="Optuna pruning conditioned on metric" if main else None
        )
        prune = False
        if main and current is not None:
            self.trial.report(current, step=epoch)
            prune = bool(self.trial.should_prune())
        # Every rank takes part, every epoch: rank 0's decision reaches them all.
        if not distributed.agree(prune):
            return
        self.pruned_epoch = epoch
        number = getattr(self.trial, "number", None) if main else None
        trial = "trial" if number is None else f"trial {number}"
        shown = "" if current is None else f", {self.monitor}={current:.4g}"
        self._reason = f"{trial} pruned at epoch {epoch + 1}{shown}"
        self.stop_training(self._reason)
        loop = getattr(self.model, "loop", None)
        self._deferred = bool(getattr(loop, "running", False))
        if self._deferred:  # inside fit: raise once fit has ended cleanly
            loop.after_fit(self._raise_pruned)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.pruned_epoch is not None and not self._deferred:  # a hand-written loop
            self._raise_pruned()

    def _raise_pruned(self) -> None:
        import optuna

        raise optuna.TrialPruned(f"OptunaPruning: {self._reason}")
