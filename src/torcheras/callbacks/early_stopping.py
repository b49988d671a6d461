"""EarlyStopping: stop training when a monitored metric has stopped improving."""

from __future__ import annotations

from typing import Any

from torcheras import distributed
from torcheras.callbacks.callback import Callback
from torcheras.callbacks.monitor import Monitor
from torcheras.state import is_sharded

__all__ = ["EarlyStopping", "get_weights", "set_weights"]


def get_weights(model: Any) -> Any:
    """A detached copy of the weights of a torcheras Model or a plain nn.Module; of a model
    sharded by FSDP, each rank's own shards (kept at the shards' cost, not gathered)."""
    if hasattr(model, "get_weights") and not is_sharded(model):
        return model.get_weights()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def set_weights(model: Any, weights: Any) -> None:
    if hasattr(model, "set_weights"):
        model.set_weights(weights)
    else:
        model.load_state_dict(weights)


class EarlyStopping(Callback):
    """Stop training when ``monitor`` has not improved for ``patience`` epochs (Keras's rules).

    Args:
        monitor: the log key to watch. Default ``"val_loss"``.
        min_delta: the smallest change that counts as an improvement (sign ignored). Default 0.
        patience: epochs without improvement before stopping; 0 and 1 behave the same. Default 0.
        verbose: 1 prints when it stops and when it restores. Default 0.
        mode: ``"auto"`` (from the metric), ``"min"`` or ``"max"``.
        baseline: a value to beat; the wait is only reset by epochs that also beat it.
        restore_best_weights: at the end of training, restore the best epoch's weights
            (also when training was not stopped early). Default False.
        start_from_epoch: epochs to ignore at the start (warm-up). Default 0.

    After training: ``stopped_epoch`` (0-based, 0 if it never stopped), ``best``,
    ``best_epoch`` and ``wait``.

    With ``fit(validation_interval=N)`` and a ``val_*`` monitor it decides after every
    validation (``on_validation_end``), mid-epoch ones included: ``patience`` counts
    validations, the first validation never stops training, ``start_from_epoch`` still
    counts epochs, and ``stopped_step`` / ``best_step`` give the optimizer steps (None
    otherwise). A stop ends training after the batch that validated.

    Example:
        ```python
        stop = EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True)
        model.fit(x, y, epochs=100, validation_split=0.2, callbacks=[stop])
        print(stop.stopped_epoch, stop.best)
        ```
    """

    state_key_attributes = ("monitor",)

    def __init__(
        self,
        monitor: str = "val_loss",
        min_delta: float = 0.0,
        patience: int = 0,
        verbose: int = 0,
        mode: str = "auto",
        baseline: float | None = None,
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
    ) -> None:
        if not isinstance(patience, int) or patience < 0:
            raise ValueError(
                f"EarlyStopping: `patience` must be a non-negative integer; got {patience!r}."
            )
        if not isinstance(start_from_epoch, int) or start_from_epoch < 0:
            raise ValueError(
                f"EarlyStopping: `start_from_epoch` must be a non-negative integer; "
                f"got {start_from_epoch!r}."
            )
        self.monitor_state = Monitor("EarlyStopping", monitor, mode, min_delta, baseline)
        self.monitor = monitor
        self.min_delta = self.monitor_state.min_delta
        self.patience = patience
        self.verbose = verbose
        self.baseline = baseline
        self.restore_best_weights = restore_best_weights
        self.start_from_epoch = start_from_epoch
        self._reset()

    def _reset(self) -> None:
        self.wait = 0
        self.stopped_epoch = 0
        self.best: float | None = None
        self.best_weights: Any = None
        self.best_epoch = 0
        self.best_step: int | None = None
        self.stopped_step: int | None = None
        self.validations = 0

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._reset()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.monitor_state.per_validation(self.params):
            return  # decided after each validation (on_validation_end)
        self._check(epoch, epoch, logs)

    def on_validation_end(self, step: int, logs: dict[str, Any] | None = None) -> None:
        if not self.monitor_state.per_validation(self.params):
            return  # a training key: watched per epoch
        epoch = getattr(getattr(self.model, "loop", None), "epoch", 0)
        self._check(self.validations, epoch, logs, step)
        self.validations += 1

    def _check(
        self, index: int, epoch: int, logs: dict[str, Any] | None, step: int | None = None
    ) -> None:
        """Keras's epoch-end rule; ``index``: the epoch, or the validation's number."""
        monitor = self.monitor_state
        monitor.resolve(self.model, logs)  # Keras's order: a typo raises, it is never ignored
        current = monitor.get(logs, warn_prefix="Early stopping conditioned on metric")
        if current is None or epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights = get_weights(self.model)  # so there is always something to restore
            self.best_epoch, self.best_step = epoch, step
        self.wait += 1
        if monitor.is_improvement(current, self.best):
            self.best = current
            self.best_epoch, self.best_step = epoch, step
            if self.restore_best_weights:
                self.best_weights = get_weights(self.model)
            if monitor.improves_on_baseline(current):
                self.wait = 0
            return
        if self.wait >= self.patience and index > 0:
            self.stopped_epoch, self.stopped_step = epoch, step
            self.stop_training(self._reason())

    def _reason(self) -> str:
        unit = "epoch" if self.stopped_step is None else "validation"
        epochs = unit if self.wait == 1 else f"{unit}s"
        if self.best is None or not self.monitor_state.improves_on_baseline(self.best):
            why = f"{self.monitor} did not improve on the baseline {self.baseline:g} for "
            why += f"{self.wait} {epochs}"
        else:
            why = f"{self.monitor} did not improve for {self.wait} {epochs}"
        best_at = f"epoch {self.best_epoch + 1}"
        if self.best_step is not None:
            best_at = f"step {self.best_step} ({best_at})"
        if self.best is not None:
            why += f"; best {self.best:.4g} at {best_at}"
        if self.restore_best_weights and self.best_weights is not None:
            why += f"; weights restored from {best_at}"
        return why

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.verbose > 0 and self.stopped_step is not None:
            print(f"Step {self.stopped_step} (epoch {self.stopped_epoch + 1}): early stopping")
        elif self.stopped_epoch > 0 and self.verbose > 0:
            print(f"Epoch {self.stopped_epoch + 1}: early stopping")
        if self.restore_best_weights and self.best_weights is not None:
            if self.verbose > 0:
                where = f"the end of the best epoch: {self.best_epoch + 1}"
                if self.best_step is not None:
                    where = f"the best validation: step {self.best_step}"
                print(f"Restoring model weights from {where}.")
            set_weights(self.model, self.best_weights)

    def state_dict(self) -> dict[str, Any]:
        state = {
            "wait": self.wait,
            "stopped_epoch": self.stopped_epoch,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "monitor": self.monitor_state.state_dict(),
        }
        if self.validations:  # fit(validation_interval=N)
            state.update(
                validations=self.validations,
                best_step=self.best_step,
                stopped_step=self.stopped_step,
            )
        if self.best_weights is not None:
            state["best_weights"] = {  # whole tensors (FSDP's shards gathered): any world size
                k: distributed.whole(v).detach().cpu() for k, v in self.best_weights.items()
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wait, self.stopped_epoch = state["wait"], state["stopped_epoch"]
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.monitor_state.load_state_dict(state.get("monitor", {}))
        self.best_weights = state.get("best_weights")
        self.validations = state.get("validations", 0)
        self.best_step, self.stopped_step = state.get("best_step"), state.get("stopped_step")
