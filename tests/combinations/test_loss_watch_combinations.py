"""TerminateOnNaN's loss watch (fit with no other batch-end reader) against the batch-logs
path (the same fit plus a callback that gets the batch logs and never reads them), in
combination with the rest of fit: gradient accumulation, validation_interval, a mid-epoch
resume, custom steps, Model.log, jit_compile, mixed precision, several TerminateOnNaN,
a nested CallbackList, exceptions and reuse of one instance. Each comparison looks at what a
user sees: the printed message (or the error), History.epoch, history.stop_reason and the
batches run. Also the background writer under the process's end, a thread and a fork."""

from __future__ import annotations

import contextlib
import io
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_model
from torch import nn

import torcheras
from torcheras import logs as logs_module
from torcheras import metrics
from torcheras.callbacks import (
    BackupAndRestore,
    Callback,
    CallbackList,
    LambdaCallback,
    ModelCheckpoint,
    TerminateOnNaN,
)

ROOT = Path(__file__).resolve().parents[2]


def _poisoned(n=3200, bad_from=40 * 32, seed=0):
    """NaN inputs from sample ``bad_from`` on (with batch_size=32: from batch bad_from/32)."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 8)).astype("float32")
    x[bad_from:] = np.nan
    return x, rng.integers(0, 3, n)


def _overflowing(n=640, big_from=5 * 32):
    """Targets of 1e18 from sample ``big_from``: with a frozen linear model and mse each
    batch's own loss is ~1e36 (finite), but the epoch's float32 running sum (loss x 32)
    overflows about 11 big batches later; Keras's running mean is inf from there."""
    rng = np.random.default_rng(1)
    x = rng.random((n, 4)).astype("float32")
    y = rng.random((n, 1)).astype("float32")
    y[big_from:] = 1e18
    return x, y


def _frozen(**compile_kwargs):
    torch.manual_seed(0)
    model = torcheras.Model(nn.Linear(4, 1))
    model.compile(
        torch.optim.SGD(model.parameters(), lr=0.0), "mse", device="cpu", **compile_kwargs
    )
    return model


class _Batches(Callback):
    """(epoch, batch) of every training batch begun (no batch-end hook: no batch logs)."""

    def __init__(self):
        self.seen = []
        self.epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self.seen.append((self.epoch, batch))


@dataclass
class Outcome:
    out: str  # what was printed
    error: str | None  # the exception leaving fit, as str
    epoch: list | None  # History.epoch
    stop_reason: str | None
    batches: list  # (epoch, batch) begun
    keys: list | None  # the History's keys
    snapshots: int  # batch logs built (0: the watch ran)

    def seen(self):
        """What the user sees (everything but how many batch logs were built)."""
        return (self.out, self.error, self.epoch, self.stop_reason, self.batches, self.keys)


def _fit(monkeypatch, make, x, y, *, reader, stops=None, extra=(), **fit_kwargs) -> Outcome:
    """One fit with ``stops`` (TerminateOnNaN() unless given: one callback or a list) and a
    batch counter; ``reader``: plus a callback that gets the batch logs and never reads them
    (the batch-logs path)."""
    built = []
    original = logs_module.LogCollector.snapshot

    def counted(self):
        built.append(1)
        return original(self)

    monkeypatch.setattr(logs_module.LogCollector, "snapshot", counted)
    stops = [TerminateOnNaN()] if stops is None else stops
    stops = list(stops) if isinstance(stops, (list, tuple)) else [stops]
    count = _Batches()
    callbacks = [*stops, count, *extra]
    if reader:
        callbacks.append(LambdaCallback(on_train_batch_end=lambda batch, logs: None))
    kwargs = {"epochs": 3, "batch_size": 32, "shuffle": False, "verbose": 0, **fit_kwargs}
    printed = io.StringIO()
    history = error = None
    model = make()
    try:
        with contextlib.redirect_stdout(printed):
            history = model.fit(x, y, callbacks=callbacks, **kwargs)
    except Exception as exc:  # raise_error: compared as the user reads it
        error = f"{type(exc).__name__}: {exc}"
    finally:
        monkeypatch.setattr(logs_module.LogCollector, "snapshot", original)
    return Outcome(
        out=printed.getvalue(),
        error=error,
        epoch=None if history is None else list(history.epoch),
        stop_reason=None if history is None else history.stop_reason,
        batches=count.seen,
        keys=None if history is None else sorted(history.history),
        snapshots=len(built),
    )


def _both(monkeypatch, make, x, y, *, watched=True, stops=None, **kwargs):
    """The watch path and the batch-logs path, each from a fresh model (and fresh
    TerminateOnNaN: ``stops`` is a factory); asserts they show the user the same."""
    make_stops = stops or (lambda: None)
    alone = _fit(monkeypatch, make, x, y, reader=False, stops=make_stops(), **kwargs)
    logged = _fit(monkeypatch, make, x, y, reader=True, stops=make_stops(), **kwargs)
    assert logged.snapshots > 0
    if watched:  # the watch ran: no batch logs built at all
        assert alone.snapshots == 0
    assert alone.seen() == logged.seen()
    return alone


def _stopped_at(batch, *, epoch=1, value="nan"):
    return f"TerminateOnNaN: loss was {value} at epoch {epoch}, batch {batch}"


def _epoch0(last):
    return [(0, b) for b in range(last + 1)]


# ---- the watch against the batch-logs path -------------------------------------------------


def test_nan_data_is_named_at_its_batch_and_stops_at_the_same_check(monkeypatch):
    x, y = _poisoned()  # 100 batches, NaN from batch 40: checks after batches 31, 63
    seen = _both(monkeypatch, make_model, x, y)
    assert seen.out == "Batch 40: Invalid loss, terminating training\n"
    assert seen.epoch == [0] and seen.stop_reason == _stopped_at(40)
    assert seen.batches == _epoch0(63)


@pytest.mark.parametrize(
    "setting",
    [{}, {"gradient_accumulation_steps": 4}, {"validation_interval": 3}],
    ids=["plain", "accumulation", "validation_interval"],
)
def test_a_running_mean_that_overflows_from_finite_losses_is_caught(monkeypatch, setting):
    """Each batch's own loss stays finite; only the running mean (what Keras's logs hold)
    becomes inf. A check of the batch's own loss never fires; a check of the window's last
    mean without the replay names the wrong batch."""
    x, y = _overflowing()
    compile_kwargs = {k: v for k, v in setting.items() if k == "gradient_accumulation_steps"}
    fit_kwargs = {}
    if "validation_interval" in setting:
        fit_kwargs = {"validation_data": (x[:64], y[:64]), "validation_interval": 3}
    seen = _both(monkeypatch, lambda: _frozen(**compile_kwargs), x, y, **fit_kwargs)
    lines = seen.out.splitlines()
    assert len(lines) == 1 and lines[0].endswith(": Invalid loss, terminating training")
    first = int(lines[0].split()[1].rstrip(":"))
    assert 10 < first < 19  # ~11 big batches (from batch 5) into the epoch's float32 sum
    assert seen.stop_reason == _stopped_at(first, value="inf")
    assert seen.epoch == [0] and seen.batches == _epoch0(19)  # 20 batches: the epoch's end


def test_gradient_accumulation_names_a_batch_inside_a_group(monkeypatch):
    x, y = _poisoned(bad_from=37 * 32)  # batch 37: the second of the group 36..39
    seen = _both(monkeypatch, lambda: make_model(gradient_accumulation_steps=4), x, y)
    assert "Batch 37: Invalid loss" in seen.out and seen.stop_reason == _stopped_at(37)
    assert seen.batches == _epoch0(63)


def test_raise_error_with_gradient_accumulation_raises_at_the_bad_batch(monkeypatch):
    x, y = _poisoned(bad_from=37 * 32)
    seen = _both(
        monkeypatch,
        lambda: make_model(gradient_accumulation_steps=4),
        x,
        y,
        stops=lambda: TerminateOnNaN(raise_error=True),
    )
    assert seen.error == (
        "RuntimeError: NaN or Inf loss encountered at batch 37. Loss value: nan. "
        "Terminating training immediately."
    )
    assert seen.batches == _epoch0(37)


def test_validation_interval_validates_the_same_and_stops_at_the_same_batch(monkeypatch):
    x, y = _poisoned()
    validation = (np.zeros((64, 8), "float32"), np.zeros(64, "int64"))
    seen = _both(monkeypatch, make_model, x, y, validation_data=validation, validation_interval=10)
    assert seen.stop_reason == _stopped_at(40) and seen.batches == _epoch0(63)
    assert "val_loss" in seen.keys


@pytest.mark.parametrize("resumed_freq", ["epoch", 4])
def test_a_mid_epoch_resume_counts_the_restored_running_sum(monkeypatch, tmp_path, resumed_freq):
    """A run backed up at batch 4 of 20 is resumed. The big losses begin at batch 2, so the
    restored running sum already holds two of them: the overflow comes 11 big batches after
    batch 2 counting the restored sum, 2 batches later if the resumed check started from
    zero. save_freq=4 on resume reads the batch logs itself (both runs take that path)."""
    x, y = _overflowing(big_from=2 * 32)

    class Interrupt(Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 5:
                raise KeyboardInterrupt

    def resumed(name):
        backup_dir = tmp_path / name
        with pytest.raises(KeyboardInterrupt):
            _frozen().fit(
                x,
                y,
                batch_size=32,
                epochs=2,
                shuffle=False,
                verbose=0,
                callbacks=[BackupAndRestore(backup_dir, save_freq=4), Interrupt()],
            )
        return [BackupAndRestore(backup_dir, save_freq=resumed_freq)]

    alone = _fit(monkeypatch, _frozen, x, y, reader=False, extra=resumed("a"), epochs=2)
    logged = _fit(monkeypatch, _frozen, x, y, reader=True, extra=resumed("b"), epochs=2)
    if resumed_freq == "epoch":
        assert alone.snapshots == 0
    assert alone.seen() == logged.seen()
    assert alone.batches == [(0, b) for b in range(4, 20)]
    lines = alone.out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Batch 12: Invalid loss")
    assert alone.stop_reason == _stopped_at(12, value="inf") and alone.epoch == [0]


class _NoLoss(torcheras.Model):
    """A custom step that logs "l", no "loss": Keras's TerminateOnNaN skips such batches."""

    def train_step(self, batch):
        return {"l": super().train_step(batch)["loss"]}


def _custom(cls, **compile_kwargs):
    def make():
        model = cls(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)))
        model.compile("adam", "sparse_categorical_crossentropy", device="cpu", **compile_kwargs)
        return model

    return make


def test_a_step_that_returns_no_loss_is_never_stopped(monkeypatch):
    x, y = _poisoned(n=640, bad_from=96)
    seen = _both(monkeypatch, _custom(_NoLoss), x, y)
    assert seen.out == "" and seen.stop_reason is None and seen.epoch == [0, 1, 2]
    assert len(seen.batches) == 60


class _TrackedLoss(torcheras.Model):
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


def test_a_trackers_result_as_the_loss_across_mid_epoch_validations(monkeypatch):
    """validation_interval puts the collector's state back after each mid-epoch pass (the
    step's metric is found again from the tracker): the watch still reads the tracker."""
    x, y = _poisoned(n=1600, bad_from=7 * 32)

    def make():
        model = _TrackedLoss()
        model.compile(torch.optim.SGD(model.parameters(), lr=0.1), device="cpu")
        return model

    validation = (np.zeros((64, 8), "float32"), np.zeros(64, "int64"))
    seen = _both(monkeypatch, make, x, y, validation_data=validation, validation_interval=5)
    assert "Batch 7: Invalid loss" in seen.out and seen.batches == _epoch0(31)


def test_jit_compile(monkeypatch):
    x, y = _poisoned(n=1600, bad_from=7 * 32)
    seen = _both(monkeypatch, lambda: make_model(jit_compile=True), x, y)
    assert seen.stop_reason == _stopped_at(7) and seen.batches == _epoch0(31)


def test_mixed_precision(monkeypatch):
    x, y = _poisoned()
    seen = _both(monkeypatch, lambda: make_model(precision="bf16-mixed"), x, y)
    assert seen.stop_reason == _stopped_at(40) and seen.batches == _epoch0(63)


def test_two_terminate_on_nan_both_report_as_in_keras(monkeypatch):
    """Each reads the batch logs for the other: neither takes the watch, both print."""
    x, y = _poisoned()
    seen = _both(
        monkeypatch,
        make_model,
        x,
        y,
        watched=False,
        stops=lambda: [TerminateOnNaN(), TerminateOnNaN()],
    )
    assert seen.out == "Batch 40: Invalid loss, terminating training\n" * 2
    assert seen.stop_reason == _stopped_at(40) and seen.batches == _epoch0(63)


def test_inside_a_nested_callback_list(monkeypatch):
    x, y = _poisoned()
    seen = _both(
        monkeypatch, make_model, x, y, watched=False, stops=lambda: CallbackList([TerminateOnNaN()])
    )
    assert seen.stop_reason == _stopped_at(40) and seen.batches == _epoch0(63)


class _LogsLossToo(torcheras.Model):
    """The step returns its loss and also Model.log's it under "loss" (both are added to the
    epoch's running mean, as the batch logs show)."""

    def train_step(self, batch):
        logs = super().train_step(batch)
        self.log("loss", logs["loss"])
        return logs


def test_model_log_of_the_loss_inside_the_step(monkeypatch):
    x, y = _poisoned()
    seen = _both(monkeypatch, _custom(_LogsLossToo), x, y)
    assert seen.stop_reason == _stopped_at(40) and seen.batches == _epoch0(63)


class _SmoothedLoss(torcheras.Model):
    """The step returns a buffer it updates in place every batch (a loss it keeps itself)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.register_buffer("last_loss", torch.zeros(()))

    def train_step(self, batch):
        self.last_loss.copy_(super().train_step(batch)["loss"].detach())
        return {"loss": self.last_loss}


def test_a_returned_buffer_changed_in_place_later(monkeypatch):
    x, y = _poisoned()
    seen = _both(monkeypatch, _custom(_SmoothedLoss), x, y)
    assert seen.out == "Batch 40: Invalid loss, terminating training\n"
    assert seen.batches == _epoch0(63)


class _RetainsGraph(torcheras.Model):
    """A step that backpropagates with retain_graph=True (a GAN's habit) and returns its
    loss as it is (the default step returns it undetached too); records its activations."""

    def __init__(self, *args):
        super().__init__(*args)
        self.activations = []

    def train_step(self, batch):
        x, y = batch
        hidden = self.module[0](x).repeat(1, 64)
        self.activations.append(weakref.ref(hidden))
        loss = nn.functional.cross_entropy(self.module(x), y) + 0 * hidden.sin().mean()
        self.optimizer.zero_grad()
        loss.backward(retain_graph=True)
        self.optimizer.step()
        return {"loss": loss}


def test_a_window_keeps_no_batch_graph_alive(monkeypatch):
    x, y = _poisoned(n=1280, bad_from=1280)  # 40 clean batches
    alive = {}
    made = []

    def make():
        made.append(_custom(_RetainsGraph)())
        return made[-1]

    def count(batch, logs):
        if batch == 30:  # 30 batches into the first 32-batch window
            alive[len(alive)] = sum(ref() is not None for ref in made[-1].activations)

    _both(monkeypatch, make, x, y, epochs=1, extra=[LambdaCallback(on_train_batch_begin=count)])
    watch_alive, logs_alive = alive[0], alive[1]
    assert logs_alive <= 1  # the last batch's, still in the loop's hands
    assert watch_alive <= 1, f"{watch_alive} batches' graphs alive"


class _Counting(TerminateOnNaN):
    """A user's subclass that does more in its batch hook."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def on_batch_end(self, batch, logs=None):
        self.calls += 1
        super().on_batch_end(batch, logs)


def test_a_subclass_batch_hook_is_still_called(monkeypatch):
    x, y = _poisoned()
    made = []

    def stops():
        made.append(_Counting())
        return made[-1]

    seen = _both(monkeypatch, make_model, x, y, watched=False, stops=stops)
    assert seen.out == "Batch 40: Invalid loss, terminating training\n"
    assert [stop.calls for stop in made] == [64, 64]


class _HugeFloats(torcheras.Model):
    """A step that returns Python floats: 1e200 (finite for Keras's float64 logs) for
    batches 10..19, NaN from batch 20."""

    def train_step(self, batch):
        super().train_step(batch)
        step = self.loop.batch
        return {"loss": float("nan") if step >= 20 else 1e200 if step >= 10 else 1.0}


def test_python_float_losses_above_float32s_range(monkeypatch):
    x, y = _poisoned(n=3200, bad_from=3200)
    seen = _both(monkeypatch, _custom(_HugeFloats), x, y)
    assert seen.stop_reason == _stopped_at(20)


# ---- one instance, several uses -------------------------------------------------------------


def test_one_instance_in_consecutive_fits_and_then_a_hand_written_loop(monkeypatch):
    """The same TerminateOnNaN: a fit on the watch, one that raises mid-epoch, one on the
    batch-logs path, one on the watch again, then a hand-written loop of plain dicts."""
    stop = TerminateOnNaN()
    x, y = _poisoned()
    first = _fit(monkeypatch, make_model, x, y, reader=False, stops=stop)
    assert first.snapshots == 0 and first.stop_reason == _stopped_at(40)
    assert first.batches == _epoch0(63)

    class Boom(Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 10:
                raise ValueError("boom")

    raised = _fit(monkeypatch, make_model, x, y, reader=False, stops=stop, extra=[Boom()])
    assert raised.error == "ValueError: boom" and raised.out == ""

    x2, y2 = _poisoned(bad_from=70 * 32)  # checks after batches 31, 63, 95
    for reader in (True, False):
        again = _fit(monkeypatch, make_model, x2, y2, reader=reader, stops=stop)
        assert again.out == "Batch 70: Invalid loss, terminating training\n"
        assert again.stop_reason == _stopped_at(70) and again.batches == _epoch0(95)
        assert (again.snapshots == 0) == (not reader)

    model = make_model()
    loop = CallbackList([stop], model=model)
    loop.on_train_begin()
    loop.on_epoch_begin(0)
    loop.on_train_batch_end(0, {"loss": 0.5})
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        loop.on_train_batch_end(1, {"loss": float("nan")})
    assert printed.getvalue() == "Batch 1: Invalid loss, terminating training\n"
    assert model.stop_training


# ---- the background writer --------------------------------------------------------------------


def _script(tmp_path, body, delay=0.0, timeout=60):
    """Run ``body`` (after _SLOW_WRITES) in a fresh interpreter; each background weights
    write sleeps ``delay`` seconds first and prints "write done" when it has landed."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(_SLOW_WRITES) + textwrap.dedent(body))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": "1",
        "DELAY": str(delay),
    }
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tmp_path,
    )


_SLOW_WRITES = """
    import os, sys, time
    import torch, torcheras
    from torcheras import checkpoint
    from torcheras.callbacks import CallbackList, ModelCheckpoint

    torch.set_num_threads(1)
    folder = sys.argv[1]
    original = checkpoint.save_weights

    def slow(*args, **kwargs):  # the write lands well after the script's last line
        time.sleep(float(os.environ["DELAY"]))
        result = original(*args, **kwargs)
        print("write done", flush=True)
        return result

    checkpoint.save_weights = slow

    def model():
        torch.manual_seed(0)
        m = torcheras.Model(torch.nn.Linear(4, 2))
        m.compile("adam", "mse", device="cpu")
        return m
"""


def test_a_write_pending_when_the_script_ends_lands_whole(tmp_path):
    """A hand-written loop's ModelCheckpoint saves in the background and the script ends
    without on_train_end: the interpreter waits for the write, whose file loads."""
    result = _script(
        tmp_path,
        """
    m = model()
    torch.save(m.module.state_dict(), f"{folder}/expected.pt")
    callbacks = CallbackList([ModelCheckpoint(f"{folder}/w.weights.pt", save_weights_only=True)],
                             model=m, epochs=1, steps=1)
    callbacks.on_train_begin()
    callbacks.on_epoch_begin(0)
    callbacks.on_epoch_end(0, {"loss": 1.0})
    print("script end", flush=True)
""",
        delay=0.5,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["script end", "write done"]  # pending at the end
    restored = torcheras.Model(torch.nn.Linear(4, 2))
    restored.load_weights(tmp_path / "w.weights.pt")
    expected = torch.load(tmp_path / "expected.pt")
    assert all(torch.equal(restored.module.state_dict()[k], v) for k, v in expected.items())


def test_a_fit_in_a_thread_that_outlives_the_main_thread_saves(tmp_path):
    result = _script(
        tmp_path,
        """
    import threading
    import numpy as np
    from torcheras.callbacks import ModelCheckpoint

    def train():
        threading.main_thread().join()  # the main thread's script is over
        time.sleep(0.2)
        x = np.random.rand(64, 4).astype("float32")
        y = np.random.rand(64, 2).astype("float32")
        model().fit(x, y, epochs=2, verbose=0, callbacks=[
            ModelCheckpoint(folder + "/w{epoch}.weights.pt", save_weights_only=True)])

    threading.Thread(target=train).start()
""",
    )
    assert "Error" not in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.glob("w*.weights.pt")) == [
        "w1.weights.pt",
        "w2.weights.pt",
    ]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork")
def test_a_forked_child_saves_after_the_parent_saved(tmp_path):
    """This process saves in the background, then forks (multiprocessing's default on
    Linux); the child trains with ModelCheckpoint too."""
    rng = np.random.default_rng(0)
    x, y = rng.random((64, 8)).astype("float32"), rng.integers(0, 3, 64)

    def train(tag):
        make_model().fit(
            x,
            y,
            epochs=1,
            verbose=0,
            callbacks=[
                ModelCheckpoint(str(tmp_path / f"{tag}.weights.pt"), save_weights_only=True)
            ],
        )

    train("parent")
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        code = 1
        try:
            train("child")
            code = 0
        finally:
            os._exit(code)
    for _ in range(40):  # 4 s: the child needs well under 1
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's fit hung")
    assert os.waitstatus_to_exitcode(status) == 0
    assert (tmp_path / "child.weights.pt").exists()


class _NanInSecondEpoch(torch.nn.Module):
    """Finite outputs, except NaN ones at the second epoch's batch 2 (20 batches an epoch)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(8, 3)
        self.calls = 0

    def forward(self, inputs):
        out = self.net(inputs)
        if self.training:
            self.calls += 1
            if self.calls == 20 + 3:
                out = out * float("nan")
        return out


def test_the_watchs_windows_start_again_each_epoch(monkeypatch):
    """Two epochs' worth of finite losses, then NaN at the second epoch's batch 2: named
    there (not at a batch counted from the first epoch), on both paths."""
    x, y = _poisoned(n=640, bad_from=640)  # every input finite

    def make():
        model = torcheras.Model(_NanInSecondEpoch())
        model.compile("adam", "sparse_categorical_crossentropy", device="cpu")
        return model

    seen = _both(monkeypatch, make, x, y)
    assert "Batch 2: Invalid loss, terminating training" in seen.out
    assert seen.epoch == [0, 1]
    assert seen.stop_reason == "TerminateOnNaN: loss was nan at epoch 2, batch 2"
    assert seen.batches[-1] == (1, 19)  # the second epoch ran to its end (20 < 32 batches)


class _LogNanLossAtEpochBegin(Callback):
    """``Model.log("loss", nan)`` from the second epoch's ``on_epoch_begin``: outside any
    batch, it joins the first batch's running loss (the batch logs show it there)."""

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            self.model.log("loss", torch.tensor(float("nan")), weight=1)


def test_a_loss_logged_before_the_first_batch_is_named_at_that_batch(monkeypatch):
    x, y = _poisoned(n=640, bad_from=640)  # every input finite
    seen = _both(monkeypatch, make_model, x, y, extra=[_LogNanLossAtEpochBegin()])
    assert "Batch 0: Invalid loss, terminating training" in seen.out
    assert seen.stop_reason == _stopped_at(0, epoch=2)


class _LogNanLossAtBatchBegin(Callback):
    """``Model.log("loss", nan)`` from batch 5's ``on_train_batch_begin`` (inside the watch's
    window, not its first batch; the default step, inlined): it joins batch 5's running
    loss, which the batch logs show NaN from there."""

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 5:
            self.model.log("loss", torch.tensor(float("nan")), weight=1)


def test_a_loss_logged_from_a_batch_begin_hook_is_named_at_that_batch(monkeypatch):
    x, y = _poisoned(n=640, bad_from=640)  # every input finite
    seen = _both(monkeypatch, make_model, x, y, extra=[_LogNanLossAtBatchBegin()])
    assert "Batch 5: Invalid loss, terminating training" in seen.out
    assert seen.stop_reason == _stopped_at(5) and seen.epoch == [0]


class _LossIntoOneBuffer:
    """A compiled loss callable (the default step, inlined) that returns the same scalar
    tensor every batch, written in place (a loss that keeps its last value itself)."""

    def __init__(self):
        self.last = torch.zeros(())

    def __call__(self, y_pred, y_true):
        self.last = self.last.detach()  # the same storage, without the last batch's graph
        return self.last.copy_(nn.functional.cross_entropy(y_pred, y_true))


def test_a_compiled_loss_that_returns_one_buffer_changed_in_place(monkeypatch):
    """The watch keeps each batch's loss tensor; one written in place every batch is copied
    (else the window would be replayed with the last batch's value: batch 32 named)."""
    x, y = _poisoned()  # NaN from batch 40: the window 32..63 holds it

    def make():
        model = make_model(loss=_LossIntoOneBuffer())
        assert model._inlined_train_step() is not None  # the default step, inlined
        return model

    seen = _both(monkeypatch, make, x, y)
    assert seen.out == "Batch 40: Invalid loss, terminating training\n"
    assert seen.stop_reason == _stopped_at(40)


class _OwnWatch(Callback):
    """Another user of ``model.loop.watch_loss``: relies on fit to check the epoch's end."""

    def __init__(self):
        self.bad = []

    def on_train_begin(self, logs=None):
        self.watch = self.model.loop.watch_loss(self, 32, lambda b, v: self.bad.append((b, v)))


def test_fit_checks_a_watchs_last_window_at_each_epochs_end():
    """20 batches an epoch, NaN from batch 5: fewer than 32 batches, so only the check fit
    makes after the epoch's last batch can see it (the callback never calls check())."""
    x, y = _poisoned(n=640, bad_from=5 * 32)
    own = _OwnWatch()
    make_model().fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0, callbacks=[own])
    assert own.watch is not None
    assert [batch for batch, _ in own.bad] == [5, 0]  # each epoch's first bad batch
    assert all(math.isnan(value) for _, value in own.bad)
