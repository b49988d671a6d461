"""Timer: the budget, the stop reason, a backup kept, the clock across a resume."""

from __future__ import annotations

import datetime

import pytest
import torch
from conftest import make_model

from torcheras import callbacks as cb
from torcheras.callbacks import timer as timer_module


@pytest.mark.parametrize(
    ("given", "seconds"),
    [
        ("1h30m", 5400),
        ("45m", 2700),
        ("2d", 172800),
        ("1.5s", 1.5),
        ("00:01:30:00", 5400),
        ("01:30:00", 5400),
        (90, 90),
        (datetime.timedelta(minutes=2), 120),
        ({"hours": 1, "minutes": 30}, 5400),
    ],
)
def test_durations_are_read_as_keras_and_lightning_users_write_them(given, seconds):
    assert timer_module.parse_duration(given) == seconds


@pytest.mark.parametrize("bad", ["soon", "1x", -5, 0, "", None])
def test_an_unreadable_duration_says_how_to_write_one(bad):
    with pytest.raises(ValueError, match="Timer"):
        cb.Timer(bad)


class Clock:
    """time.monotonic for the timer: advanced 10 s by every training batch."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def tick(self, batch, logs) -> None:
        self.now += 10.0


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(timer_module.time, "monotonic", clock)
    return clock


def test_the_budget_stops_training_after_the_batch_that_spends_it(blobs, clock):
    x, y = blobs
    timer = cb.Timer("95s")
    history = make_model().fit(
        x, y, epochs=5, batch_size=40, callbacks=[cb.LambdaCallback(on_train_batch_end=clock.tick),
                                                  timer], verbose=0,
    )  # fmt: skip
    # 6 batches an epoch, 10 s each: 100 s are spent at the 4th batch of the 2nd epoch
    assert history.stop_reason == "Timer: budget of 95s spent at epoch 2, batch 3"
    assert history.epoch == [0, 1]  # the epoch ends (validation, logs) as with stop_training
    assert timer.time_elapsed() == 100.0 and timer.time_remaining() == 0.0


def test_with_backups_it_saves_where_it_stands_and_a_rerun_continues_exactly(
    blobs, clock, tmp_path
):
    x, y = blobs
    torch.manual_seed(0)
    reference = make_model()
    expected = reference.fit(x, y, epochs=3, batch_size=40, verbose=0)

    def run(budget: str):
        torch.manual_seed(0)
        model = make_model()
        timer = cb.Timer(budget)
        tick = cb.LambdaCallback(on_train_batch_end=clock.tick)
        backup = cb.BackupAndRestore(tmp_path / "backup")
        history = model.fit(
            x, y, epochs=3, batch_size=40, callbacks=[tick, timer, backup], verbose=0
        )
        return model, history, timer

    _, stopped, _ = run("95s")
    assert stopped.stop_reason == "Timer: budget of 95s spent at epoch 2, batch 3; backup written"
    assert stopped.epoch == [0]  # the cut epoch is not reported as done: it will resume
    assert (tmp_path / "backup" / "latest.pt").exists()  # kept for the next run
    model, resumed, timer = run("1h")
    assert timer.time_elapsed() == 100.0 + 10.0 * (18 - 10)  # the first run's 100 s count
    assert resumed.stop_reason is None and resumed.epoch == [0, 1, 2]
    assert resumed.history["loss"] == pytest.approx(expected.history["loss"], rel=1e-6)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)
    assert not (tmp_path / "backup").exists()  # finished: the backup is deleted


def test_interval_epoch_checks_at_epoch_ends_only(blobs, clock):
    x, y = blobs
    history = make_model().fit(
        x, y, epochs=5, batch_size=40, verbose=0,
        callbacks=[cb.LambdaCallback(on_train_batch_end=clock.tick), cb.Timer(95, "epoch")],
    )  # fmt: skip
    assert history.epoch == [0, 1]
    assert history.stop_reason == "Timer: budget of 1m35s spent at the end of epoch 2"
