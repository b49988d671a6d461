"""``torcheras report RUN_DIR``: one self-contained HTML page about a training run.

It gathers what the run left in its folder: the curves (from ``history.json`` written by
``History.save``, else from a CSVLogger file), the final metrics, the best epoch, why training
stopped and the hyper-parameters (``history.json``, or the ``log.csv.json`` CSVLogger writes
beside its CSV), the checkpoints found (with the epoch and
logs they hold) and the TensorBoard logs. The plots are embedded as PNG: the page is one file
to open, mail or attach.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import os
from pathlib import Path
from typing import Any

from torcheras import checkpoint, plots

__all__ = ["write_report"]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")


def _find(run_dir: Path, pattern: str) -> list[Path]:
    return sorted(p for p in run_dir.rglob(pattern) if p.is_file())


def _load_run(run_dir: Path) -> tuple[plots.Curves, dict[str, Any], str]:
    """The curves, the history record (may be empty) and where the curves came from."""
    for path in _find(run_dir, "*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("history"), dict):
            curves = plots.curves_from_history(record["history"], record.get("epoch", []))
            if curves:
                return curves, record, str(path.relative_to(run_dir))
    for path in _find(run_dir, "*.csv"):
        try:
            curves = plots.curves_from_csv(path)
        except (OSError, ValueError):
            continue
        return curves, _csv_record(path), str(path.relative_to(run_dir))
    raise FileNotFoundError(
        f"No training log in {str(run_dir)!r}: the report needs a CSVLogger file (*.csv) or a "
        "history saved with history.save('RUN_DIR/history.json')."
    )


def _csv_record(path: Path) -> dict[str, Any]:
    """What CSVLogger wrote beside its CSV when training ended (``log.csv.json``): the stop
    reason, fit's parameters, the hyper-parameters; empty if there is none."""
    try:
        record = json.loads(path.with_name(path.name + ".json").read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _checkpoints(run_dir: Path) -> list[dict[str, Any]]:
    from torcheras.checkpoint import describe

    found = []
    for path in [p for p in _find(run_dir, "*") if p.suffix in CHECKPOINT_SUFFIXES]:
        entry: dict[str, Any] = {"path": str(path.relative_to(run_dir))}
        try:
            info = describe(str(path))
        except Exception as exc:  # an unreadable file is reported, not fatal
            entry["error"] = str(exc)
        else:
            entry.update(
                kind=info.get("kind"),
                epoch=None if info.get("epoch") is None else info["epoch"] + 1,
                size=info.get("size_bytes"),
                logs=info.get("logs") or info.get("last_epoch_logs") or {},
            )
        entry["modified"] = datetime.datetime.fromtimestamp(path.stat().st_mtime).isoformat(
            " ", "seconds"
        )
        found.append(entry)
    return found


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _table(rows: list[tuple[Any, ...]], header: tuple[str, ...]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return "" if value is None else str(value)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .5rem 0; font-size: .9rem; }
th, td { border: 1px solid #ddd; padding: .3rem .6rem; text-align: left; }
th { background: #f4f4f4; } .stop { padding: .6rem 1rem; background: #fff4e5;
border-left: 4px solid #f0a030; } .done { padding: .6rem 1rem; background: #eef8ee;
border-left: 4px solid #4a4; } img { max-width: 100%; } code { background: #f4f4f4; }
"""


def write_report(
    run_dir: str | os.PathLike[str], output: str | os.PathLike[str] | None = None
) -> Path | str:
    """Write ``RUN_DIR/report.html`` (or ``output``) and return its path.

    ``run_dir`` (and ``output``) may be URLs, such as ``s3://bucket/run`` (through fsspec):
    the run's files are copied into a temporary folder, read there, and the page is written
    to ``RUN_DIR/report.html`` in the store (or ``output``).

    Example:
        ```python
        history = model.fit(..., callbacks=[CSVLogger("runs/a/log.csv"),
                                            ModelCheckpoint("runs/a/best.pt")])
        history.save("runs/a/history.json")  # optional: log.csv.json has the stop reason
        write_report("runs/a")               # or: torcheras report runs/a
        ```
    """
    where = checkpoint.location(run_dir)
    if isinstance(where, str):  # a URL: read from a local copy, written back to the store
        import tempfile

        target = output if output is not None else checkpoint.join(where, "report.html")
        with tempfile.TemporaryDirectory(prefix="torcheras-report-") as local:
            checkpoint.download_folder(where, Path(local))
            name = where.rstrip("/").rsplit("/", 1)[-1]
            return _write(Path(local), target, name, where)
    run = where
    if not run.is_dir():
        raise FileNotFoundError(f"{str(run)!r} is not a folder: give the run's output folder.")
    target = output if output is not None else run / "report.html"
    return _write(run, target, run.resolve().name, str(run))


def _write(run: Path, target: str | os.PathLike[str], name: str, shown: str) -> Path | str:
    """The page for the run in the local folder ``run`` (``name`` and ``shown``: how the
    page names it), written to ``target``."""
    curves, record, source = _load_run(run)
    stop_reason = record.get("stop_reason")
    figure = plots.plot_curves(curves, stop_reason=stop_reason)
    best = plots.best_epoch(curves)
    last_epoch = max(max(xs) for xs, _ in curves.values())
    final = [(k, ys[-1], xs[-1]) for k, (xs, ys) in sorted(curves.items())]
    parts = [
        f"<h1>Training report: {html.escape(name)}</h1>",
        f"<p>{last_epoch} epoch{'' if last_epoch == 1 else 's'}, "
        f"logs from <code>{html.escape(source)}</code>; "
        f"written {datetime.datetime.now().isoformat(' ', 'seconds')}.</p>",
    ]
    if stop_reason:
        parts.append(f'<p class="stop"><b>Stopped:</b> {html.escape(stop_reason)}</p>')
    elif record:
        parts.append('<p class="done">Every epoch ran (no early stop).</p>')
    if best is not None:
        parts.append(
            f"<p><b>Best epoch:</b> {best[1]} ({html.escape(best[0])} = {best[2]:.6g})</p>"
        )
    parts.append(f'<h2>Curves</h2><img alt="training curves" src="data:image/png;base64,'
                 f'{_png(figure)}">')  # fmt: skip
    parts.append("<h2>Final metrics</h2>" + _table(final, ("metric", "value", "epoch")))
    hyper = {**record.get("params", {}), **record.get("hyperparameters", {})}
    if hyper:
        rows = [(k, v) for k, v in hyper.items()]
        parts.append("<h2>Hyper-parameters</h2>" + _table(rows, ("name", "value")))
    checkpoints = _checkpoints(run)
    if checkpoints:
        rows = [
            (c["path"], c.get("kind"), c.get("epoch"), c.get("logs") or c.get("error"),
             c.get("size"), c["modified"])
            for c in checkpoints
        ]  # fmt: skip
        parts.append(
            "<h2>Checkpoints</h2>"
            + _table(rows, ("file", "kind", "epoch", "logs", "bytes", "modified"))
        )
    events = _find(run, "events.out.tfevents.*")
    if events:
        folders = sorted({str(p.parent.relative_to(run)) for p in events})
        parts.append(
            "<h2>TensorBoard</h2><p>Event files in "
            + ", ".join(f"<code>{html.escape(f)}</code>" for f in folders)
            + f": <code>tensorboard --logdir {html.escape(shown)}</code></p>"
        )
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>torcheras report: {html.escape(name)}</title>"
        f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>"
    )
    return checkpoint.atomic_write(target, lambda f: f.write(page.encode("utf-8")), every_rank=True)
