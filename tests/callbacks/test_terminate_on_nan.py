"""TerminateOnNaN: stop (or raise) on a NaN or infinite training loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_model

from torcheras.callbacks import Callback, CSVLogger, TerminateOnNaN


def _poisoned(n=240, bad_from=96):
    x = np.random.rand(n, 8).astype("float32")
    x[bad_from:] = np.nan
    return x, np.random.randint(0, 3, n)


class TrainEnd(Callback):
    """Counts on_train_end calls."""

    def __init__(self):
        self.calls = 0

    def on_train_end(self, logs=None):
        self.calls += 1


def test_stops_after_the_bad_batch_and_finishes_the_epoch(capsys):
    x, y = _poisoned()
    watch = TrainEnd()
    history = make_model().fit(
        x,
        y,
        batch_size=32,
        epochs=3,
        shuffle=False,
        verbose=0,
        validation_data=(x[:32], y[:32]),
        callbacks=[TerminateOnNaN(), watch],
    )
    assert "Batch 3: Invalid loss, terminating training" in capsys.readouterr().out
    assert history.epoch == [0] and "val_loss" in history.history  # the epoch finished
    assert watch.calls == 1


def test_raise_error_skips_train_end(tmp_path):
    x, y = _poisoned()
    watch = TrainEnd()
    logger = CSVLogger(tmp_path / "log.csv")
    with pytest.raises(
        RuntimeError,
        match=r"NaN or Inf loss encountered at batch 3\. Loss "
        r"value: nan\. Terminating training immediately\.",
    ):
        make_model().fit(
            x,
            y,
            batch_size=32,
            epochs=3,
            shuffle=False,
            verbose=0,
            callbacks=[TerminateOnNaN(raise_error=True), watch, logger],
        )
    assert watch.calls == 0 and logger._file is None


def test_finite_training_is_untouched(blobs):
    x, y = blobs
    assert make_model().fit(x, y, epochs=2, verbose=0, callbacks=[TerminateOnNaN()]).epoch == [0, 1]


def test_infinite_loss_is_caught_too():
    cb = TerminateOnNaN()
    model = make_model()
    cb.set_model(model)
    model.stop_training = False
    cb.on_train_batch_end(4, {"loss": float("inf")})
    assert model.stop_training
    model.stop_training = False
    cb.on_train_batch_end(5, {"accuracy": 1.0})  # no loss key: ignored
    assert not model.stop_training


def test_the_check_reads_nothing_per_batch_yet_names_the_first_bad_batch(capsys, device):
    """Without a progress bar nothing reads the logs: the check waits for the epoch's last
    batch, then names the batch where the loss went bad, and stops in the same epoch."""
    import torcheras
    from torcheras.callbacks import LambdaCallback

    x, y = _poisoned()
    model = torcheras.Model(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 3)))
    model.compile("adam", "sparse_categorical_crossentropy", device=device)
    batches = []
    count = LambdaCallback(on_train_batch_end=lambda batch, logs: batches.append(batch))
    history = model.fit(
        x, y, batch_size=32, epochs=3, shuffle=False, verbose=0, callbacks=[count, TerminateOnNaN()]
    )
    assert "Batch 3: Invalid loss, terminating training" in capsys.readouterr().out
    assert history.epoch == [0] and np.isnan(history.history["loss"][0])
    assert batches == list(range(8))  # the whole epoch ran: the check came at its end


def test_logs_read_by_another_callback_are_checked_at_the_next_batch(capsys):
    from torcheras.callbacks import LambdaCallback

    x, y = _poisoned()
    batches = []
    reader = LambdaCallback(on_train_batch_end=lambda batch, logs: batches.append(logs["loss"]))
    make_model().fit(
        x,
        y,
        batch_size=32,
        epochs=3,
        shuffle=False,
        verbose=0,
        callbacks=[TerminateOnNaN(), reader],  # the reader runs after the check, as a progbar
    )
    assert "Batch 3: Invalid loss, terminating training" in capsys.readouterr().out
    assert len(batches) == 5  # batch 3 was read by the reader, so batch 4's check caught it


def test_on_the_cpu_a_bad_loss_is_found_within_32_batches_without_a_reader(capsys):
    """On the CPU a read waits for nothing: unread batch logs are checked every 32 batches
    (not kept by the hundred), so a long epoch stops soon after the loss went bad."""
    from torcheras.callbacks import LambdaCallback

    x, y = _poisoned(n=3200, bad_from=96)  # 100 batches of 32; batch 3 is the first bad one
    batches = []
    count = LambdaCallback(on_train_batch_end=lambda batch, logs: batches.append(batch))
    history = make_model().fit(
        x, y, batch_size=32, epochs=2, shuffle=False, verbose=0, callbacks=[count, TerminateOnNaN()]
    )
    assert "Batch 3: Invalid loss, terminating training" in capsys.readouterr().out
    assert history.epoch == [0] and batches == list(range(32))
