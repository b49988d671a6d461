"""ProgbarLogger: Keras-like text at each verbosity."""

from __future__ import annotations

import re

import pytest
from conftest import make_model


def _lines(text):
    return [line for line in re.split(r"[\r\n]+", text) if line.strip()]


def test_verbose_1_shows_epochs_steps_time_and_metrics(capsys, blobs):
    x, y = blobs
    make_model().fit(x, y, epochs=2, batch_size=40, validation_split=0.25, verbose=1)
    lines = _lines(capsys.readouterr().out)
    assert "Epoch 1/2" in lines and "Epoch 2/2" in lines
    final = [line for line in lines if line.startswith("5/5")]
    assert final, lines
    assert re.search(
        r"5/5 \[=+\] \d+s \d+(us|ms|s)/step - accuracy: \d\.\d{4} - loss: \d\.\d{4} - "
        r"val_accuracy: \d\.\d{4} - val_loss: \d\.\d{4} - learning_rate: 0\.0200",
        final[-1],
    ), final[-1]


def test_verbose_2_prints_one_line_per_epoch(capsys, blobs):
    x, y = blobs
    make_model().fit(x, y, epochs=3, batch_size=40, verbose=2)
    lines = _lines(capsys.readouterr().out)
    assert lines[0] == "Epoch 1/3"
    epoch_lines = [line for line in lines if line.startswith("6/6 - ")]
    assert len(epoch_lines) == 3 and "[" not in epoch_lines[0]
    assert " - loss: " in epoch_lines[0]


def test_verbose_0_is_silent_and_auto_is_1(capsys, blobs):
    x, y = blobs
    model = make_model()
    model.fit(x, y, epochs=2, verbose=0)
    model.evaluate(x, y, verbose=0)
    model.predict(x, verbose=0)
    assert capsys.readouterr().out == ""
    model.fit(x, y, epochs=1)  # "auto": one epoch, so no "Epoch 1/1" header, but a bar
    out = capsys.readouterr().out
    assert "Epoch" not in out and "8/8" in out


def test_validation_is_silent_inside_fit_but_evaluate_draws_its_bar(capsys, blobs):
    x, y = blobs
    model = make_model()
    model.fit(
        x, y, epochs=1, batch_size=240, validation_data=(x, y), validation_batch_size=10, verbose=1
    )
    assert "/24" not in capsys.readouterr().out  # no bar over the 24 validation batches
    model.evaluate(x, y, batch_size=10, verbose=1)
    out = _lines(capsys.readouterr().out)
    assert any(line.startswith("24/24") and "loss:" in line for line in out)


def test_final_line_shows_validation_metrics_even_when_every_batch_was_drawn(capsys, blobs):
    from torcheras.callbacks import ProgbarLogger

    x, y = blobs
    make_model().fit(
        x,
        y,
        epochs=1,
        batch_size=40,
        validation_data=(x, y),
        verbose=1,
        callbacks=[ProgbarLogger(refresh_interval=0, interactive=True)],
    )
    lines = _lines(capsys.readouterr().out)
    assert "val_loss:" in lines[-1] and lines[-1].startswith("6/6")
    assert sum("1/6" in line for line in lines) == 1  # batch draws happened along the way


def test_off_a_terminal_verbose_1_prints_each_epoch_line_once_without_carriage_returns(blobs):
    """What a log file or CI sees: Keras's epoch line only, clean lines."""
    x, y = blobs
    script = (
        "import sys, numpy as np; sys.path.insert(0, 'tests');"
        "from conftest import make_model;"
        "x = np.random.rand(240, 8).astype('float32'); y = np.random.randint(0, 3, 240);"
        "make_model().fit(x, y, epochs=3, batch_size=40, validation_split=0.25, verbose=1)"
    )
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    out = result.stdout
    assert "\r" not in out
    lines = out.splitlines()
    assert lines[::2] == ["Epoch 1/3", "Epoch 2/3", "Epoch 3/3"]
    assert len(lines) == 6 and len(set(lines)) == 6
    for line in lines[1::2]:
        assert re.fullmatch(
            r"5/5 \[=+\] \d+s \d+(us|ms|s)/step - accuracy: \d\.\d{4} - loss: \d\.\d{4} - "
            r"val_accuracy: \d\.\d{4} - val_loss: \d\.\d{4} - learning_rate: 0\.0200",
            line,
        ), line


# --- what a terminal shows ----------------------------------------------------------------------
_PTY_SCRIPT = """
import json, sys
import numpy as np
import torch
sys.path.insert(0, "tests")
from conftest import make_model
from torcheras.callbacks import ProgbarLogger

torch.manual_seed(0)
rng = np.random.default_rng(0)
x = rng.normal(size=(320, 8)).astype("float32")
y = rng.integers(0, 3, 320)
model = make_model(metrics=["accuracy", "sparse_categorical_accuracy"])
history = model.fit(
    x, y, epochs=2, batch_size=40, validation_split=0.25, verbose=1,
    callbacks=[ProgbarLogger(refresh_interval=0)],  # every batch redrawn: the most debris
)
with open(sys.argv[1], "w") as f:
    json.dump(history.history, f)
"""


def _run_in_terminal(columns: int, history_path: str) -> str:
    """Run ``_PTY_SCRIPT`` on a pseudo-terminal ``columns`` wide; everything it wrote there."""
    import fcntl
    import os
    import pty
    import struct
    import sys
    import termios

    pid, fd = pty.fork()
    if pid == 0:  # the child: its stdin, stdout and stderr are the terminal
        os.execv(sys.executable, [sys.executable, "-c", _PTY_SCRIPT, history_path])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    output = b"".join(chunks).decode()
    assert os.waitstatus_to_exitcode(status) == 0, output
    return output


def _screen(output: str, columns: int | None) -> list[str]:
    """The lines a terminal ``columns`` wide (None: no limit) shows once ``output`` is drawn.

    A small VT100: printable characters overwrite, a line too long wraps onto the next row, a
    carriage return goes back to the start of the current row only (so a redrawn line that
    had wrapped leaves its first rows behind), escape sequences move or erase. Rows that a
    long line wrapped onto are joined back to it, as a terminal's copy and paste gives them.
    """
    rows: list[list[str]] = [[]]
    continues = [False]  # whether a row continues the one above (a wrap, not a newline)
    row = col = 0
    pending_wrap = False
    i = 0

    def goto(r: int) -> None:
        while len(rows) <= r:
            rows.append([])
            continues.append(False)

    while i < len(output):
        ch = output[i]
        i += 1
        if ch == "\x1b":
            m = re.match(r"\[([0-9;?]*)([@-~])", output[i:])
            if m is None:
                continue
            i += m.end()
            n = int(m.group(1) or 1) if m.group(1).isdigit() else 1
            code = m.group(2)
            if code == "K":
                del rows[row][col:]
            elif code == "A":
                row = max(row - n, 0)
            elif code == "B":
                row += n
                goto(row)
            elif code == "C":
                col += n
            elif code == "D":
                col = max(col - n, 0)
            elif code == "G":
                col = n - 1
            pending_wrap = False
        elif ch == "\r":
            col, pending_wrap = 0, False
        elif ch == "\n":
            row += 1
            goto(row)
            pending_wrap = False
        elif ch == "\b":
            col, pending_wrap = max(col - 1, 0), False
        elif ch.isprintable():
            if pending_wrap:
                row, col, pending_wrap = row + 1, 0, False
                goto(row)
                continues[row] = True
            line = rows[row]
            line.extend(" " * (col + 1 - len(line)))
            line[col] = ch
            col += 1
            if columns is not None and col == columns:
                col, pending_wrap = columns - 1, True
    lines: list[str] = []
    for cells, joined in zip(rows, continues):
        if joined and lines:
            lines[-1] += "".join(cells)
        else:
            lines.append("".join(cells))
    return [line.rstrip() for line in lines if line.strip()]


@pytest.mark.parametrize("columns", [80, 0])
def test_a_terminal_shows_every_value_of_each_epoch(columns, tmp_path):
    """An 80-column terminal and one that reports 0 columns (``docker run -t``, some CI and
    IDE consoles): each epoch ends as one whole line (wrapped by the terminal) holding the loss,
    every metric and every val_ value, equal to History's, and the bar redrawn during the
    epoch leaves nothing behind."""
    import json

    output = _run_in_terminal(columns, str(tmp_path / "history.json"))
    history = json.loads((tmp_path / "history.json").read_text())
    assert "\r" in output  # the live bar was drawn and redrawn
    lines = _screen(output, columns or None)
    assert lines[0::2] == ["Epoch 1/2", "Epoch 2/2"] and len(lines) == 4, lines
    for epoch, line in enumerate(lines[1::2]):
        values = " - ".join(
            f"{key}: {history[key][epoch]:.4f}"
            for key in (
                "accuracy",
                "loss",
                "sparse_categorical_accuracy",
                "val_accuracy",
                "val_loss",
                "val_sparse_categorical_accuracy",
                "learning_rate",
            )
        )
        assert re.fullmatch(rf"6/6 \[={{20}}\] \d+s \d+(us|ms|s)/step - {values}", line), line
    if columns:
        assert len(lines[1]) > columns  # the terminal wrapped it: nothing was cut


def test_under_torchrun_only_rank_0_draws_the_bar(capsys, blobs, monkeypatch):
    from torcheras import distributed

    x, y = blobs
    model = make_model()
    monkeypatch.setattr(distributed, "is_main", lambda: False)  # as on rank 1
    model.fit(x, y, epochs=2, batch_size=40, verbose=1)
    assert capsys.readouterr().out == ""
