"""The `torcheras` command: the demo reaches its accuracy and leaves its files."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from torcheras.cli import main


def test_the_demo_command_trains_digits_to_95_percent_and_says_where_things_are(tmp_path, capsys):
    """`torcheras demo`, run as the user runs it: a process, its output, its exit code."""
    command = Path(sys.executable).parent / "torcheras"
    argv = [str(command)] if command.exists() else [sys.executable, "-m", "torcheras.cli"]
    result = subprocess.run(
        [*argv, "demo", "--out", str(tmp_path), "--verbose", "0"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    accuracy = float(out.split("Test accuracy: ")[1].split()[0])
    assert accuracy >= 0.95
    assert f"Test accuracy: {accuracy:.4f}" in out
    assert f"tensorboard --logdir {tmp_path}/tensorboard" in out
    with open(tmp_path / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and "val_accuracy" in rows[0]
    acc = EventAccumulator(str(tmp_path / "tensorboard" / "train"))
    acc.Reload()
    assert len(acc.Scalars("epoch_loss")) == len(rows)
    assert main(["inspect", str(tmp_path / "best.pt")]) == 0
    shown = capsys.readouterr().out
    assert "kind: model" in shown and "optimizers:\n  optimizer:\n    class: KerasAdam" in shown


def test_version_prints_the_package_version(capsys):
    import pytest

    import torcheras

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"torcheras {torcheras.__version__}"


def test_a_reader_that_leaves_early_stops_the_command_quietly(tmp_path):
    """`torcheras demo | head -1`: the first line arrives, then the command stops without a
    traceback (Unix tools' behaviour when their reader goes away)."""
    command = Path(sys.executable).parent / "torcheras"
    argv = [str(command)] if command.exists() else [sys.executable, "-m", "torcheras.cli"]
    process = subprocess.Popen(
        [*argv, "demo", "--out", str(tmp_path), "--epochs", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = process.stdout.readline()
    process.stdout.close()  # as `head -1` does after its line
    stderr = process.stderr.read()
    assert process.wait(timeout=600) == 1
    assert first.startswith("torcheras demo: ")
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
