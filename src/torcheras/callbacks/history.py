"""History: every epoch's logs, returned by ``fit``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torcheras import checkpoint
from torcheras.callbacks.callback import Callback

__all__ = ["History"]


class History(Callback):
    """Records the logs of every epoch. ``fit`` adds one (a new one per fit) and returns it.

    ``history.history`` maps each log key to a list of values (a key seen in some epochs
    only, such as ``val_loss`` with ``validation_freq=2``, has a shorter list);
    ``history.epoch`` lists the 0-based epochs of the last fit; ``history.stop_reason``
    says why that fit stopped before its last epoch, naming the callback, where and why
    (``"EarlyStopping: val_loss did not improve for 3 epochs; best 0.412 at epoch 7"``), or is
    None when every epoch ran.

    With ``fit(validation_interval=N)``, ``history.validation_history`` records every
    validation (mid-epoch ones and the epochs' ends) in the same shape: ``"step"`` (optimizer
    steps done), ``"epoch"`` (0-based) and the ``val_*`` keys, one value per validation, so
    ``pandas.DataFrame(history.validation_history)`` is a table of them. Empty otherwise.

    Example:
        ```python
        history = model.fit(x, y, epochs=5, validation_split=0.2)
        best = min(history.history["val_loss"])
        ```
    """

    def __init__(self) -> None:
        self.history: dict[str, list[Any]] = {}
        self.epoch: list[int] = []
        self.validation_history: dict[str, list[Any]] = {}
        self.stop_reason: str | None = None
        self._hyperparameters: dict[str, Any] = {}

    def set_model(self, model: Any) -> None:
        super().set_model(model)
        if hasattr(model, "__dict__"):
            self.model.history = self  # as Keras: model.history is the History of the fit

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.epoch = []
        self.stop_reason = None
        self._hyperparameters = hyperparameters(self.model)  # as training starts (the LR too)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epoch.append(epoch)
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(value)

    def on_validation_end(self, step: int, logs: dict[str, Any] | None = None) -> None:
        epoch = getattr(getattr(self.model, "loop", None), "epoch", None)
        for key, value in {"step": step, "epoch": epoch, **(logs or {})}.items():
            self.validation_history.setdefault(key, []).append(value)

    def plot(self, path: str | os.PathLike[str] | None = None, monitor: str | None = None) -> Any:
        """Draw loss and every metric (train against validation), the learning rate on its
        own axis, the best epoch (by ``monitor``: ``val_loss``, else ``loss``) and where
        training stopped; save to ``path`` (PNG/SVG/PDF) when given. Returns the matplotlib
        ``Figure`` (needs the ``plot`` extra).

        Example:
            ```python
            history = model.fit(x, y, epochs=20, validation_split=0.2)
            history.plot("curves.png")
            ```
        """
        from torcheras import plots

        curves = plots.curves_from_history(self.history, self.epoch)
        return plots.plot_curves(curves, monitor=monitor, stop_reason=self.stop_reason, path=path)

    def save(self, path: str | os.PathLike[str]) -> Path | str:
        """Write the logs, the stop reason, ``fit``'s parameters and the model's
        hyper-parameters (compile settings, optimizer settings, parameter count) as JSON:
        what ``torcheras report`` reads besides the CSV and the checkpoints. ``path`` may be
        a URL (``"s3://bucket/run/history.json"``, through fsspec)."""
        record = {
            "history": self.history,
            "epoch": self.epoch,
            "stop_reason": self.stop_reason,
            **({"validation_history": self.validation_history} if self.validation_history else {}),
            "params": {k: v for k, v in self.params.items() if _is_plain(v)},
            "hyperparameters": self._hyperparameters
            or (hyperparameters(self.model) if self._model is not None else {}),
        }
        text = json.dumps(record, indent=2, default=str)
        return checkpoint.atomic_write(
            path, lambda f: f.write(text.encode("utf-8")), every_rank=True
        )

    def state_dict(self) -> dict[str, Any]:
        state = {
            "history": {k: list(v) for k, v in self.history.items()},
            "epoch": list(self.epoch),
        }
        if self.validation_history:
            state["validation_history"] = {k: list(v) for k, v in self.validation_history.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {k: list(v) for k, v in state["history"].items()}
        self.epoch = list(state["epoch"])
        saved = state.get("validation_history", {})
        self.validation_history = {k: list(v) for k, v in saved.items()}


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


# torch optimizer settings that choose an implementation, not the training
_IMPLEMENTATION_FLAGS = {"params", "foreach", "fused", "capturable", "differentiable", "maximize"}


def hyperparameters(model: Any) -> dict[str, Any]:
    """The settings that describe a training run: compile settings that are names, the
    optimizer's class and per-group settings (learning rate, betas, weight decay...), and the
    parameter count."""
    out: dict[str, Any] = {}
    config = getattr(model, "_compile_config", None) or {}
    out.update(
        {
            k: v
            for k, v in config.items()
            if k != "complete" and (_is_plain(v) or isinstance(v, (list, tuple)))
        }
    )
    if out.get("loss") is None and getattr(model, "compiled_loss", None) is not None:
        out["loss"] = getattr(model.compiled_loss, "name", type(model.compiled_loss).__name__)
    precision = getattr(getattr(model, "precision", None), "mode", None)
    if precision is not None:
        out["precision"] = precision
    for attr in ("gradient_accumulation_steps", "jit_compile"):
        value = getattr(model, attr, None)
        if value is not None and _is_plain(value):
            out[attr] = value
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        out["optimizer"] = type(optimizer).__name__
        for i, group in enumerate(optimizer.param_groups):
            prefix = "" if len(optimizer.param_groups) == 1 else f"group{i}."
            for key, value in group.items():
                if key in _IMPLEMENTATION_FLAGS or value is None:
                    continue
                if hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:
                    value = value.item()
                if _is_plain(value) or isinstance(value, tuple):
                    out[f"{prefix}{key}"] = value
    if hasattr(model, "parameters"):
        out["parameters"] = sum(p.numel() for p in model.parameters())
    return out
