"""The shared logic of monitoring callbacks: which key, which direction, what counts as better.

EarlyStopping, ModelCheckpoint and ReduceLROnPlateau each hold a :class:`Monitor`
(composition): one place for ``mode``, ``min_delta``, ``baseline``, the "auto" direction and
the "metric missing" warning.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Mapping
from typing import Any

from torcheras import metrics as metrics_lib

__all__ = ["Monitor"]


class Monitor:
    """Tracks one monitored log key for the callback ``owner`` (used in messages).

    ``mode="auto"`` takes the direction from the compiled metric (``model.metric_direction``),
    then from the name (``loss`` and ``*_loss`` minimise, accuracy-like names maximise); if
    neither decides, the first check raises a ValueError asking for ``mode="min"``/``"max"``.

    >>> m = Monitor("EarlyStopping", "val_loss", mode="auto", min_delta=0.1)
    >>> m.resolve(None); m.is_improvement(0.5, None), m.is_improvement(0.45, 0.5)
    (True, False)
    """

    def __init__(
        self,
        owner: str,
        monitor: str,
        mode: str = "auto",
        min_delta: float = 0.0,
        baseline: float | None = None,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(
                f"{owner}: `monitor` must be a log key such as 'val_loss'; got {monitor!r}."
            )
        if mode not in ("auto", "min", "max"):
            warnings.warn(f"{owner} mode '{mode}' is unknown, fallback to auto mode.", stacklevel=3)
            mode = "auto"
        self.owner = owner
        self.monitor = monitor
        self.mode = mode
        self.min_delta = abs(float(min_delta))
        self.baseline = baseline
        self.direction: str | None = None if mode == "auto" else mode

    def resolve(self, model: Any, logs: Mapping[str, Any] | None = None) -> str:
        """Fix the direction (lazily, once the model's metrics are known).

        Keras's ValueError when ``mode="auto"`` cannot tell; ``logs`` lets the message name
        the closest available key, so a typo never silently turns the callback off.
        """
        if self.direction is None:
            direction = None
            if model is not None and hasattr(model, "metric_direction"):
                direction = model.metric_direction(self.monitor)
            if direction is None:
                direction = metrics_lib.direction_of(self.monitor)
            if direction is None:
                keys = [k for k in (logs or {}) if k != self.monitor]
                close = difflib.get_close_matches(self.monitor, keys, n=1, cutoff=0.5)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                available = f" Available metrics are: {','.join(keys)}." if keys else ""
                raise ValueError(
                    f"{self.owner} callback received monitor={self.monitor}, but cannot tell "
                    "whether that metric should be maximized or minimized. Pass `mode='max'` to "
                    "monitor the highest value, or `mode='min'` to monitor the lowest."
                    f"{hint}{available}"
                )
            self.direction = direction
        return self.direction

    def is_improvement(self, current: float, reference: float | None) -> bool:
        """Strictly better than ``reference`` by more than ``min_delta`` (None: always)."""
        if reference is None:
            return True
        if self.direction == "max":
            return current - self.min_delta > reference
        return current + self.min_delta < reference

    def improves_on_baseline(self, current: float) -> bool:
        return self.baseline is None or self.is_improvement(current, self.baseline)

    def get(self, logs: Mapping[str, Any] | None, warn_prefix: str | None = None) -> float | None:
        """The monitored value from ``logs``; warns (naming close keys) when it is missing."""
        logs = logs or {}
        value = logs.get(self.monitor)
        if value is None:
            if warn_prefix is not None:
                warnings.warn(self.missing_message(warn_prefix, logs), stacklevel=3)
            return None
        try:
            return float(value)
        except (TypeError, ValueError):
            return None

    def missing_message(self, prefix: str, logs: Mapping[str, Any]) -> str:
        keys = list(logs)
        close = difflib.get_close_matches(self.monitor, keys, n=1, cutoff=0.5)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        if not self.monitor.startswith("val_") or any(k.startswith("val_") for k in keys):
            extra = ""
        else:
            extra = " (no validation metrics: pass validation_data or validation_split to fit)"
        return (
            f"{prefix} `{self.monitor}` which is not available. Available metrics are: "
            f"{','.join(keys)}.{hint}{extra}"
        )

    def per_validation(self, params: Mapping[str, Any] | None) -> bool:
        """Whether the owner decides after each validation (``on_validation_end``) rather
        than at each epoch's end: ``fit(validation_interval=N)`` runs and the monitored key
        is a validation one (``val_*``). A training key is still watched per epoch."""
        return bool((params or {}).get("validation_interval")) and self.monitor.startswith("val_")

    def state_dict(self) -> dict[str, Any]:
        return {"direction": self.direction}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.direction = state.get("direction", self.direction)
