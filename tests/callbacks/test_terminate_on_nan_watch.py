"""TerminateOnNaN inside fit with no other batch-log reader: the loop's loss watch.

It builds no batch logs, yet must decide exactly as the batch-logs path does (the path taken
when another callback reads the logs): the same first bad batch, the same value, the same
batch where training stops. Each test runs both paths and compares them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_model
from torch import nn

import torcheras
from torcheras import logs as logs_module
from torcheras import metrics
from torcheras.callbacks import LambdaCallback, TerminateOnNaN


def _poisoned(n=3200, bad_from=40 * 32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 8)).astype("float32")
    x[bad_from:] = np.nan
    return x, rng.integers(0, 3, n)


def _run(make, x, y, capsys, monkeypatch, reader: bool, **fit_kwargs):
    """One fit with TerminateOnNaN; ``reader``: a callback that gets the batch logs (and
    never reads them), which puts TerminateOnNaN on the batch-logs path."""
    snapshots = []
    original = logs_module.LogCollector.snapshot

    def counted(self):
        snapshots.append(1)
        return original(self)

    monkeypatch.setattr(logs_module.LogCollector, "snapshot", counted)
    begun = []
    callbacks = [
        TerminateOnNaN(),
        LambdaCallback(on_train_batch_begin=lambda batch, logs: begun.append(batch)),
    ]
    if reader:
        callbacks.append(LambdaCallback(on_train_batch_end=lambda batch, logs: None))
    capsys.readouterr()
    history = make().fit(
        x, y, shuffle=False, verbose=0, callbacks=callbacks, **{"epochs": 3, **fit_kwargs}
    )
    monkeypatch.undo()
    return capsys.readouterr().out, history, begun, len(snapshots)


def test_alone_it_builds_no_batch_logs_and_stops_where_the_batch_logs_path_does(
    capsys, monkeypatch
):
    """100 batches of 32, bad from batch 40: both paths name batch 40 and stop after batch
    63 (the second 32-batch check on the CPU); only the reader's path built batch logs."""
    x, y = _poisoned()
    watched = _run(make_model, x, y, capsys, monkeypatch, reader=False, batch_size=32)
    logged = _run(make_model, x, y, capsys, monkeypatch, reader=True, batch_size=32)
    for out, history, begun, _ in (watched, logged):
        assert "Batch 40: Invalid loss, terminating training" in out
        assert history.epoch == [0] and math.isnan(history.history["loss"][0])
        assert history.stop_reason == "TerminateOnNaN: loss was nan at epoch 1, batch 40"
        assert begun == list(range(64))
    assert watched[3] == 0 and logged[3] == 64


def test_a_running_mean_that_overflows_from_finite_losses_is_named_at_its_batch(
    capsys, monkeypatch
):
    """Every batch's own loss is finite (~1e36 from batch 5 on), but the epoch's running sum
    (loss x batch size, in float32) overflows some batches later: Keras's running mean is
    inf from there, and so is ours on both paths (a check of each batch's own loss would
    never fire). The batch is found independently: the same sums in numpy's float32."""
    rng = np.random.default_rng(1)
    x = rng.random((640, 4)).astype("float32")
    y = rng.random((640, 1)).astype("float32")
    y[5 * 32 :] = 1e18
    models = []

    def make():
        torch.manual_seed(0)
        model = torcheras.Model(nn.Linear(4, 1))
        model.compile(torch.optim.SGD(model.parameters(), lr=0.0), "mse", device="cpu")
        models.append(model)
        return model

    for reader in (False, True):
        out, history, begun, _ = _run(make, x, y, capsys, monkeypatch, reader, batch_size=32)
        with torch.no_grad():  # lr=0: the weights never moved
            net = models[-1].module
            losses = [
                nn.functional.mse_loss(net(torch.from_numpy(x[i : i + 32])),
                                       torch.from_numpy(y[i : i + 32])).item()
                for i in range(0, 640, 32)
            ]  # fmt: skip
        assert all(math.isfinite(v) for v in losses)
        with np.errstate(over="ignore"):
            sums = np.cumsum(np.float32(losses) * np.float32(32), dtype=np.float32)
        first = int(np.flatnonzero(~np.isfinite(sums))[0])
        assert first > 5  # the sum overflows batches after the big losses began
        assert f"Batch {first}: Invalid loss, terminating training" in out
        reason = f"TerminateOnNaN: loss was inf at epoch 1, batch {first}"
        assert history.stop_reason == reason
        assert begun == list(range(20))  # the epoch's 20 batches (the check at its end)


class TrackedLoss(torcheras.Model):
    """Keras's idiom: the step returns a Mean tracker's result as its loss."""

    def __init__(self):
        super().__init__(nn.Linear(8, 3))
        self.loss_tracker = metrics.Mean(name="loss")

    def train_step(self, batch):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.optimizer.zero_grad()
        self.backward(loss)
        self.optimizer.step()
        self.loss_tracker.update_state(loss.detach(), sample_weight=len(x))
        return {"loss": self.loss_tracker.result()}


def test_a_trackers_result_returned_as_the_loss_is_checked_as_logged(capsys, monkeypatch):
    x, y = _poisoned(n=1600, bad_from=7 * 32)

    def make():
        model = TrackedLoss()
        model.compile(torch.optim.SGD(model.parameters(), lr=0.1), device="cpu")
        return model

    for reader in (False, True):
        out, history, begun, snapshots = _run(
            make, x, y, capsys, monkeypatch, reader, batch_size=32
        )
        assert "Batch 7: Invalid loss, terminating training" in out
        assert begun == list(range(32))  # 50 batches: found at the first 32-batch check
        assert math.isnan(history.history["loss"][0])
        assert (snapshots > 0) == reader


def test_raise_error_raises_at_the_bad_batch_without_batch_logs(capsys, monkeypatch):
    x, y = _poisoned(n=640, bad_from=3 * 32)
    begun = []
    callbacks = [
        TerminateOnNaN(raise_error=True),
        LambdaCallback(on_train_batch_begin=lambda batch, logs: begun.append(batch)),
    ]
    with pytest.raises(RuntimeError, match=r"at batch 3\. Loss value: nan\."):
        make_model().fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0,
                         callbacks=callbacks)  # fmt: skip
    assert begun == [0, 1, 2, 3]


def test_two_epochs_of_finite_losses_and_then_nan_names_the_epoch_and_batch(capsys, monkeypatch):
    """The watch's windows start again each epoch: a NaN from the second epoch's batch 2
    (data bad only then) is named there, on both paths."""
    x, y = _poisoned(n=640, bad_from=640)  # all finite
    flip = {"epoch": 0}

    class PoisonSecondEpoch(torcheras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            flip["epoch"] = epoch

    class Poisoned(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(8, 3)
            self.calls = 0

        def forward(self, inputs):
            out = self.net(inputs)
            if self.training:
                self.calls += 1
                if flip["epoch"] == 1 and (self.calls - 1) % 20 == 2:
                    out = out * float("nan")
            return out

    def make():
        model = torcheras.Model(Poisoned())
        model.compile("adam", "sparse_categorical_crossentropy", device="cpu")
        return model

    for reader in (False, True):
        begun = []
        callbacks = [
            PoisonSecondEpoch(),
            TerminateOnNaN(),
            LambdaCallback(on_train_batch_begin=lambda batch, logs, seen=begun: seen.append(batch)),
        ]
        if reader:
            callbacks.append(LambdaCallback(on_train_batch_end=lambda batch, logs: None))
        capsys.readouterr()
        history = make().fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0,
                             callbacks=callbacks)  # fmt: skip
        assert "Batch 2: Invalid loss, terminating training" in capsys.readouterr().out
        assert history.epoch == [0, 1]
        assert history.stop_reason == "TerminateOnNaN: loss was nan at epoch 2, batch 2"
        assert math.isfinite(history.history["loss"][0])
