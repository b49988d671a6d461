"""ProgbarLogger: Keras's progress bar, drawn with tqdm."""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm

from torcheras.callbacks.callback import Callback

__all__ = ["ProgbarLogger"]


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e5 else f"{value:.4e}"
    return str(value)


def format_logs(logs: Any) -> str:
    return "".join(f" - {key}: {format_value(logs[key])}" for key in logs)


def format_rate(seconds: float, steps: int) -> str:
    per_step = seconds / max(steps, 1)
    if per_step >= 1:
        return f"{per_step:.0f}s/step"
    if per_step >= 1e-3:
        return f"{per_step * 1e3:.0f}ms/step"
    return f"{per_step * 1e6:.0f}us/step"


def _is_interactive() -> bool:
    """A terminal, or a Jupyter kernel (which renders carriage returns)."""
    isatty = getattr(sys.stdout, "isatty", None)
    return bool(isatty and isatty()) or "ipykernel" in sys.modules


class _Bar(tqdm):
    """tqdm with one extra field, ``{keras}``: our ``" 3ms/step - loss: 0.1234"`` text."""

    rank_zero_only = True

    def __init__(self, *args: Any, keras_text: str = "", **kwargs: Any) -> None:
        self.keras_text = keras_text  # set before tqdm's first draw
        super().__init__(*args, **kwargs)

    @property
    def format_dict(self) -> dict[str, Any]:
        d = super().format_dict
        d["keras"] = self.keras_text
        return d


class ProgbarLogger(Callback):
    """Prints Keras's progress: ``Epoch 3/20``, then ``782/782 [====] 2s 3ms/step - loss: ...``.

    ``verbose=1`` draws a bar per epoch (updated at most every ``refresh_interval`` seconds,
    which is also the only time it reads the batch logs from the device); ``verbose=2`` prints
    one line per epoch; ``verbose=0`` prints nothing. Validation inside ``fit`` is silent;
    standalone ``evaluate`` and ``predict`` draw their own bar. ``fit`` adds one when
    ``verbose != 0``.

    When the output is not a terminal (a log file, CI, a pipe), ``verbose=1`` prints the final
    line of each epoch only, as Keras does: clean lines, no carriage returns. ``interactive``
    forces either way (None: a terminal or a Jupyter kernel draws the live bar).

    Example:
        ```python
        model.fit(x, y, epochs=3, verbose=2)   # one line per epoch
        ```
    """

    def __init__(self, refresh_interval: float = 0.1, interactive: bool | None = None) -> None:
        self.refresh_interval = refresh_interval
        self.interactive = interactive
        self._live = True
        self.verbose = 1
        self.epochs = 1
        self.steps: int | None = None
        self._in_fit = False
        self._bar: _Bar | None = None
        self._start = 0.0
        self._last_draw = 0.0
        self._seen = 0
        self._steps: int | None = None

    def set_params(self, params: dict[str, Any]) -> None:
        super().set_params(params)
        verbose = params.get("verbose", 1)
        self.verbose = 1 if verbose == "auto" else int(verbose or 0)
        self.epochs = params.get("epochs") or 1
        self.steps = params.get("steps")

    # --- bar helpers --------------------------------------------------------------------------
    def _open(self, steps: int | None) -> None:
        self._close()
        self._live = self.interactive if self.interactive is not None else _is_interactive()
        self._start = time.perf_counter()
        self._last_draw = self._start
        self._seen = 0
        self._steps = steps

    def _draw(self, text: str) -> None:
        """Draw the bar (created at its first draw, so no empty ``0/N`` line is printed)."""
        if self._bar is None:
            steps = self._steps
            fmt = (
                "{n_fmt}/{total_fmt} [{bar:20}] {elapsed_s:.0f}s{keras}"
                if steps
                else "{n_fmt}/Unknown {elapsed_s:.0f}s{keras}"
            )
            self._bar = _Bar(
                total=steps,
                initial=self._seen,
                file=sys.stdout,
                bar_format=fmt,
                ascii=".=",
                mininterval=0,
                leave=True,
                dynamic_ncols=True,
                keras_text=text,
            )
        else:
            self._bar.keras_text = text
            if self._seen != self._bar.n:
                self._bar.update(self._seen - self._bar.n)
            else:
                self._bar.refresh()

    def _update(self, batch: int, logs: Any) -> None:
        self._seen = batch + 1
        if self.verbose != 1 or not self._live:
            return
        now = time.perf_counter()
        if now - self._last_draw >= self.refresh_interval:
            self._last_draw = now
            self._draw(f" {format_rate(now - self._start, self._seen)}{format_logs(logs)}")

    def _finish(self, logs: Any, steps: int | None) -> None:
        seconds = time.perf_counter() - self._start
        seen = self._seen or steps or 0
        text = f" {format_rate(seconds, seen)}{format_logs(logs or {})}"
        if self.verbose == 1 and not self._live:  # a log file: the epoch's line, once
            bar = f"{seen}/{steps or seen} [{'=' * 20}] {seconds:.0f}s" if seen else ""
            print(f"{bar}{text}", file=sys.stdout, flush=True)
        elif self.verbose == 1:
            self._seen = seen
            if self._bar is not None and self._bar.total is None:
                self._bar.total = seen
            self._draw(text)
            self._close()
        elif self.verbose == 2:
            print(f"{seen}/{steps or seen} - {seconds:.0f}s -{text}", file=sys.stdout, flush=True)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # --- hooks ----------------------------------------------------------------------------------
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._in_fit = True

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._close()
        self._in_fit = False
        reason = getattr(getattr(self.model, "history", None), "stop_reason", None)
        if self.verbose and reason:
            print(f"Stopped: {reason}", file=sys.stdout, flush=True)

    def on_exception(self, exception: BaseException) -> None:
        self._close()
        self._in_fit = False

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.verbose and self.epochs > 1:
            print(f"Epoch {epoch + 1}/{self.epochs}", file=sys.stdout, flush=True)
        self._open(self.steps)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._update(batch, logs or {})

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.verbose:
            self._finish(logs, self.steps)

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        if not self._in_fit:
            self._open(self.steps)

    def on_test_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if not self._in_fit:
            self._update(batch, logs or {})

    def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
        if not self._in_fit and self.verbose:
            self._finish(logs, self.steps)

    def on_predict_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._open(self.steps)

    def on_predict_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._update(batch, {})

    def on_predict_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.verbose:
            self._finish({}, self.steps)
