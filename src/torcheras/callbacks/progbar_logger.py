"""ProgbarLogger: Keras's progress bar, and one whole line per epoch."""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any

from torcheras.callbacks.callback import Callback

__all__ = ["ProgbarLogger"]

BAR_WIDTH = 20


def format_value(value: Any) -> str:
    """A logged value as the bar shows it: 4 decimals (scientific when tiny or huge); a
    metric of several values (F1 per class) element by element."""
    if isinstance(value, float):
        return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e5 else f"{value:.4e}"
    if isinstance(value, list):
        return f"[{', '.join(format_value(v) for v in value)}]"
    return str(value)


def format_logs(logs: Any) -> str:
    """``" - name: value"`` for each key in the logs' order, ``learning_rate`` last: the loss,
    the metrics and their ``val_`` values come first, as Keras shows them."""
    keys = [key for key in logs if key != "learning_rate"]
    if "learning_rate" in logs:
        keys.append("learning_rate")
    return "".join(f" - {key}: {format_value(logs[key])}" for key in keys)


def format_rate(seconds: float, steps: int) -> str:
    per_step = seconds / max(steps, 1)
    if per_step >= 1:
        return f"{per_step:.0f}s/step"
    if per_step >= 1e-3:
        return f"{per_step * 1e3:.0f}ms/step"
    return f"{per_step * 1e6:.0f}us/step"


def format_bar(seen: int, steps: int | None, seconds: float) -> str:
    """``"3/5 [===========>........] 1s"``, or ``"3/Unknown 1s"`` when the length is unknown."""
    if not steps:
        return f"{seen}/Unknown {seconds:.0f}s"
    filled = min(BAR_WIDTH * seen // steps, BAR_WIDTH)
    bar = "=" * filled if seen >= steps else "=" * max(filled - 1, 0) + ">"
    return f"{seen}/{steps} [{bar.ljust(BAR_WIDTH, '.')}] {seconds:.0f}s"


def _is_interactive() -> bool:
    """A terminal, or a Jupyter kernel (which renders carriage returns)."""
    isatty = getattr(sys.stdout, "isatty", None)
    return bool(isatty and isatty()) or "ipykernel" in sys.modules


def _columns(stream: Any) -> int | None:
    """The width a redrawn line must fit in: the terminal's; $COLUMNS or 80 for a terminal
    that reports 0 columns (``docker run -t``, some CI and IDE consoles); None off a terminal
    (Jupyter wraps nothing, and a file has no width)."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return None
    return columns if columns > 0 else shutil.get_terminal_size().columns


class ProgbarLogger(Callback):
    """Prints Keras's progress: ``Epoch 3/20``, then ``782/782 [====] 2s 3ms/step - loss: ...``.

    ``verbose=1`` draws a bar per epoch, redrawn in place at most every ``refresh_interval``
    seconds (which is also the only time it reads the batch logs from the device); ``verbose=2``
    prints one line per epoch; ``verbose=0`` prints nothing. Validation inside ``fit`` is silent;
    standalone ``evaluate`` and ``predict`` draw their own bar. ``fit`` adds one when
    ``verbose != 0``.

    The values come in the logs' order with ``learning_rate`` last. The bar redrawn during an
    epoch is cut to the terminal's width (a longer line would wrap, and each redraw would leave
    a stale row behind); the epoch's last line is printed whole, every value in it, and the
    terminal wraps it, as Keras's does. When the output is not a terminal (a log file, CI, a
    pipe), ``verbose=1`` prints that last line only: clean lines, no carriage returns.
    ``interactive`` forces either way (None: a terminal or a Jupyter kernel draws the live bar).

    Example:
        ```python
        model.fit(x, y, epochs=3, verbose=2)   # one line per epoch
        ```
    """

    rank_zero_only = True  # under torchrun, one bar: rank 0's

    def __init__(self, refresh_interval: float = 0.1, interactive: bool | None = None) -> None:
        self.refresh_interval = refresh_interval
        self.interactive = interactive
        self._live = True
        self.verbose = 1
        self.epochs = 1
        self.steps: int | None = None
        self._in_fit = False
        self._start = 0.0
        self._last_draw = 0.0
        self._seen = 0
        self._steps: int | None = None
        self._drawn = 0  # the length of the live line on screen (0: none)

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

    def _write(self, line: str, end: str = "") -> None:
        """Draw ``line`` over the live one (blanking what is left of it), then ``end``."""
        out = sys.stdout
        out.write(f"\r{line.ljust(self._drawn)}{end}" if self._drawn else f"{line}{end}")
        out.flush()
        self._drawn = 0 if end else len(line)

    def _update(self, batch: int, logs: Any) -> None:
        self._seen = batch + 1
        if self.verbose != 1 or not self._live:
            return
        now = time.perf_counter()
        if now - self._last_draw >= self.refresh_interval:
            self._last_draw = now
            seconds = now - self._start
            line = format_bar(self._seen, self._steps, seconds)
            line += f" {format_rate(seconds, self._seen)}{format_logs(logs)}"
            columns = _columns(sys.stdout)
            self._write(line if columns is None else line[: columns - 1])

    def _finish(self, logs: Any, steps: int | None) -> None:
        seconds = time.perf_counter() - self._start
        seen = self._seen or steps or 0
        text = f" {format_rate(seconds, seen)}{format_logs(logs or {})}"
        if self.verbose == 1:  # the whole line: the terminal wraps it, no value is cut
            bar = format_bar(seen, steps or seen, seconds) if seen else ""
            self._write(f"{bar}{text}", end="\n")
        elif self.verbose == 2:
            print(f"{seen}/{steps or seen} - {seconds:.0f}s -{text}", file=sys.stdout, flush=True)

    def _close(self) -> None:
        """End a live line left on screen (an exception, an interrupted epoch)."""
        if self._drawn:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self._drawn = 0

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
        self._close()
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
