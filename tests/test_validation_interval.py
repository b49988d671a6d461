"""fit(validation_interval=N): validation every N optimizer steps inside the epochs.

Tiny seeded CPU fits: 160 training samples in batches of 16 (10 batches an epoch), 48
validation samples. Every validation result is checked against ``model.evaluate`` on the
weights of that step (float32, same batches: rel 1e-6)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_model
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from torcheras import callbacks as cb

BATCH = 16
# One pytest-xdist worker runs the module (`--dist loadgroup`): `unbroken` runs once
pytestmark = pytest.mark.xdist_group("test_validation_interval")


@pytest.fixture
def data(blobs):
    """(x, y) to train on, and validation data whose labels are shifted by one class, so
    that the better the model learns, the worse ``val_loss`` gets: early stopping and
    plateaus come after a few validations."""
    x, y = blobs
    return (x[:160], y[:160]), (x[160:208], (y[160:208] + 1) % 3)


class Snapshots(cb.Callback):
    """Each validation as a callback sees it: the step, where the loop is, the weights."""

    def __init__(self):
        self.seen = []

    def on_validation_end(self, step, logs=None):
        loop = self.model.loop
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.seen.append(
            {
                "step": step,
                "epoch": loop.epoch,
                "batch": loop.batch,
                "accumulating": loop.accumulating,
                "logs": dict(logs),
                "weights": weights,
            }
        )


class Events(cb.Callback):
    """The order of training batches, validations and epoch ends."""

    def __init__(self):
        self.events = []

    def on_train_batch_end(self, batch, logs=None):
        self.events.append(("batch", batch))

    def on_test_begin(self, logs=None):
        self.events.append(("test_begin",))

    def on_validation_end(self, step, logs=None):
        self.events.append(("validation", step))

    def on_train_batches_end(self, epoch):
        self.events.append(("batches_end", epoch))

    def on_epoch_end(self, epoch, logs=None):
        self.events.append(("epoch_end", epoch))


def assert_results_are_evaluate_at_that_step(model, snapshots, val):
    """Each validation's logs are what ``evaluate`` gives on the weights of its step."""
    assert snapshots
    for seen in snapshots:
        model.load_state_dict(seen["weights"])
        expected = model.evaluate(*val, batch_size=BATCH, verbose=0, return_dict=True)
        for key, value in expected.items():
            assert seen["logs"][f"val_{key}"] == pytest.approx(value, rel=1e-6), (seen["step"], key)


def test_validates_every_n_steps_and_once_on_a_step_that_ends_an_epoch(data):
    (x, y), val = data
    model = make_model()
    snaps, events = Snapshots(), Events()
    history = model.fit(
        x, y, batch_size=BATCH, epochs=2, validation_data=val, validation_interval=4,
        verbose=0, callbacks=[snaps, events],
    )  # fmt: skip
    # steps 4 and 8 inside epoch 0, 10 at its end, 12 and 16 inside epoch 1, 20 at its end
    assert history.validation_history["step"] == [4, 8, 10, 12, 16, 20]
    assert history.validation_history["epoch"] == [0, 0, 0, 1, 1, 1]
    assert [s["batch"] for s in snaps.seen] == [3, 7, 9, 1, 5, 9]
    assert history.params == {"verbose": 0, "epochs": 2, "steps": 10, "validation_interval": 4}
    # a pass each: on_test_begin once per validation, never twice on step 20
    assert [e for e in events.events if e[0] != "batch"][:4] == [
        ("test_begin",), ("validation", 4), ("test_begin",), ("validation", 8)
    ]  # fmt: skip
    assert sum(e == ("test_begin",) for e in events.events) == 6
    # a mid-epoch validation comes right after its batch, before the next one
    i = events.events.index(("validation", 4))
    assert events.events[i - 2 : i + 2] == [
        ("batch", 3), ("test_begin",), ("validation", 4), ("batch", 4)
    ]  # fmt: skip
    # the epoch's end validates in Keras's place: after the last batch's hooks
    end = events.events[-5:]
    assert end == [
        ("batch", 9), ("batches_end", 1), ("test_begin",), ("validation", 20), ("epoch_end", 1)
    ]  # fmt: skip
    # the epochs' val_* (Keras's meaning) are the validations at their last steps
    vh = history.validation_history
    assert history.history["val_loss"] == [vh["val_loss"][2], vh["val_loss"][5]]
    assert history.history["val_accuracy"] == [vh["val_accuracy"][2], vh["val_accuracy"][5]]
    assert [s["logs"]["val_loss"] for s in snaps.seen] == vh["val_loss"]
    assert_results_are_evaluate_at_that_step(model, snaps.seen, val)


def test_without_the_option_nothing_changes(data):
    (x, y), val = data
    model = make_model()
    events = Events()
    history = model.fit(x, y, batch_size=BATCH, epochs=2, validation_data=val, verbose=0,
                        callbacks=[events])  # fmt: skip
    assert history.params == {"verbose": 0, "epochs": 2, "steps": 10}
    assert history.validation_history == {}
    assert not any(e[0] == "validation" for e in events.events)
    assert sum(e == ("test_begin",) for e in events.events) == 2


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_a_bad_interval_is_refused_naming_it(data, bad):
    (x, y), val = data
    with pytest.raises(ValueError, match="`validation_interval` must be a positive integer"):
        make_model().fit(x, y, validation_data=val, validation_interval=bad, verbose=0)


def test_an_interval_without_validation_data_is_refused(data):
    (x, y), _ = data
    with pytest.raises(
        ValueError, match=r"validation_interval=5.*no validation data.*validation_split"
    ):
        make_model().fit(x, y, validation_interval=5, verbose=0)


def test_with_validation_freq_epoch_ends_keep_keras_meaning(data):
    (x, y), val = data
    model = make_model()
    history = model.fit(
        x, y, batch_size=BATCH, epochs=3, validation_data=val, validation_freq=2,
        validation_interval=4, verbose=0,
    )  # fmt: skip
    # epoch 1's end (step 20) validates for validation_freq; epochs 0 and 2 end on 10 and 30
    assert history.validation_history["step"] == [4, 8, 12, 16, 20, 24, 28]
    assert history.history["val_loss"] == [history.validation_history["val_loss"][4]]
    assert len(history.history["loss"]) == 3


def test_with_gradient_accumulation_a_step_is_a_whole_group(data):
    (x, y), val = data
    model = make_model(gradient_accumulation_steps=3)
    snaps = Snapshots()
    history = model.fit(
        x, y, batch_size=BATCH, epochs=2, validation_data=val, validation_interval=2,
        verbose=0, callbacks=[snaps],
    )  # fmt: skip
    # 10 batches in groups of 3, 3, 3 and 1: 4 optimizer steps an epoch
    assert history.validation_history["step"] == [2, 4, 6, 8]
    assert [s["batch"] for s in snaps.seen] == [5, 9, 5, 9]  # after a group's last batch
    assert not any(s["accumulating"] for s in snaps.seen)
    assert_results_are_evaluate_at_that_step(model, snaps.seen, val)


def test_a_short_last_group_of_unknown_length_epochs_is_validated_at_the_epoch_end(data):
    (x, y), val = data

    class Batches:  # 8 batches of unknown number: groups of 3, 3 and 2 (cut by the end)
        def __iter__(self):
            for i in range(0, 128, BATCH):
                yield torch.as_tensor(x[i : i + BATCH]), torch.as_tensor(y[i : i + BATCH])

    model = make_model(gradient_accumulation_steps=3)
    snaps = Snapshots()
    history = model.fit(
        Batches(), epochs=2, validation_data=val, validation_freq=[99], validation_interval=3,
        verbose=0, callbacks=[snaps],
    )  # fmt: skip
    assert history.validation_history["step"] == [3, 6]  # each epoch's third step: its end
    assert "val_loss" not in history.history  # validation_freq validates no epoch
    assert_results_are_evaluate_at_that_step(model, snaps.seen, val)


def test_unknown_length_epochs_reuse_a_last_batch_validation_at_the_epoch_end(data):
    (x, y), val = data

    def batches():
        for i in range(0, 160, BATCH):
            yield torch.as_tensor(x[i : i + BATCH]), torch.as_tensor(y[i : i + BATCH])

    class Twice:
        def __iter__(self):
            return batches()

    model = make_model()
    events = Events()
    history = model.fit(Twice(), epochs=2, validation_data=val, validation_interval=5,
                        verbose=0, callbacks=[events])  # fmt: skip
    assert history.validation_history["step"] == [5, 10, 15, 20]
    assert sum(e == ("test_begin",) for e in events.events) == 4  # not 6: reused
    vh = history.validation_history["val_loss"]
    assert history.history["val_loss"] == [vh[1], vh[3]]


def test_with_steps_per_epoch(data):
    (x, y), val = data
    model = make_model()
    history = model.fit(
        x, y, batch_size=BATCH, epochs=3, steps_per_epoch=5, validation_data=val,
        validation_interval=2, verbose=0,
    )  # fmt: skip
    assert history.validation_history["step"] == [2, 4, 5, 6, 8, 10, 12, 14, 15]
    assert history.validation_history["epoch"] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert model.loop.global_step == 15


def test_early_stopping_stops_after_the_batch_that_validated_and_restores_the_best(data):
    (x, y), val = data
    model = make_model()
    snaps = Snapshots()
    stop = cb.EarlyStopping(patience=2, restore_best_weights=True)
    history = model.fit(
        x, y, batch_size=BATCH, epochs=5, validation_data=val, validation_interval=3,
        verbose=0, callbacks=[snaps, stop],
    )  # fmt: skip
    losses = history.validation_history["val_loss"]
    best = int(np.argmin(losses))
    # stopped at the second validation in a row without a new best, mid-epoch
    assert len(losses) == best + 3
    assert stop.stopped_step == history.validation_history["step"][-1] == model.loop.optimizer_steps
    assert model.loop.global_step == stop.stopped_step  # not one batch more
    assert stop.stopped_step % 10 != 0  # inside an epoch
    assert history.epoch == [model.loop.epoch]
    assert stop.best == losses[best] and stop.best_step == history.validation_history["step"][best]
    assert (
        f"did not improve for 2 validations; best {losses[best]:.4g} at step "
        in history.stop_reason
    )
    # the weights of the best validation's step, exactly
    for key, value in model.state_dict().items():
        assert torch.equal(value, snaps.seen[best]["weights"][key]), key
    # the epoch logs hold the last validation (that step's, not a second pass)
    assert history.history["val_loss"][-1] == losses[-1]


def test_a_training_key_is_still_watched_per_epoch(data):
    (x, y), val = data
    model = make_model()
    stop = cb.EarlyStopping(monitor="loss", patience=0, min_delta=10.0)  # never improves
    history = model.fit(x, y, batch_size=BATCH, epochs=4, validation_data=val,
                        validation_interval=3, verbose=0, callbacks=[stop])  # fmt: skip
    assert history.epoch == [0, 1] and stop.stopped_step is None  # Keras: epoch 1 stops


def test_model_checkpoint_keeps_the_best_validation_of_any_step(data, tmp_path):
    (x, y), val = data
    model = make_model()
    snaps = Snapshots()
    path = tmp_path / "best-{epoch}-{batch}.pt"
    ckpt = cb.ModelCheckpoint(str(path), save_best_only=True, save_weights_only=True)
    history = model.fit(
        x, y, batch_size=BATCH, epochs=2, validation_data=val, validation_interval=3,
        verbose=0, callbacks=[snaps, ckpt],
    )  # fmt: skip
    losses = history.validation_history["val_loss"]
    best = int(np.argmin(losses))
    saved = snaps.seen[best]
    expected_name = f"best-{saved['epoch'] + 1}-{saved['batch'] + 1}.pt"
    assert ckpt.last_saved == str(tmp_path / expected_name)
    assert ckpt.best == losses[best]
    assert torch.load(tmp_path / expected_name, weights_only=True)["logs"] == {
        "val_accuracy": history.validation_history["val_accuracy"][best],
        "val_loss": losses[best],
    }
    fresh = make_model()
    fresh.load_weights(tmp_path / expected_name)
    assert fresh.state_dict().keys() == saved["weights"].keys()
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, saved["weights"][key]), key


def test_reduce_lr_on_plateau_lowers_the_rate_from_the_next_batch(data):
    (x, y), val = data
    model = make_model()
    rates = []
    record = cb.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: rates.append(model.optimizer.param_groups[0]["lr"])
    )
    reduce = cb.ReduceLROnPlateau(patience=1, factor=0.5, min_delta=0.0)
    history = model.fit(
        x, y, batch_size=BATCH, epochs=2, validation_data=val, validation_interval=3,
        verbose=0, callbacks=[reduce, record],
    )  # fmt: skip
    steps, losses = history.validation_history["step"], history.validation_history["val_loss"]
    expected, rate, best = [], 0.02, None
    for step in range(1, 21):  # the rate each batch used, replayed from the validations
        expected.append(rate)
        if step in steps:
            value = losses[steps.index(step)]
            if best is None or value < best:
                best = value
            else:
                rate *= 0.5
    assert rates == pytest.approx(expected, rel=1e-7)
    assert min(rates) < 0.02  # it did reduce, inside an epoch
    assert history.history["learning_rate"] == pytest.approx([rates[9], rates[19]], rel=1e-7)


def test_csv_and_tensorboard_record_each_validation_at_its_step(data, tmp_path):
    (x, y), val = data
    model = make_model()
    csv_path = tmp_path / "log.csv"
    history = model.fit(
        x, y, batch_size=BATCH, epochs=2, validation_data=val, validation_interval=4,
        verbose=0, callbacks=[cb.CSVLogger(csv_path), cb.TensorBoard(tmp_path / "tb")],
    )  # fmt: skip
    vh = history.validation_history
    with open(tmp_path / "log.validation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "epoch", "val_accuracy", "val_loss"]
    assert [int(r["step"]) for r in rows] == vh["step"] == [4, 8, 10, 12, 16, 20]
    assert [int(r["epoch"]) for r in rows] == vh["epoch"]
    assert [float(r["val_loss"]) for r in rows] == vh["val_loss"]  # repr round-trips exactly
    with open(csv_path, newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1"]  # one row per epoch
    acc = EventAccumulator(str(tmp_path / "tb" / "validation"), size_guidance={"scalars": 0})
    acc.Reload()
    points = acc.Scalars("evaluation_loss_vs_iterations")
    assert [p.step for p in points] == vh["step"]
    assert [p.value for p in points] == pytest.approx(vh["val_loss"], rel=1e-7)  # float32
    assert [p.step for p in acc.Scalars("epoch_loss")] == [0, 1]


# ---- exact resume: a real script killed with SIGKILL, then run again ---------------------------
SCRIPT = Path(__file__).parent / "resume" / "train_script.py"


def run_script(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(workdir), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


INTERVAL = 5


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory) -> Path:
    """train_script.py uninterrupted: 5 epochs of 10 batches, validating every 5 steps, with
    EarlyStopping / ReduceLROnPlateau / ModelCheckpoint on val_loss, CSVLogger, TensorBoard."""
    workdir = tmp_path_factory.mktemp("unbroken")
    done = run_script(workdir, "--validation-interval", str(INTERVAL))
    assert done.returncode == 0, done.stderr
    return workdir


@pytest.mark.parametrize(
    ("save_freq", "kill_at"),
    [
        (3, 17),  # the backup at step 15 was written after step 15's validation
        (5, 21),  # the backup at step 20 ends epoch 1 (10 batches): its validation comes after
    ],
)
def test_sigkill_mid_epoch_resumes_with_the_same_weights_and_validations(
    tmp_path, unbroken, save_freq, kill_at
):
    args = ["--validation-interval", str(INTERVAL), "--save-freq", str(save_freq)]
    killed = run_script(tmp_path, *args, "--kill-at", str(kill_at))
    assert killed.returncode == -signal.SIGKILL
    resumed = run_script(tmp_path, *args)
    assert resumed.returncode == 0, resumed.stderr
    final, expected = (torch.load(d / "final.pt", weights_only=True) for d in (tmp_path, unbroken))
    for key in expected:
        assert torch.equal(final[key], expected[key]), key
    got, want = (json.loads((d / "history.json").read_text()) for d in (tmp_path, unbroken))
    assert want["validation_history"]["step"] == list(range(5, 51, 5))
    assert got["validation_history"] == want["validation_history"]  # the same, none twice
    assert (got["history"], got["epoch"]) == (want["history"], want["epoch"])
    last_backup = kill_at // save_freq * save_freq
    assert got["batches_run"] == 50 - last_backup  # resumed there, not restarted
    for name in ("log.csv", "log.validation.csv"):
        assert (tmp_path / name).read_text() == (unbroken / name).read_text(), name
    for run_name in ("train", "validation"):
        assert _scalars(tmp_path / "tb" / run_name) == _scalars(unbroken / "tb" / run_name)
