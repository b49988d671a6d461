"""BackupAndRestore: a real training script is killed and restarted; it must end exactly where
an uninterrupted run ends (bit-identical weights, same History, CSV and TensorBoard files)."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from torcheras import checkpoint
from torcheras.callbacks import BackupAndRestore

SCRIPT = Path(__file__).parent.parent / "resume" / "train_script.py"
BATCHES = 50  # 5 epochs x 10 batches
# One pytest-xdist worker runs the module (`--dist loadgroup`): `reference` runs once
pytestmark = pytest.mark.xdist_group("test_backup_and_restore")


def _clean_signals() -> None:
    """The child starts as from a shell: default SIGINT, nothing blocked (a test runner's
    worker, pytest-xdist's for one, may ignore or block SIGINT, and children inherit that)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(workdir), *args],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_clean_signals,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run, the yardstick for every interrupted one."""
    workdir = tmp_path_factory.mktemp("reference")
    result = run(workdir)
    assert result.returncode == 0, result.stderr
    return workdir


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_same_as_reference(
    workdir: Path, reference: Path, trained_before: int | None = None
) -> None:
    """The resumed run ends as the unbroken one; ``trained_before``: batches the backup held,
    so the last process must have trained only the rest (not started over)."""
    final, expected = (torch.load(d / "final.pt", weights_only=True) for d in (workdir, reference))
    assert final.keys() == expected.keys()
    for key in expected:
        assert torch.equal(final[key], expected[key]), f"{key} differs from the unbroken run"
    got, want = (json.loads((d / "history.json").read_text()) for d in (workdir, reference))
    assert (got["history"], got["epoch"]) == (want["history"], want["epoch"])
    assert want["batches_run"] == BATCHES
    if trained_before is not None:
        assert got["batches_run"] == BATCHES - trained_before, "the resumed run started over"
    with open(workdir / "log.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert [r[0] for r in rows] == ["epoch", "0", "1", "2", "3", "4"]  # one row per epoch
    assert (workdir / "log.csv").read_text() == (reference / "log.csv").read_text()
    for run_name in ("train", "validation"):
        got, want = _scalars(workdir / "tb" / run_name), _scalars(reference / "tb" / run_name)
        for tag, points in got.items():
            steps = [s for s, _ in points]
            assert len(steps) == len(set(steps)), f"duplicated steps in {run_name}/{tag}"
        assert got == want
    assert not (workdir / "backup").exists()  # deleted after a successful fit


def _kill_points(seed: int, n: int) -> list[int]:
    return sorted(random.Random(seed).sample(range(1, BATCHES), n))


@pytest.mark.parametrize(("seed", "save_freq"), [(1, "1"), (2, "3"), (3, "7")])
def test_sigkill_at_a_random_batch_resumes_bit_identical(tmp_path, reference, seed, save_freq):
    kill_at = _kill_points(seed, 1)[0]
    killed = run(tmp_path, "--kill-at", str(kill_at), "--save-freq", save_freq)
    assert killed.returncode == -signal.SIGKILL
    state = checkpoint.load(tmp_path / "backup" / "latest.pt")
    every = int(save_freq)
    assert state["global_step"] == (kill_at - 1) // every * every  # the last backup before it
    assert state["batch"] == state["global_step"] % 10 or state["batch"] == 10
    resumed = run(tmp_path, "--save-freq", save_freq)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_as_reference(tmp_path, reference, trained_before=state["global_step"])


def test_sigkill_twice_in_one_run(tmp_path, reference):
    first, second = _kill_points(7, 2)
    assert run(tmp_path, "--kill-at", str(first)).returncode == -signal.SIGKILL
    assert run(tmp_path, "--kill-at", str(second)).returncode == -signal.SIGKILL
    assert run(tmp_path).returncode == 0
    assert_same_as_reference(tmp_path, reference)


def test_sigkill_between_epochs(tmp_path, reference):
    killed = run(tmp_path, "--kill-at", "2", "--kill-how", "epoch", "--save-freq", "epoch")
    assert killed.returncode == -signal.SIGKILL
    state = checkpoint.load(tmp_path / "backup" / "latest.pt")
    assert (state["epoch"], state["batch"]) == (2, 0)
    assert run(tmp_path, "--save-freq", "epoch").returncode == 0
    assert_same_as_reference(tmp_path, reference, trained_before=20)


def test_sigkill_during_the_backup_write_keeps_the_previous_backup(tmp_path, reference):
    killed = run(tmp_path, "--kill-at", "5", "--kill-how", "save")
    assert killed.returncode == -signal.SIGKILL
    backup = tmp_path / "backup"
    strays = [p.name for p in backup.iterdir() if p.name.startswith(checkpoint.TEMP_PREFIX)]
    assert strays, "the interrupted write should have left its temp file"
    state = checkpoint.load(backup / "latest.pt")  # intact: the 4th backup
    assert state["global_step"] == 4
    assert run(tmp_path).returncode == 0
    assert_same_as_reference(tmp_path, reference)


@pytest.mark.parametrize(
    ("how", "code", "exception"),
    [
        ("sigterm", 128 + signal.SIGTERM, "Preempted"),
        ("sigint", -signal.SIGINT, "KeyboardInterrupt"),
    ],
)
def test_preemption_writes_a_backup_at_the_current_batch(tmp_path, reference, how, code, exception):
    result = run(tmp_path, "--kill-at", "23", "--kill-how", how, "--save-freq", "epoch")
    assert result.returncode == code, result.stderr
    assert f"on_exception: {exception}" in result.stdout
    state = checkpoint.load(tmp_path / "backup" / "latest.pt")
    assert (state["epoch"], state["batch"], state["global_step"]) == (2, 3, 23)
    with open(tmp_path / "log.csv", newline="") as f:
        assert len(list(csv.reader(f))) == 3  # header + 2 epochs, flushed and closed
    # TensorBoard closed its files: the batch scalars since the last epoch's flush are there
    batch_steps = [step for step, _ in _scalars(tmp_path / "tb" / "train")["batch_loss"]]
    assert batch_steps == list(range(3, 24, 3))
    assert run(tmp_path, "--save-freq", "epoch").returncode == 0
    assert_same_as_reference(tmp_path, reference, trained_before=23)


def test_a_fresh_run_in_a_folder_of_an_earlier_run_resumes_to_one_row_per_epoch(
    tmp_path, reference
):
    """The earlier run's CSV and event files are there; this run is preempted in its first
    epoch and resumed: one CSV row per epoch, no TensorBoard step twice, the old files intact."""
    assert run(tmp_path).returncode == 0  # the earlier run, complete
    old_events = {p: p.read_bytes() for p in (tmp_path / "tb").rglob("*tfevents*")}
    assert run(tmp_path, "--kill-at", "4").returncode == -signal.SIGKILL  # in epoch 0
    assert run(tmp_path).returncode == 0
    with open(tmp_path / "log.csv", newline="") as f:
        assert [r[0] for r in csv.reader(f)] == ["epoch", "0", "1", "2", "3", "4"]
    assert (tmp_path / "log.csv").read_text() == (reference / "log.csv").read_text()
    for path, content in old_events.items():
        assert path.read_bytes() == content, f"{path.name} of the earlier run was changed"
    from tensorboard.backend.event_processing import event_file_loader

    for run_name in ("train", "validation"):
        seen: dict[tuple[str, int], str] = {}
        for path in sorted((tmp_path / "tb" / run_name).glob("*tfevents*")):
            if path in old_events:
                continue
            for event in event_file_loader.EventFileLoader(str(path)).Load():
                for value in event.summary.value:
                    key = (value.tag, event.step)
                    assert key not in seen, f"{key} written by {seen.get(key)} and {path.name}"
                    seen[key] = path.name
        assert {s for t, s in seen if t == "epoch_loss"} == {0, 1, 2, 3, 4}


def test_a_backup_of_another_architecture_names_the_backup_and_the_fix(tmp_path, blobs):
    x, y = blobs
    backup = tmp_path / "backup"
    make_model().fit(
        x, y, epochs=1, verbose=0, callbacks=[BackupAndRestore(backup, delete_checkpoint=False)]
    )
    wider = make_model(n_out=5)
    with pytest.raises(checkpoint.CheckpointError, match=r"latest\.pt.*move or delete the folder"):
        wider.fit(x, y, epochs=2, verbose=0, callbacks=[BackupAndRestore(backup)])
    other_optimizer = make_model(optimizer="sgd")
    with pytest.raises(checkpoint.CheckpointError, match=r"optimizer.*move or delete the folder"):
        other_optimizer.fit(x, y, epochs=2, verbose=0, callbacks=[BackupAndRestore(backup)])
    assert checkpoint.load(backup / "latest.pt")["epoch"] == 1  # nothing was lost


def test_corrupt_newest_backup_falls_back_to_the_previous_one(tmp_path, reference):
    assert run(tmp_path, "--kill-at", "17", "--double").returncode == -signal.SIGKILL
    latest, previous = tmp_path / "backup" / "latest.pt", tmp_path / "backup" / "previous.pt"
    assert checkpoint.load(previous)["global_step"] == 15
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated
    resumed = run(tmp_path, "--double")
    assert resumed.returncode == 0, resumed.stderr
    assert "latest.pt" in resumed.stderr and "previous.pt" in resumed.stderr
    assert "Resuming from the previous backup" in resumed.stderr
    assert_same_as_reference(tmp_path, reference)


def test_no_usable_backup_fails_clearly_instead_of_starting_over(tmp_path):
    assert run(tmp_path, "--kill-at", "12").returncode == -signal.SIGKILL
    latest = tmp_path / "backup" / "latest.pt"
    latest.write_bytes(b"not a checkpoint at all")
    result = run(tmp_path)
    assert result.returncode != 0
    assert "BackupAndRestore cannot resume: no usable backup" in result.stderr
    assert "move or delete that folder" in result.stderr
    assert latest.read_bytes() == b"not a checkpoint at all"  # left for the user to inspect


def test_malicious_backup_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    backup = tmp_path / "backup"
    backup.mkdir()
    torch.save({"kind": "training_state", "payload": Evil()}, backup / "latest.pt")
    model = make_model()
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"Refusing to load .*latest\.pt.*could "
        r"run code",
    ):
        model.fit(
            torch.randn(8, 8),
            torch.zeros(8, dtype=torch.long),
            verbose=0,
            callbacks=[BackupAndRestore(backup)],
        )
    with pytest.raises(checkpoint.CheckpointError, match="Refusing to load"):
        model.load_weights(backup / "latest.pt")
    assert not marker.exists()


def test_in_process_fit_resumes_and_deletes_its_backup(tmp_path, blobs):
    x, y = blobs
    backup = tmp_path / "b"
    model = make_model()
    model.fit(x, y, epochs=2, verbose=0, callbacks=[BackupAndRestore(backup, save_freq=3)])
    assert not backup.exists()
    keep = BackupAndRestore(backup, delete_checkpoint=False)
    model.fit(x, y, epochs=2, verbose=0, callbacks=[keep])
    assert checkpoint.load(backup / "latest.pt")["epoch"] == 2
    history = model.fit(x, y, epochs=3, verbose=0, callbacks=[BackupAndRestore(backup)])
    assert history.epoch == [0, 1, 2] and len(history.history["loss"]) == 3  # resumed at 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backup_dir": ""}, "Empty `backup_dir` argument passed"),
        ({"backup_dir": None}, "Empty `backup_dir` argument passed"),
        (
            {"backup_dir": "b", "save_freq": "batch"},
            r"Invalid value for argument `save_freq`\. "
            r"Received: save_freq='batch'",
        ),
        ({"backup_dir": "b", "save_freq": 0.15}, "Invalid value for argument `save_freq`"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BackupAndRestore(**kwargs)


def test_dataloader_with_shuffling_resumes_exactly_in_process(tmp_path):
    """A crash (an exception) mid-epoch with a shuffling DataLoader and dropout."""
    from torcheras.callbacks import Callback

    g = torch.Generator().manual_seed(5)
    data = torch.utils.data.TensorDataset(
        torch.randn(96, 8, generator=g), torch.randint(0, 3, (96,), generator=g)
    )

    class Crash(Callback):
        def __init__(self, at):
            self.at = at

        def on_train_batch_end(self, batch, logs=None):
            if self.model.loop.global_step == self.at:
                raise RuntimeError("simulated crash")

    def train(backup, crash_at=-1):
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3)
        )
        import torcheras

        model = torcheras.Model(net)
        model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"], device="cpu")
        loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)
        history = model.fit(
            loader,
            epochs=3,
            verbose=0,
            callbacks=[BackupAndRestore(backup, save_freq=2), Crash(crash_at)],
        )
        return model, history.history

    reference, ref_history = train(tmp_path / "a")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tmp_path / "b", crash_at=9)  # epoch 1, batch 2; last backup after batch 1
    assert checkpoint.load(tmp_path / "b" / "latest.pt")["global_step"] == 8
    resumed, history = train(tmp_path / "b")
    assert history == ref_history
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_backup_holds_the_amp_scaler_every_optimizer_and_scheduler(tmp_path, blobs):
    x, y = blobs
    model = make_model()
    model.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    model.extra_opt = torch.optim.SGD(model.parameters(), lr=0.5)  # e.g. a GAN's second one
    model.decay = torch.optim.lr_scheduler.StepLR(model.extra_opt, step_size=1)
    model.extra_opt.step()  # (no gradients: a no-op) so the scheduler may step
    model.decay.step()
    model.fit(
        x, y, epochs=1, verbose=0, callbacks=[BackupAndRestore(tmp_path, delete_checkpoint=False)]
    )
    state = checkpoint.load(tmp_path / "latest.pt")
    assert state["scaler"]["scale"] == 1024.0
    assert set(state["optimizers"]) == {"extra_opt", "optimizer"}
    assert state["schedulers"]["decay"]["last_epoch"] == 1
    other = make_model()
    other.scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    other.extra_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    other.decay = torch.optim.lr_scheduler.StepLR(other.extra_opt, step_size=1)
    history = other.fit(x, y, epochs=2, verbose=0, callbacks=[BackupAndRestore(tmp_path)])
    assert history.epoch == [0, 1]  # epoch 0 from the backup, epoch 1 trained now
    assert other.scaler.get_scale() == 1024.0
    assert other.extra_opt.param_groups[0]["lr"] == pytest.approx(0.05)  # after one decay
    assert other.decay.last_epoch == 1


def test_sigkill_twice_before_the_resumed_runs_first_backup_logs_each_step_once(
    tmp_path, reference
):
    """The resumed run writes a new event file, flushes an epoch's events into it and is
    killed before its own first backup: the next resume drops those events too."""
    for _ in range(2):  # backup at step 7, killed at 12: after epoch 0's events were flushed
        killed = run(tmp_path, "--kill-at", "12", "--save-freq", "7")
        assert killed.returncode == -signal.SIGKILL
    assert run(tmp_path, "--save-freq", "7").returncode == 0
    assert_same_as_reference(tmp_path, reference)
