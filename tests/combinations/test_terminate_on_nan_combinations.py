"""TerminateOnNaN with the rest: a progress bar that rarely reads, gradient accumulation,
validation_interval, BackupAndRestore (raise_error and resume), callbacks that edit or
delete the loss, hand-written loops, and the CPU's short check interval."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_model

from torcheras.callbacks import (
    BackupAndRestore,
    Callback,
    CallbackList,
    LambdaCallback,
    ProgbarLogger,
    TerminateOnNaN,
)
from torcheras.callbacks import terminate_on_nan as ton


def _poisoned(n=3200, bad_from=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 8)).astype("float32")
    x[bad_from:] = np.nan
    return x, rng.integers(0, 3, n)


def _count():
    batches = []
    return batches, LambdaCallback(on_train_batch_end=lambda batch, logs: batches.append(batch))


# ---- TerminateOnNaN ---------------------------------------------------------------------------


def test_progbar_that_rarely_reads_still_stops_within_32_batches_on_the_cpu(capsys):
    """verbose=1's bar reads only when it redraws; with a long refresh interval it reads
    next to nothing, and the check still comes within 32 batches on the CPU."""
    x, y = _poisoned()
    batches, count = _count()
    bar = ProgbarLogger(refresh_interval=1e9, interactive=False)
    reader_values = []
    late_reader = LambdaCallback(
        on_train_batch_end=lambda b, logs: reader_values.append(logs["loss"]) if b == 1 else None
    )
    history = make_model().fit(
        x,
        y,
        batch_size=32,
        epochs=2,
        shuffle=False,
        verbose=1,
        callbacks=[count, TerminateOnNaN(), bar, late_reader],
    )
    out = capsys.readouterr().out
    assert "Batch 3: Invalid loss, terminating training" in out
    assert history.epoch == [0] and math.isnan(history.history["loss"][0])
    # the bar's first read and the reader's (batch 1) each restart the count of 32
    assert 4 <= len(batches) <= 36, len(batches)
    assert reader_values and math.isfinite(reader_values[0])


def test_with_gradient_accumulation_the_first_bad_batch_is_named_within_32_batches(capsys):
    x, y = _poisoned(bad_from=5 * 32)  # batch 5: inside the second group of 4
    batches, count = _count()
    model = make_model(gradient_accumulation_steps=4)
    history = model.fit(
        x, y, batch_size=32, epochs=2, shuffle=False, verbose=0, callbacks=[count, TerminateOnNaN()]
    )
    assert "Batch 5: Invalid loss, terminating training" in capsys.readouterr().out
    assert history.epoch == [0]
    assert batches == list(range(32))


def test_with_validation_interval_it_stops_within_32_batches_and_validates_once_more(capsys):
    x, y = _poisoned()
    batches, count = _count()
    ends = []
    watch = LambdaCallback(on_epoch_end=lambda epoch, logs: ends.append(sorted(logs)))
    history = make_model().fit(
        x,
        y,
        batch_size=32,
        epochs=2,
        shuffle=False,
        verbose=0,
        validation_data=(np.zeros((64, 8), "float32"), np.zeros(64, "int64")),
        validation_interval=10,
        callbacks=[count, TerminateOnNaN(), watch],
    )
    assert "Batch 3: Invalid loss, terminating training" in capsys.readouterr().out
    assert history.epoch == [0] and batches == list(range(32))
    assert "val_loss" in ends[0]  # the stopped epoch finished, as Keras's does


def test_raise_error_leaves_a_backup_from_before_the_bad_batch(tmp_path):
    """Keras raises at the bad batch itself, before a later callback's batch-level backup:
    the backup left behind holds the weights from before the NaN, and a run resumed on fixed
    data starts from finite weights. With raise_error on the CPU every batch is checked, so
    no backup of NaN weights is written before the error."""
    x, y = _poisoned(n=640, bad_from=96)  # 20 batches; batch 3 the first bad one
    backup_dir = tmp_path / "backup"
    with pytest.raises(RuntimeError, match="at batch 3"):
        make_model().fit(
            x,
            y,
            batch_size=32,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[TerminateOnNaN(raise_error=True), BackupAndRestore(backup_dir, save_freq=2)],
        )
    finite = []

    class Check(Callback):
        def on_train_batch_begin(self, batch, logs=None):  # after the restore
            if not finite:
                finite.append(all(bool(torch.isfinite(p).all()) for p in self.model.parameters()))

    clean = np.nan_to_num(x)
    make_model().fit(
        clean, y, batch_size=32, epochs=2, shuffle=False, verbose=0,
        callbacks=[BackupAndRestore(backup_dir, save_freq=2), Check()],
    )  # fmt: skip
    assert finite == [True]


def test_a_loss_set_to_nan_by_an_earlier_callback_is_caught_as_in_keras(capsys):
    """Keras reads logs["loss"] as the callbacks before it left it: an earlier callback that
    writes NaN into batch 5's loss stops training at batch 5 (an edited value is no running
    mean: each edited batch is checked)."""
    x, y = _poisoned(n=640, bad_from=640)  # clean data, 20 batches

    def poison(batch, logs):
        if batch == 5:
            logs["loss"] = float("nan")

    history = make_model().fit(
        x,
        y,
        batch_size=32,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[LambdaCallback(on_train_batch_end=poison), TerminateOnNaN()],
    )
    assert "Batch 5: Invalid loss, terminating training" in capsys.readouterr().out
    assert history.epoch == [0]


def test_batches_whose_loss_an_earlier_callback_deleted_are_skipped_as_in_keras(capsys):
    """Keras ignores a batch without "loss". NaN batches 3.. of epoch 1 lose their key, so
    epoch 1 runs through; the weights are NaN, so epoch 2's batch 0 (key kept) stops it."""
    x, y = _poisoned(n=640, bad_from=96)

    def drop(batch, logs):
        if batch >= 3:
            del logs["loss"]

    history = make_model().fit(
        x,
        y,
        batch_size=32,
        epochs=3,
        shuffle=False,
        verbose=0,
        callbacks=[LambdaCallback(on_train_batch_end=drop), TerminateOnNaN()],
    )
    out = capsys.readouterr().out
    assert out.count("Invalid loss") == 1
    assert "Batch 0: Invalid loss, terminating training" in out
    assert history.epoch == [0, 1]


def test_a_finite_loss_written_by_an_earlier_callback_hides_the_nan_as_in_keras():
    x, y = _poisoned(n=640, bad_from=96)

    def hide(batch, logs):
        logs["loss"] = 1.0

    history = make_model().fit(
        x,
        y,
        batch_size=32,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[LambdaCallback(on_train_batch_end=hide), TerminateOnNaN()],
    )
    assert history.epoch == [0, 1]


def test_a_hand_written_loop_with_plain_dicts_and_a_plain_module_raises_at_the_bad_batch():
    net = torch.nn.Linear(2, 2)  # no .device, no .loop
    stop = TerminateOnNaN(raise_error=True)
    callbacks = CallbackList([stop], model=net)
    callbacks.on_train_begin()
    assert stop._max_unread == ton.MAX_UNREAD  # nothing says "CPU": the general bound
    callbacks.on_train_batch_end(0, {"loss": 0.5})
    with pytest.raises(
        RuntimeError,
        match=r"^NaN or Inf loss encountered at batch 1\. Loss value: nan\. "
        r"Terminating training immediately\.$",
    ):
        callbacks.on_train_batch_end(1, {"loss": torch.tensor(float("nan"))})


def test_a_cpu_model_gets_the_short_bound_an_accelerator_model_the_long_one():
    model = make_model()
    stop = TerminateOnNaN()
    stop.set_model(model)
    stop.on_train_begin()
    assert stop._max_unread == ton.CPU_UNREAD == 32
    model.device = torch.device("cuda", 0)  # as compile on a GPU sets it (nothing moved)
    stop.on_train_begin()
    assert stop._max_unread == ton.MAX_UNREAD == 1024


def test_a_resumed_epoch_still_names_the_first_bad_batch(tmp_path, capsys):
    """BackupAndRestore resumes mid-epoch (batch 4 of 20); the data goes bad at batch 9:
    the resumed run's check names batch 9 (not a batch index of the resumed part) and stops
    in the resumed epoch within 32 batches."""
    x, y = _poisoned(n=640, bad_from=9 * 32)
    backup_dir = tmp_path / "backup"

    class Interrupt(Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 5:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_model().fit(
            np.nan_to_num(x), y, batch_size=32, epochs=2, shuffle=False, verbose=0,
            callbacks=[BackupAndRestore(backup_dir, save_freq=4), Interrupt()],
        )  # fmt: skip
    capsys.readouterr()
    batches, count = _count()
    history = make_model().fit(
        x, y, batch_size=32, epochs=2, shuffle=False, verbose=0,
        callbacks=[BackupAndRestore(backup_dir, save_freq=4), count, TerminateOnNaN()],
    )  # fmt: skip
    assert "Batch 9: Invalid loss, terminating training" in capsys.readouterr().out
    assert batches[0] == 4 and batches[-1] == 19  # the epoch's rest: fewer than 32 batches
    assert history.epoch == [0]
