"""Faults without surprises: fits in threads, the umask, what a failed file names."""

from __future__ import annotations

import os
import stat
import threading

import pytest
import torch
from torch import nn

import torcheras
from torcheras import checkpoint
from torcheras.callbacks import BackupAndRestore, ModelCheckpoint


def _fit_in_thread(i, folder, results, barrier, broken=False):
    torch.manual_seed(i)
    model = torcheras.Model(nn.Linear(8, 2))
    model.compile("adam", "sparse_categorical_crossentropy")
    gen = torch.Generator().manual_seed(100 + i)
    x, y = torch.randn(256, 8, generator=gen), torch.randint(0, 2, (256,), generator=gen)
    target = folder / (f"file-in-the-way{i}" if broken else f"t{i}") / "best.pt"
    if broken:
        (folder / f"file-in-the-way{i}").write_text("a file, not a folder")
    barrier.wait()  # the fits start, save and end together
    try:
        model.fit(
            x,
            y,
            epochs=3,
            batch_size=16,
            verbose=0,
            callbacks=[ModelCheckpoint(target), BackupAndRestore(folder / f"backup{i}")],
        )
        results[i] = ("ok", model.module.state_dict())
    except BaseException as exc:  # noqa: BLE001 - the thread's own outcome, checked below
        results[i] = ("error", exc)


def test_four_fits_in_four_threads_keep_their_own_files_and_errors(tmp_path):
    """Optuna's n_jobs and thread pools train this way: each fit's background writes, its
    files and its failures are its own."""
    results: dict[int, tuple] = {}
    barrier = threading.Barrier(4)
    threads = [
        threading.Thread(
            target=_fit_in_thread, args=(i, tmp_path, results, barrier, i == 3), daemon=True
        )
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == [0, 1, 2, 3]
    for i in range(3):
        outcome, weights = results[i]
        assert outcome == "ok", weights
        saved = checkpoint.load(tmp_path / f"t{i}" / "best.pt")
        for key, value in weights.items():  # the last epoch's file holds this fit's weights
            torch.testing.assert_close(saved["model"][f"module.{key}"], value, rtol=0, atol=0)
        assert not (tmp_path / f"backup{i}").exists() or not os.listdir(tmp_path / f"backup{i}")
    outcome, error = results[3]
    assert outcome == "error" and isinstance(error, checkpoint.CheckpointError)
    assert "file-in-the-way3" in str(error) and "is a file, not a folder" in str(error)


@pytest.fixture
def private_umask():
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def test_files_follow_the_umask_in_force_when_they_are_written(tmp_path, private_umask):
    """After os.umask(0o077) a checkpoint is 0600, as open() and torch.save make files:
    weights are not readable by others on a shared machine."""
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    model = torcheras.Model(nn.Linear(8, 2))
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(
        x,
        y,
        epochs=1,
        verbose=0,
        callbacks=[ModelCheckpoint(tmp_path / "ckpt.pt"), BackupAndRestore(tmp_path / "bk")],
    )
    model.save(tmp_path / "m.pt")
    model.save_weights(tmp_path / "w.safetensors")
    with open(tmp_path / "reference", "w"):
        pass
    expected = stat.S_IMODE((tmp_path / "reference").stat().st_mode)
    assert expected == 0o600
    for name in ("ckpt.pt", "m.pt", "w.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name


def test_a_malformed_checkpoint_template_is_refused_before_training(tmp_path):
    """Not an IndexError after a whole epoch: the path, the cause and the fix, at once."""
    for template in ("ckpt/{val_loss:{}}.pt", "run {}/best.pt", "x/{0}.pt", "a{b.pt"):
        with pytest.raises(ValueError, match=r"ModelCheckpoint: the filepath .*Name a log key"):
            ModelCheckpoint(str(tmp_path / template))
    ModelCheckpoint(str(tmp_path / "ok" / "{epoch:02d}-{val_loss:.2f}-{{literal}}.pt"))


def test_a_file_of_a_newer_format_is_refused_naming_the_versions(tmp_path):
    model = torcheras.Model(nn.Linear(8, 2))
    model.compile("adam", "mse")
    model.save(tmp_path / "m.pt")
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    state["version"] = checkpoint.FORMAT_VERSION + 1
    torch.save(state, tmp_path / "future.pt")
    for read in (model.load, model.load_weights, checkpoint.describe):
        with pytest.raises(checkpoint.CheckpointError, match=r"future\.pt.*newer torcheras"):
            read(tmp_path / "future.pt")


REPORT = "import sys; from torcheras.cli import main; sys.exit(main(['report', sys.argv[1]]))"


def test_a_named_pipe_is_not_read_and_the_report_goes_on(tmp_path):
    import subprocess
    import sys

    model = torcheras.Model(nn.Linear(8, 2))
    model.compile("adam", "mse")
    model.fit(
        torch.randn(32, 8),
        torch.randn(32, 2),
        epochs=1,
        verbose=0,
        callbacks=[torcheras.callbacks.CSVLogger(tmp_path / "log.csv")],
    )
    os.mkfifo(tmp_path / "pipe.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"pipe\.pt.*not a regular file"):
        checkpoint.load(tmp_path / "pipe.pt")
    result = subprocess.run(
        [sys.executable, "-c", REPORT, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_a_plain_pickle_is_refused_saying_why(tmp_path):
    import pickle

    for protocol in (2, 4):
        path = tmp_path / f"p{protocol}.pt"
        with open(path, "wb") as handle:
            pickle.dump({"weight": [1.0, 2.0]}, handle, protocol=protocol)
        with pytest.raises(
            checkpoint.CheckpointError,
            match=rf"plain Python pickle \(protocol {protocol}\).*weights_only=True",
        ):
            checkpoint.load(path)


class _Crash(torcheras.callbacks.Callback):
    def __init__(self, after):
        super().__init__()
        self.after = after

    def on_train_batch_end(self, batch, logs=None):
        if self.model.loop.global_step == self.after:
            raise KeyboardInterrupt("crash")


def _resumable(tmp_path, samples, batch_size, crash_after=None):
    torch.manual_seed(0)
    model = torcheras.Model(nn.Linear(8, 2))
    model.compile("sgd", "sparse_categorical_crossentropy")
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(samples, 8, generator=gen), torch.randint(0, 2, (samples,), generator=gen)
    callbacks = [BackupAndRestore(tmp_path / "backup", save_freq=1)]
    if crash_after is not None:
        callbacks.append(_Crash(crash_after))
    return model.fit(x, y, epochs=2, batch_size=batch_size, verbose=0, callbacks=callbacks)


@pytest.mark.parametrize(
    ("samples", "batch_size", "said"),
    [(128, 32, "batch size 16 -> 32"), (100, 16, "samples 128 -> 100"), (256, 16, "samples")],
    ids=["another batch_size", "a shorter dataset", "a longer dataset"],
)
def test_a_mid_epoch_resume_with_changed_data_is_refused_naming_both_values(
    tmp_path, samples, batch_size, said
):
    """Crash after 2 batches of 16; rerun otherwise: not samples 32-63 silently skipped, an
    IndexError, or empty batches trained — an error naming the backup, the change, the fix."""
    with pytest.raises(KeyboardInterrupt):
        _resumable(tmp_path, 128, 16, crash_after=2)
    with pytest.raises(ValueError) as info:
        _resumable(tmp_path, samples, batch_size)
    message = str(info.value)
    assert said in message and str(tmp_path / "backup") in message
    assert "delete" in message and "same data, batch_size" in message
    assert (tmp_path / "backup").exists()  # the backup is kept: the original run can resume
    history = _resumable(tmp_path, 128, 16)  # as before: resumes and finishes
    assert history.epoch == [0, 1]


FULL_DISK = """
import resource, signal, sys, torch, torcheras
from torcheras import callbacks as cb
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
out, which = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
x, y = torch.randn(64, 4), torch.randn(64, 1)
model = torcheras.Model(torch.nn.Linear(4, 1))
model.compile("sgd", "mse")


class FillTheDisk(cb.Callback):  # after epoch 2: room for about one more CSV row
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 2:
            limit = 300 if which == "csv" else 2500
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


logger = (cb.CSVLogger(out + "/log.csv") if which == "csv"
          else cb.TensorBoard(out + "/tb", update_freq=1))
try:
    model.fit(x, y, epochs=60, batch_size=8, verbose=0, callbacks=[logger, FillTheDisk()])
except Exception as exc:
    print("ERROR:", type(exc).__name__, exc)
"""


@pytest.mark.parametrize("which", ["csv", "tensorboard"])
def test_a_full_disk_under_a_logger_names_the_file_and_leaves_whole_rows(tmp_path, which):
    """Not a bare 'OSError: [Errno 27] File too large' naming no file, nor half a CSV row."""
    import csv
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(tmp_path), which],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "ERROR: CheckpointError" in done.stdout, done.stdout + done.stderr[-2000:]
    named = str(tmp_path / ("log.csv" if which == "csv" else "tb"))
    assert f"'{named}': File too large" in done.stdout
    assert "ulimit -f" in done.stdout  # the fix
    if which == "csv":
        text = (tmp_path / "log.csv").read_text()
        assert text.endswith("\n")
        rows = list(csv.DictReader(text.splitlines()))
        assert [int(r["epoch"]) for r in rows] == list(range(len(rows))) and len(rows) >= 3
        assert all(r["loss"] not in ("", None) for r in rows)


def _in_the_way(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where a folder should be")
    return blocker


def test_every_writer_names_the_file_it_could_not_write(tmp_path):
    """Checkpoints, CSV, TensorBoard, PredictionLogger, ImageLogger, History, plots and the
    report: a failure names the path, the cause and the fix, and nothing earlier is lost."""
    from torcheras.callbacks import CSVLogger, ImageLogger, PredictionLogger, TensorBoard
    from torcheras.report import write_report

    blocker = _in_the_way(tmp_path)
    x, y = torch.randn(48, 4), torch.randint(0, 3, (48,))

    def fit_with(callback):
        model = torcheras.Model(nn.Linear(4, 3))
        model.compile("sgd", "sparse_categorical_crossentropy")
        return model.fit(x, y, epochs=1, verbose=0, validation_data=(x, y), callbacks=[callback])

    cases = {
        "csv": lambda: fit_with(CSVLogger(blocker / "log.csv")),
        "tensorboard": lambda: fit_with(TensorBoard(blocker / "tb")),
        "predictions": lambda: fit_with(PredictionLogger(blocker / "pred")),
        "images": lambda: fit_with(
            ImageLogger(lambda m: torch.rand(2, 1, 8, 8), directory=blocker / "img")
        ),
        "checkpoint": lambda: fit_with(ModelCheckpoint(blocker / "best.pt")),
        "backup": lambda: fit_with(BackupAndRestore(blocker / "backup")),
    }
    history = fit_with(torcheras.callbacks.History())
    cases["history"] = lambda: history.save(blocker / "history.json")
    cases["plot"] = lambda: history.plot(blocker / "curves.png")
    (tmp_path / "run").mkdir()
    history.save(tmp_path / "run" / "history.json")
    cases["report"] = lambda: write_report(tmp_path / "run", blocker / "report.html")
    for name, action in cases.items():
        with pytest.raises(OSError) as info:
            action()
        message = str(info.value)
        assert str(blocker) in message, (name, message)
        assert "is a file, not a folder" in message or "Not a directory" in message, name
        assert "choose another path" in message.lower() or "move" in message, (name, message)
    assert blocker.read_text() == "a file where a folder should be"


def test_a_truncated_legacy_torch_file_is_not_called_a_plain_pickle(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(checkpoint.CheckpointError, match="corrupt") as info:
        checkpoint.load(path)
    assert "plain Python pickle" not in str(info.value)
