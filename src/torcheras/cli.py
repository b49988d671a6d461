"""The ``torcheras`` command: ``demo``, ``inspect``, ``plot`` and ``report``."""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


def demo(
    out_dir: str = "runs/demo", epochs: int = 40, verbose: int | str = "auto", seed: int = 0
) -> float:
    """Train a small network on scikit-learn's bundled digits with the typical callbacks."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    import torcheras
    from torcheras import callbacks

    torch.manual_seed(seed)
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=seed, stratify=y
    )
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(128, 10)
    )
    model = torcheras.Model(net)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    best_path = os.path.join(out_dir, "best.pt")
    csv_path = os.path.join(out_dir, "log.csv")
    tb_dir = os.path.join(out_dir, "tensorboard")
    print(
        f"torcheras demo: {len(x_train)} training and {len(x_test)} test images of digits "
        "(scikit-learn), an MLP 64-128-10."
    )
    model.fit(
        x_train,
        y_train,
        epochs=epochs,
        batch_size=32,
        validation_split=0.15,
        verbose=verbose,
        callbacks=[
            callbacks.EarlyStopping(
                monitor="val_loss", patience=6, restore_best_weights=True, verbose=1
            ),
            callbacks.ModelCheckpoint(best_path, monitor="val_accuracy", save_best_only=True),
            callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=3, verbose=1),
            callbacks.TensorBoard(tb_dir),
            callbacks.CSVLogger(csv_path),
            callbacks.TerminateOnNaN(),
        ],
    )
    results = model.evaluate(x_test, y_test, verbose=0, return_dict=True)
    print(f"\nTest accuracy: {results['accuracy']:.4f} (test loss {results['loss']:.4f})")
    print(f"Best model (by val_accuracy): {best_path}")
    print(f"Epoch log (CSV):               {csv_path}")
    print(f"TensorBoard logs:              {tb_dir}")
    print(f"Open TensorBoard with:         tensorboard --logdir {tb_dir}")
    return float(results["accuracy"])


def _print_info(info: dict[str, Any], prefix: str = "") -> None:
    for key, value in info.items():
        if isinstance(value, dict) and value:
            print(f"{prefix}{key}:")
            _print_info(value, prefix + "  ")
        else:
            print(f"{prefix}{key}: {value}")


def main(argv: Sequence[str] | None = None) -> int:
    """The ``torcheras`` command; its exit code.

    Example:
        ```console
        $ torcheras demo --epochs 5
        $ torcheras inspect runs/demo/best.pt
        ```
    """
    try:
        try:
            return _run(argv)
        finally:  # what is still buffered is written now, inside the try (argparse's exits too)
            sys.stdout.flush()
    except BrokenPipeError:
        # The reader left early (``torcheras demo | head``): stop quietly, as Unix tools do.
        _silence_broken_stdout()
        return 1


def _silence_broken_stdout() -> None:
    """Point a stdout whose pipe broke at devnull, so that the flush at exit raises no second
    error. Only a real pipe: a captured or in-memory stdout (tests, notebooks) is left alone."""
    try:
        fd = sys.stdout.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return
    except (AttributeError, OSError, ValueError):  # no file descriptor behind it
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _run(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="torcheras", description="Keras-style training for PyTorch."
    )
    from torcheras import __version__

    parser.add_argument("--version", action="version", version=f"torcheras {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="train on scikit-learn's digits with callbacks")
    p_demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p_demo.add_argument("--epochs", type=int, default=40)
    p_demo.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2))
    p_inspect = sub.add_parser("inspect", help="print what a checkpoint file holds")
    p_inspect.add_argument("path")
    p_inspect.add_argument("--json", action="store_true", help="machine-readable output")
    p_plot = sub.add_parser("plot", help="draw the curves of a CSVLogger file")
    p_plot.add_argument("csv", help="the CSV written by CSVLogger")
    p_plot.add_argument("-o", "--output", help="image to write (default: next to the CSV, .png)")
    p_plot.add_argument("--monitor", help="the metric whose best epoch is marked")
    p_report = sub.add_parser("report", help="write an HTML report of a run's folder")
    p_report.add_argument("run_dir")
    p_report.add_argument("-o", "--output", help="default: RUN_DIR/report.html")
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.out, args.epochs, args.verbose)
        return 0
    if args.command == "plot":
        from torcheras import plots

        output = args.output or os.path.splitext(args.csv)[0] + ".png"
        try:
            curves = plots.curves_from_csv(args.csv)
            plots.plot_curves(curves, monitor=args.monitor, title=args.csv, path=output)
        except (OSError, ValueError, ImportError) as exc:
            print(f"torcheras plot: {exc}", file=sys.stderr)
            return 2
        print(output)
        return 0
    if args.command == "report":
        from torcheras.report import write_report

        try:
            print(write_report(args.run_dir, args.output))
        except (OSError, ValueError, ImportError) as exc:
            print(f"torcheras report: {exc}", file=sys.stderr)
            return 2
        return 0
    from torcheras.checkpoint import CheckpointError, describe

    try:
        info = describe(args.path)
    except CheckpointError as exc:
        print(f"torcheras inspect: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        _print_info(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
