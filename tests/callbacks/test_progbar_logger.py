"""ProgbarLogger: Keras-like text at each verbosity."""

from __future__ import annotations

import re

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
        r"5/5 \[=+\] \d+s \d+(us|ms|s)/step - accuracy: \d\.\d{4} - learning_rate: "
        r"0\.0200 - loss: \d\.\d{4} - val_accuracy: \d\.\d{4} - val_loss: \d\.\d{4}",
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
            r"5/5 \[=+\] \d+s \d+(us|ms|s)/step - accuracy: \d\.\d{4} - learning_rate: "
            r"0\.0200 - loss: \d\.\d{4} - val_accuracy: \d\.\d{4} - val_loss: \d\.\d{4}",
            line,
        ), line
