"""Training curves: loss and every metric, train against validation, the learning rate on its
own axis, the best and the stop epochs marked. Matplotlib (the ``plot`` extra), headless.

``History.plot()`` and ``torcheras plot RUN.csv`` both end here.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from torcheras import checkpoint

__all__ = ["Curves", "best_epoch", "curves_from_csv", "curves_from_history", "plot_curves"]

# key -> (1-based epochs, values); a validation metric may cover fewer epochs than training
Curves = dict[str, tuple[list[int], list[float]]]

_HIGHER_IS_BETTER = ("acc", "auc", "precision", "recall", "f1", "iou", "r2", "score")


def curves_from_history(history: Mapping[str, Sequence[float]], epochs: Sequence[int]) -> Curves:
    """``History.history`` and ``History.epoch`` (0-based) as curves. A key recorded on fewer
    epochs (``validation_freq=k``) is placed on every k-th epoch, where Keras recorded it."""
    shown = [e + 1 for e in epochs] or list(
        range(1, 1 + max(map(len, history.values()), default=0))
    )
    curves: Curves = {}
    for key, values in history.items():
        n = len(values)
        if n == len(shown):
            xs = list(shown)
        else:  # every k-th epoch, counted from the end of the last fit
            step = max(1, len(shown) // max(n, 1))
            xs = [shown[0] - 1 + step * (i + 1) for i in range(n)]
        if values and isinstance(values[0], (list, tuple)):  # several values: one curve each
            for j in range(len(values[0])):
                curves[f"{key}[{j}]"] = (xs, [float(v[j]) for v in values])
        else:
            curves[key] = (xs, [float(v) for v in values])
    return curves


def curves_from_csv(path: str | os.PathLike[str]) -> Curves:
    """The curves in a CSVLogger file (an ``epoch`` column, 0-based, and one per log key;
    empty cells are epochs without that value)."""
    curves: Curves = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter=_sniff_delimiter(path))
        if reader.fieldnames is None or "epoch" not in reader.fieldnames:
            raise ValueError(
                f"{os.fspath(path)!r} is not a CSVLogger log: it has no 'epoch' column "
                f"(columns: {reader.fieldnames})."
            )
        for row in reader:
            epoch = int(float(row["epoch"])) + 1
            for key, cell in row.items():
                if key == "epoch" or key is None or cell in (None, "", "NA"):
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    continue  # a text column
                xs, ys = curves.setdefault(key, ([], []))
                xs.append(epoch)
                ys.append(value)
    if not curves:
        raise ValueError(f"{os.fspath(path)!r} holds no epochs yet.")
    return curves


def _sniff_delimiter(path: str | os.PathLike[str]) -> str:
    with open(path, newline="") as f:
        header = f.readline()
    return max((",", ";", "\t"), key=header.count)


def _higher_is_better(key: str) -> bool:
    name = key.removeprefix("val_").lower()
    return any(part in name for part in _HIGHER_IS_BETTER) and "loss" not in name


def best_epoch(curves: Curves, monitor: str | None = None) -> tuple[str, int, float] | None:
    """``(monitor, epoch, value)`` of the best epoch: ``monitor``, else ``val_loss``, else
    ``loss``; lowest unless the name is a score (accuracy, AUC...)."""
    if monitor is None:
        monitor = next((k for k in ("val_loss", "loss") if k in curves), None)
    if monitor is None or monitor not in curves:
        return None
    xs, ys = curves[monitor]
    finite = [(y, x) for x, y in zip(xs, ys) if math.isfinite(y)]
    if not finite:
        return None
    value, epoch = (max if _higher_is_better(monitor) else min)(finite, key=lambda p: p[0])
    return monitor, epoch, value


def plot_curves(
    curves: Curves,
    *,
    monitor: str | None = None,
    stop_reason: str | None = None,
    title: str | None = None,
    path: str | os.PathLike[str] | None = None,
) -> Any:
    """One panel per metric (train and ``val_`` together), the learning rate in its own
    panel on a log scale, the best epoch (see :func:`best_epoch`) and the stop epoch (when
    ``stop_reason`` is given) marked. Returns the matplotlib ``Figure``; saves it to ``path``
    (PNG, SVG or PDF by its suffix) when given.

    Example:
        ```python
        fig = plot_curves(curves_from_csv("runs/a/log.csv"), path="runs/a/curves.png")
        ```
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "Plots need matplotlib: pip install 'torcheras[plot]' (or matplotlib)."
        ) from None
    names = sorted({k.removeprefix("val_") for k in curves if k != "learning_rate"})
    names.sort(key=lambda k: (k != "loss", k))
    panels = names + (["learning_rate"] if "learning_rate" in curves else [])
    if not panels:
        raise ValueError("Nothing to plot: the history holds no values.")
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.6 * columns, 3.4 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    best = best_epoch(curves, monitor)
    last = max(max(xs) for xs, _ in curves.values() if xs)
    for index, (ax, name) in enumerate(zip(axes, panels)):
        first = index == 0  # the markers are named in the first panel's legend only
        if name == "learning_rate":
            xs, ys = curves[name]
            ax.plot(xs, ys, color="tab:purple", marker="." if len(xs) < 40 else None)
            if all(y > 0 for y in ys):
                ax.set_yscale("log")
            ax.set_title("learning rate")
        else:
            for key, color, label in ((name, "tab:blue", "train"), (f"val_{name}", "tab:orange",
                                                                        "validation")):  # fmt: skip
                if key in curves:
                    xs, ys = curves[key]
                    ax.plot(xs, ys, color=color, label=label, marker="." if len(xs) < 40 else None)
            ax.set_title(name)
        if best is not None:
            label = f"best {best[0]} {best[2]:.4g} (epoch {best[1]})" if first else None
            ax.axvline(best[1], color="tab:green", linestyle=":", linewidth=1.4, label=label)
        if stop_reason:
            label = f"stopped (epoch {last})" if first else None
            ax.axvline(last, color="tab:red", linestyle="--", linewidth=1.2, label=label)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if title or stop_reason:
        heading = title or ""
        if stop_reason:
            heading += ("\n" if heading else "") + f"Stopped: {stop_reason}"
        figure.suptitle(heading, fontsize="medium")
    if path is not None:
        save_figure(figure, path)
    return figure


def save_figure(figure: Any, path: str | os.PathLike[str]) -> None:
    """Save a matplotlib figure atomically, its format from the name (``.png``, ``.svg``,
    ``.pdf``...); a failure names the file, the cause and the fix."""
    buffer = io.BytesIO()
    suffix = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
    figure.savefig(buffer, format=suffix, dpi=110)
    checkpoint.atomic_write(path, lambda f: f.write(buffer.getvalue()), every_rank=True)
