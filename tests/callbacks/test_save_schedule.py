"""save_freq as an amount of training time (ModelCheckpoint, BackupAndRestore): parsing, saves
at the right batches on a fake clock (no sleeps), a resumed run, and torchrun (rank 0 decides)."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import launch_script, make_model

from torcheras import checkpoint
from torcheras.callbacks import BackupAndRestore, Callback, ModelCheckpoint, save_schedule


class FakeClock:
    """The seam ``save_schedule.clock``: time moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Tick(Callback):
    """Moves the fake clock ``seconds`` on before each training batch (training takes time)."""

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        self.clock, self.seconds = clock, seconds

    def on_train_batch_begin(self, batch, logs=None):
        self.clock.now += self.seconds


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(save_schedule, "clock", fake)
    return fake


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30min", 1800),
        ("2h", 7200),
        ("90s", 90),
        ("1h30min", 5400),
        ("1.5h", 5400),
        ("1d12h", 129600),
        ("30m", 1800),  # Timer's forms too: one reading of durations
        ("1h30m", 5400),
        ("01:30:00", 5400),
        (datetime.timedelta(minutes=30), 1800),
    ],
)
def test_durations_are_read_strictly(value, seconds):
    timer = save_schedule.parse_save_freq(value)
    assert isinstance(timer, save_schedule.SaveTimer) and timer.seconds == seconds
    assert ModelCheckpoint("m.pt", save_freq=value)._timer.seconds == seconds
    assert BackupAndRestore("b", save_freq=value)._timer.seconds == seconds


def test_epoch_and_batch_counts_keep_their_meaning():
    assert save_schedule.parse_save_freq("epoch") == "epoch"
    assert save_schedule.parse_save_freq(7) == 7
    assert ModelCheckpoint("m.pt", save_freq=7)._timer is None


@pytest.mark.parametrize(
    "value",
    ["30", "min", "", "30 minutes", "-5s", "0s", "batch", 0.5, True, 0,
     datetime.timedelta(0), datetime.timedelta(seconds=-3)],
)  # fmt: skip
def test_bad_save_freq_names_the_accepted_forms(value):
    accepted = r"'30min', '2h', '90s' or '1h30m'"
    with pytest.raises(
        ValueError, match=rf"Unrecognized save_freq: .*datetime\.timedelta.*{accepted}"
    ):
        ModelCheckpoint("m.pt", save_freq=value)
    with pytest.raises(ValueError, match=rf"Invalid value for argument `save_freq`.*{accepted}"):
        BackupAndRestore("b", save_freq=value)


def test_model_checkpoint_saves_when_the_time_has_passed_with_epoch_and_batch_names(
    tmp_path, blobs, clock
):
    x, y = blobs  # 240 samples, batch 50 -> 5 batches per epoch
    make_model().fit(
        x,
        y,
        epochs=2,
        batch_size=50,
        verbose=0,
        callbacks=[
            Tick(clock, 7.0),  # batch ends at 7 s, 14 s, 21 s: saved, then 7 s again...
            ModelCheckpoint(str(tmp_path / "e{epoch}-b{batch}.pt"), save_freq="20s"),
        ],
    )
    # global batches 3, 6, 9 -> epoch 1 batch 3, epoch 2 batch 1, epoch 2 batch 4
    assert sorted(os.listdir(tmp_path)) == ["e1-b3.pt", "e2-b1.pt", "e2-b4.pt"]
    assert torch.load(tmp_path / "e2-b4.pt", weights_only=True)["epoch"] == 1


def test_time_spent_validating_counts_and_saving_waits_for_a_batch_end(tmp_path, blobs, clock):
    class SlowValidation(Callback):
        def on_test_begin(self, logs=None):
            clock.now += 3600.0

    x, y = blobs
    ckpt = ModelCheckpoint(
        str(tmp_path / "e{epoch}-b{batch}.pt"), save_freq=datetime.timedelta(minutes=30)
    )
    make_model().fit(
        x, y, epochs=2, batch_size=60, validation_split=0.2, verbose=0,
        callbacks=[SlowValidation(), ckpt],
    )  # fmt: skip
    assert os.listdir(tmp_path) == ["e2-b1.pt"]  # the first batch after the slow validation


def test_backup_on_time_and_resume_counts_on_from_the_recorded_time(tmp_path, blobs, clock):
    """A crash after 8 batches: the backup holds ModelCheckpoint's time since its last save,
    so the resumed run saves at the same batches as an unbroken one, wherever the clock
    stands when it restarts."""
    x, y = blobs

    class Crash(Callback):
        def __init__(self, at):
            self.at = at

        def on_train_batch_end(self, batch, logs=None):
            if self.model.loop.global_step == self.at:
                raise RuntimeError("simulated crash")

    def train(folder, crash_at=-1):
        torch.manual_seed(0)
        model = make_model()
        model.fit(
            x,
            y,
            epochs=3,
            batch_size=60,
            verbose=0,
            callbacks=[
                Tick(clock, 10.0),
                ModelCheckpoint(str(folder / "ckpt" / "e{epoch}-b{batch}.pt"), save_freq="25s"),
                BackupAndRestore(folder / "backup", save_freq="20s", delete_checkpoint=False),
                Crash(crash_at),
            ],
        )
        return model

    reference = train(tmp_path / "a")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tmp_path / "b", crash_at=7)  # the last backup: after batch 6 (60 s)
    backup = checkpoint.load(tmp_path / "b" / "backup" / "latest.pt")
    assert backup["global_step"] == 6
    clock.now += 5000.0  # the restart comes much later: that time is not training time
    resumed = train(tmp_path / "b")
    # ModelCheckpoint saves at 30 s, 60 s, 90 s...: global batches 3, 6, 9, 12
    expected = ["e1-b3.pt", "e2-b2.pt", "e3-b1.pt", "e3-b4.pt"]
    assert sorted(os.listdir(tmp_path / "a" / "ckpt")) == expected
    assert sorted(os.listdir(tmp_path / "b" / "ckpt")) == expected
    last = checkpoint.load(tmp_path / "b" / "backup" / "latest.pt")
    assert (
        last["global_step"]
        == 12
        == checkpoint.load(tmp_path / "a" / "backup" / "latest.pt")["global_step"]
    )
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_a_batch_that_does_not_save_costs_one_clock_read(monkeypatch):
    reads = []

    def counting_clock():
        reads.append(1)
        return 0.0

    monkeypatch.setattr(save_schedule, "clock", counting_clock)
    for callback in (ModelCheckpoint("never.pt", save_freq="1h"), BackupAndRestore("b", "1h")):
        callback._timer.start()
        reads.clear()
        for _ in range(100):
            assert not callback._timer.due()
        assert len(reads) == 100


DDP_SCRIPT = """
import json, os, sys
import torch
import torcheras
from torcheras.callbacks import BackupAndRestore, Callback, ModelCheckpoint, save_schedule

rank = int(os.environ["RANK"])
now = [0.0]
save_schedule.clock = lambda: now[0]
save_schedule.SYNC_EVERY = 2  # rank 0's decision is broadcast every 2 batches

class Tick(Callback):  # only one rank's clock moves on: 100 s a batch
    def __init__(self, ticking_rank):
        self.ticking_rank = ticking_rank

    def on_train_batch_begin(self, batch, logs=None):
        if rank == self.ticking_rank:
            now[0] += 100.0

for ticking_rank in (1, 0):
    out = os.path.join(sys.argv[1], f"ticking{ticking_rank}")
    saves = {"ckpt": [], "backup": []}
    ckpt = ModelCheckpoint(os.path.join(out, "ckpt", "b{batch}.pt"), save_freq="150s")
    backup = BackupAndRestore(os.path.join(out, "bak"), save_freq="150s", delete_checkpoint=False)
    original_ckpt, original_backup = ckpt._save, backup._save
    ckpt._save = lambda *a: (saves["ckpt"].append(a[1]), original_ckpt(*a))
    backup._save = lambda: (saves["backup"].append(model.loop.global_step), original_backup())
    torch.manual_seed(0)
    model = torcheras.Model(torch.nn.Linear(5, 1))
    model.compile("sgd", "mse", device="cpu")
    model.fit(torch.randn(80, 5), torch.randn(80, 1), batch_size=8, verbose=0,
              callbacks=[Tick(ticking_rank), ckpt, backup])
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"saves{rank}.json"), "w") as f:
        json.dump(saves, f)
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_under_torchrun_rank_zero_clock_decides_for_every_rank(tmp_path):
    """Rank 1's clock alone says "save": nobody saves. Rank 0's alone: every rank takes part
    in each save, at the same batch (the first broadcast after the time has passed)."""
    script = tmp_path / "script.py"
    script.write_text(DDP_SCRIPT)
    src = str(Path(__file__).parents[2] / "src")
    launch_script(script, tmp_path, ranks=2, timeout=180, env={"PYTHONPATH": src})
    for ticking in (0, 1):
        out = tmp_path / f"ticking{ticking}"
        saves = [json.loads((out / f"saves{r}.json").read_text()) for r in (0, 1)]
        assert saves[0] == saves[1]  # the same decisions on both ranks
        if ticking == 1:  # rank 1's clock is not asked
            assert saves[0] == {"ckpt": [], "backup": []}
            assert not (out / "ckpt").exists() and not (out / "bak").exists()
            continue
        # 100 s a batch, checked every 2nd batch: 200 s at batch 1 (saved), 200 s at batch 3...
        assert saves[0]["ckpt"] == [1, 3, 5, 7, 9]
        assert saves[0]["backup"] == [2, 4, 6, 8, 10]  # global steps (after the batch)
        assert set(os.listdir(out / "ckpt")) == {f"b{b}.pt" for b in (2, 4, 6, 8, 10)}
        assert checkpoint.load(out / "bak" / "latest.pt")["global_step"] == 10
