"""Timer: stop training cleanly when a time budget is spent; the clock survives a resume."""

from __future__ import annotations

import datetime
import re
import time
from collections.abc import Mapping
from typing import Any

from torcheras.callbacks.callback import Callback
from torcheras.loop_state import TIME_UP

__all__ = ["Timer", "parse_duration"]

_UNITS = {"w": 604800.0, "d": 86400.0, "h": 3600.0, "min": 60.0, "m": 60.0, "s": 1.0}
_PART = r"(\d+(?:\.\d+)?)\s*(min|[wdhms])"
_COMPACT = re.compile(rf"^\s*(?:{_PART}\s*)+$")


def parse_duration(duration: str | float | datetime.timedelta | Mapping[str, float]) -> float:
    """Seconds in ``duration``: ``"1h30m"``, ``"45m"`` (or ``"45min"``), ``"2d"``, ``"00:01:30:00"``
    (DD:HH:MM:SS, as Lightning) or ``"01:30:00"``, a number of seconds, a ``timedelta``, or a
    dict of ``timedelta`` arguments (``{"hours": 1, "minutes": 30}``)."""
    if isinstance(duration, datetime.timedelta):
        seconds = duration.total_seconds()
    elif isinstance(duration, Mapping):
        seconds = datetime.timedelta(**duration).total_seconds()
    elif isinstance(duration, (int, float)) and not isinstance(duration, bool):
        seconds = float(duration)
    elif isinstance(duration, str) and _COMPACT.match(duration.lower()):
        parts = re.findall(_PART, duration.lower())
        seconds = sum(float(n) * _UNITS[unit] for n, unit in parts)
    elif isinstance(duration, str) and re.fullmatch(r"\d+(:\d+){1,3}", duration.strip()):
        fields = [int(f) for f in duration.strip().split(":")]
        seconds = float(sum(f * s for f, s in zip(reversed(fields), (1, 60, 3600, 86400))))
    else:
        raise ValueError(
            f"Timer: cannot read the duration {duration!r}. Give it as '1h30m', '45m', '2d', "
            "'DD:HH:MM:SS', a number of seconds, a datetime.timedelta or a dict such as "
            "{'hours': 1, 'minutes': 30}."
        )
    if seconds <= 0:
        raise ValueError(f"Timer: the duration must be positive; got {duration!r}.")
    return seconds


def format_duration(seconds: float) -> str:
    """``5400`` -> ``"1h30m"``; ``42.5`` -> ``"42.5s"``."""
    if seconds < 60:
        return f"{seconds:g}s"
    whole = int(round(seconds))
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if whole >= size:
            out += f"{whole // size}{unit}"
            whole %= size
    return out


class Timer(Callback):
    """Stop training when ``duration`` of training time is spent.

    The clock runs during ``fit`` only and its elapsed time is part of the backup, so a
    resumed run has what was left, not a new budget. With ``interval="step"`` (the default)
    the budget is checked after every training batch, with ``"epoch"`` after every epoch.

    When the budget is spent and BackupAndRestore is on, the training state is backed up
    where it stands (the middle of an epoch too) and kept, and ``fit`` returns: a rerun of the
    script with a larger budget continues exactly from there. Without BackupAndRestore,
    training stops as with ``model.stop_training`` (the epoch ends, validation runs).
    ``History.stop_reason`` reads ``"Timer: budget of 1h30m spent at epoch 3, batch 17"``.

    Example:
        ```python
        model.fit(x, y, epochs=1000, callbacks=[Timer("1h30m"), BackupAndRestore("backup")])
        ```
    """

    state_key_attributes = ("interval",)

    def __init__(
        self,
        duration: str | float | datetime.timedelta | Mapping[str, float],
        interval: str = "step",
        verbose: int = 0,
    ) -> None:
        if interval not in ("step", "epoch"):
            raise ValueError(f"Timer: `interval` must be 'step' or 'epoch'; got {interval!r}.")
        self.duration = parse_duration(duration)
        self.budget = duration if isinstance(duration, str) else format_duration(self.duration)
        self.interval = interval
        self.verbose = verbose
        self._before = 0.0  # seconds spent in earlier runs (restored from a backup)
        self._start: float | None = None
        self._fired = False
        if interval == "epoch":
            self.unused_hooks = ("on_train_batch_end",)

    def time_elapsed(self) -> float:
        """Seconds of training spent so far, earlier runs of a resumed training included."""
        running = 0.0 if self._start is None else time.monotonic() - self._start
        return self._before + running

    def time_remaining(self) -> float:
        """Seconds left of the budget (0 once spent)."""
        return max(0.0, self.duration - self.time_elapsed())

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._before, self._fired = 0.0, False
        self._start = time.monotonic()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._before, self._start = self.time_elapsed(), None

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if not self._fired and self.time_elapsed() >= self.duration:
            self._time_up(f"epoch {self.model.loop.epoch + 1}, batch {batch}")

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if not self._fired and self.time_elapsed() >= self.duration:
            self._time_up(f"the end of epoch {epoch + 1}")

    def _time_up(self, where: str) -> None:
        self._fired = True
        loop = getattr(self.model, "loop", None)
        backup = loop is not None and loop.interrupt_handler is not None
        reason = f"budget of {self.budget} spent at {where}"
        if self.verbose:
            print(f"Timer: {reason}; stopping.")
        if not backup:
            self.stop_training(reason)
            return
        # BackupAndRestore writes where training stands (every rank at the same batch under
        # torchrun, whose clocks differ), then fit returns.
        if self.model.stop_reason is None:
            self.model.stop_reason = f"Timer: {reason}; backup written"
        loop.request_interrupt(TIME_UP)

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed": self.time_elapsed()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._before, self._start = float(state["elapsed"]), time.monotonic()
