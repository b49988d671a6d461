"""What the README promises, each with a test that fails if the promise breaks; and the holes
a mutation pass found (a dict input called positionally, on_after_backward after the step)."""

from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch
from conftest import make_model
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torcheras
from torcheras import checkpoint, logs, optimizers
from torcheras.callbacks import (
    BackupAndRestore,
    Callback,
    CallbackList,
    CSVLogger,
    EarlyStopping,
    History,
    LambdaCallback,
    LearningRateScheduler,
    ModelCheckpoint,
    ReduceLROnPlateau,
    TensorBoard,
    TerminateOnNaN,
)


def test_a_dict_input_is_passed_by_keyword_whatever_its_order():
    class Difference(nn.Module):
        def forward(self, a, b):
            return a - b

    model = torcheras.Model(Difference())
    model.compile(optimizer=None, loss="mse", device="cpu")
    a, b = np.full((4, 1), 5.0, "float32"), np.full((4, 1), 2.0, "float32")
    out = model.predict({"b": b, "a": a}, verbose=0)  # keys in the other order
    np.testing.assert_array_equal(out, np.full((4, 1), 3.0, "float32"))


def test_on_after_backward_comes_after_backward_and_before_the_step(blobs):
    x, y = blobs
    seen = []

    class Probe(Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.before = [p.detach().clone() for p in self.model.parameters()]

        def on_after_backward(self, batch):
            grads_ready = all(p.grad is not None for p in self.model.parameters())
            unchanged = all(torch.equal(p, b) for p, b in zip(self.model.parameters(), self.before))
            seen.append((grads_ready, unchanged))

        def on_train_batch_end(self, batch, logs=None):
            moved = any(not torch.equal(p, b) for p, b in zip(self.model.parameters(), self.before))
            seen.append(("stepped", moved))

    make_model().fit(x, y, epochs=1, batch_size=120, verbose=0, callbacks=[Probe()])
    assert seen == [(True, True), ("stepped", True)] * 2


def test_no_device_read_per_batch_unless_a_callback_reads_the_batch_logs(blobs, monkeypatch):
    """Counts every conversion of logged tensors to Python floats (the device read)."""
    x, y = blobs
    reads = []
    real = logs._as_floats
    monkeypatch.setattr(logs, "_as_floats", lambda values: reads.append(1) or real(values))
    make_model().fit(x, y, epochs=2, batch_size=30, validation_split=0.25, verbose=0)
    assert len(reads) == 4  # per epoch: the training results and the validation results
    reads.clear()
    keeper = LambdaCallback(on_train_batch_end=lambda batch, logs: None)  # takes, never reads
    make_model().fit(x, y, epochs=2, batch_size=30, verbose=0, callbacks=[keeper])
    assert len(reads) == 2
    reads.clear()
    reader = LambdaCallback(on_train_batch_end=lambda batch, logs: logs["loss"])
    make_model().fit(x, y, epochs=2, batch_size=30, verbose=0, callbacks=[reader])
    assert len(reads) == 2 + 2 * 8  # one read per batch, as promised for a reader


def test_hooks_are_called_only_on_callbacks_that_define_them(blobs, monkeypatch):
    x, y = blobs
    calls = []

    def spy(self, *args, **kwargs):
        calls.append(type(self).__name__)

    for hook in ("on_train_batch_begin", "on_train_batch_end", "on_batch_end", "on_test_begin"):
        monkeypatch.setattr(Callback, hook, spy)  # the base class's (inherited) hooks

    class OnlyEpochEnd(Callback):
        def on_epoch_end(self, epoch, logs=None):
            calls.append("epoch_end")

    make_model().fit(x, y, epochs=2, validation_split=0.25, verbose=0, callbacks=[OnlyEpochEnd()])
    assert calls == ["epoch_end", "epoch_end"]


def test_kerass_default_optimizer_settings():
    params = list(nn.Linear(2, 1).parameters())
    defaults = {  # Keras 3's defaults, in each class's (torch's) argument names
        "adam": (optimizers.KerasAdam, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-7}),
        "adamw": (optimizers.KerasAdamW, {"lr": 1e-3, "eps": 1e-7, "weight_decay": 0.004}),
        "sgd": (optimizers.KerasSGD, {"lr": 0.01, "momentum": 0.0, "nesterov": False}),
        "rmsprop": (optimizers.KerasRMSprop, {"lr": 1e-3, "alpha": 0.9, "eps": 1e-7,
                                              "momentum": 0.0, "centered": False}),
        "adagrad": (optimizers.KerasAdagrad, {"lr": 1e-3, "initial_accumulator_value": 0.1,
                                              "eps": 1e-7}),
        "adadelta": (optimizers.KerasAdadelta, {"lr": 1e-3, "rho": 0.95, "eps": 1e-7}),
        "adamax": (optimizers.KerasAdamax, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-7}),
        "nadam": (optimizers.KerasNadam, {"lr": 1e-3, "eps": 1e-7, "momentum_decay": 1.0}),
        "lion": (optimizers.KerasLion, {"lr": 1e-3, "betas": (0.9, 0.99)}),
    }  # fmt: skip
    for name, (cls, expected) in defaults.items():
        optimizer = optimizers.get(name, params)
        assert type(optimizer) is cls
        group = optimizer.param_groups[0]
        assert {k: group[k] for k in expected} == expected, name
    assert make_model(optimizer="rmsprop").compile is not None  # compile's default is rmsprop
    model = torcheras.Model(nn.Linear(2, 1))
    model.compile(loss="mse", device="cpu")
    assert type(model.optimizer) is optimizers.KerasRMSprop


class Crash(Callback):
    """Raises at one global step, as a crash would (the backup of the step before survives)."""

    def __init__(self, at):
        self.at = at

    def on_train_batch_end(self, batch, logs=None):
        if self.model.loop.global_step == self.at:
            raise RuntimeError("crash")


def _run_with_crash(model_factory, fit, backup, crash_at):
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = model_factory()
    if crash_at is not None:
        with pytest.raises(RuntimeError, match="crash"):
            fit(model, [BackupAndRestore(backup, save_freq=1), Crash(crash_at)])
        torch.manual_seed(123)  # the restarted script's state is whatever it is
        np.random.seed(123)
        random.seed(123)
        model = model_factory()
    return model, fit(model, [BackupAndRestore(backup, save_freq=1)])


def test_learning_rate_scheduler_numpy_and_python_rng_survive_a_resume(tmp_path, blobs):
    """A per-batch schedule and callbacks drawing from numpy's and Python's RNGs: the resumed
    run makes the same draws and uses the same rates as an unbroken one."""
    x, y = blobs
    draws: list = []

    class Draw(Callback):
        def on_train_batch_end(self, batch, logs=None):
            draws.append((np.random.rand(), random.random()))

    def fit(model, extra):
        schedule = LearningRateScheduler(lambda step, lr: 0.05 / (1 + step), interval="batch")
        return model.fit(
            x, y, epochs=3, batch_size=40, verbose=0, callbacks=[schedule, Draw(), *extra]
        )

    _, unbroken = _run_with_crash(make_model, fit, tmp_path / "a", None)
    expected_draws = list(draws)
    draws.clear()
    model, resumed = _run_with_crash(make_model, fit, tmp_path / "b", 9)
    assert resumed.history == unbroken.history
    assert draws[-9:] == expected_draws[-9:]  # the 9 batches after the backup at step 8


def test_a_shuffling_loader_with_workers_resumes_exactly(tmp_path, blobs):
    x, y = blobs
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))

    def fit(model, extra):
        loader = DataLoader(dataset, batch_size=40, shuffle=True, num_workers=2)
        model.fit(loader, epochs=2, verbose=0, callbacks=extra)
        return model

    unbroken, _ = _run_with_crash(make_model, fit, tmp_path / "a", None)
    resumed, _ = _run_with_crash(make_model, fit, tmp_path / "b", 8)
    for key, value in unbroken.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_a_second_ctrl_c_stops_at_once_without_a_backup(tmp_path, blobs):
    x, y = blobs
    backup = tmp_path / "backup"

    class DoubleCtrlC(Callback):
        def on_train_batch_end(self, batch, logs=None):
            if self.model.loop.global_step == 3:
                os.kill(os.getpid(), signal.SIGINT)  # the first: back up at this boundary...
                os.kill(os.getpid(), signal.SIGINT)  # ...the second: stop now
                raise AssertionError("the second Ctrl-C should have interrupted already")

    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        make_model().fit(
            x,
            y,
            epochs=2,
            batch_size=40,
            verbose=0,
            callbacks=[BackupAndRestore(backup, save_freq=2), DoubleCtrlC()],
        )
    assert signal.getsignal(signal.SIGINT) is previous  # handlers given back
    assert checkpoint.load(backup / "latest.pt")["global_step"] == 2  # no backup at step 3


def test_state_dict_round_trips_for_every_builtin_callback(tmp_path, blobs):
    x, y = blobs

    def builtins():
        return [
            EarlyStopping(monitor="loss", patience=3, restore_best_weights=True),
            ModelCheckpoint(str(tmp_path / "best.pt"), monitor="loss", save_best_only=True),
            ReduceLROnPlateau(monitor="loss", patience=1),
            LearningRateScheduler(lambda epoch, lr: lr * 0.9),
            CSVLogger(tmp_path / "log.csv"),
            TensorBoard(tmp_path / "tb", write_graph=False),
            TerminateOnNaN(),
            BackupAndRestore(tmp_path / "backup", save_freq=3, delete_checkpoint=False),
            History(),
            LambdaCallback(),
        ]

    used = builtins()
    model = make_model()
    model.fit(x, y, epochs=2, verbose=0, callbacks=used)
    states = CallbackList(used).state_dict()
    fresh = CallbackList(builtins(), model=make_model())
    fresh.load_state_dict(states)
    reloaded = fresh.state_dict()
    assert reloaded.keys() == states.keys() and len(states) == 10

    def comparable(value):
        if isinstance(value, torch.Tensor):
            return value.tolist()
        if isinstance(value, dict):
            return {k: comparable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [comparable(v) for v in value]
        return value

    for key in states:
        assert comparable(reloaded[key]) == comparable(states[key]), key
    assert states["EarlyStopping(monitor='loss')"]["best"] == pytest.approx(
        min(model.history.history["loss"])
    )
    checkpoint_key = f"ModelCheckpoint(filepath={str(tmp_path / 'best.pt')!r}, monitor='loss')"
    assert states[checkpoint_key]["best"] == pytest.approx(min(model.history.history["loss"]))
