"""checkpoint.py: atomic writes, clear errors that damage nothing, safe loads, inspect."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_model

from torcheras import checkpoint
from torcheras.callbacks import BackupAndRestore
from torcheras.cli import main


def test_atomic_write_replaces_and_cleans_stray_temp_files(tmp_path):
    target = tmp_path / "state.pt"
    checkpoint.save({"a": torch.ones(2)}, target)
    stray = tmp_path / f"{checkpoint.TEMP_PREFIX}state.pt.abc123"
    stray.write_bytes(b"half a checkpoint")  # what a kill during a save leaves behind
    an_hour_ago = checkpoint._PROCESS_START - 3600
    os.utime(stray, (an_hour_ago, an_hour_ago))  # ... in an earlier process
    busy = tmp_path / f"{checkpoint.TEMP_PREFIX}state.pt.def456"
    busy.write_bytes(b"another writer, right now")  # must survive the sweep
    checkpoint.save({"a": torch.zeros(2)}, target)
    assert torch.equal(checkpoint.load(target)["a"], torch.zeros(2))
    assert sorted(os.listdir(tmp_path)) == [busy.name, "state.pt"]
    assert busy.read_bytes() == b"another writer, right now"


def test_a_failing_write_raises_and_leaves_the_old_file_intact(tmp_path):
    target = tmp_path / "state.pt"
    checkpoint.save({"v": torch.tensor(1)}, target)

    def explode(handle):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"Could not save .*state\.pt.*No space "
        r"left on device.*disk is full",
    ):
        checkpoint.atomic_write(target, explode)
    assert checkpoint.load(target)["v"] == 1
    assert os.listdir(tmp_path) == ["state.pt"]


def test_permission_denied_names_path_and_cause(tmp_path, monkeypatch):
    target = tmp_path / "state.pt"
    checkpoint.save({"v": torch.tensor(1)}, target)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(checkpoint, "_create_temp", denied)
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"state\.pt.*Permission denied.*"
        r"permissions",
    ):
        make_model().save_weights(target)
    monkeypatch.undo()
    assert checkpoint.load(target)["v"] == 1


SIZE_LIMITED_SAVE = """
import resource, signal, sys
import torch
from torcheras import checkpoint
target = sys.argv[1]
checkpoint.save_weights(torch.nn.Linear(2, 2).state_dict(), target)  # a small save fits
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
try:
    checkpoint.save_weights(torch.nn.Linear(200, 200).state_dict(), target)  # 160 KB
except checkpoint.CheckpointError as exc:
    print("ERROR:", exc)
"""


def test_a_write_that_runs_out_of_room_raises_and_keeps_what_was_saved(tmp_path):
    """A real failed write, with no mount needed: a file-size limit in a subprocess."""
    target = tmp_path / "best.pt"
    result = subprocess.run(
        [sys.executable, "-c", SIZE_LIMITED_SAVE, str(target)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "ERROR: " in result.stdout and "best.pt" in result.stdout
    assert (
        "File too large" in result.stdout and "Files saved earlier are unchanged" in result.stdout
    )
    weights = checkpoint.load(target)  # the earlier, small save (a bare state_dict): intact
    assert weights["weight"].shape == (2, 2)
    assert os.listdir(tmp_path) == ["best.pt"]


def test_directory_in_the_way(tmp_path):
    (tmp_path / "ckpt.pt").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="is an existing directory"):
        make_model().save(tmp_path / "ckpt.pt")


def test_malicious_pickle_is_refused_with_the_reason(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load(tmp_path / "evil.pt")
    assert "could run code" in str(info.value) and "weights_only=True" in str(info.value)
    assert "posix.system" in str(info.value) and "weights_only=False" not in str(info.value)
    assert main(["inspect", str(tmp_path / "evil.pt")]) == 2
    assert not marker.exists()


def test_truncated_file_is_reported_as_corrupt(tmp_path):
    target = tmp_path / "m.pt"
    make_model().save(target)
    target.write_bytes(target.read_bytes()[:200])
    with pytest.raises(checkpoint.CheckpointError, match="not a torcheras/torch checkpoint or"):
        checkpoint.load(target)


def test_inspect_prints_a_training_state(tmp_path, blobs, capsys):
    x, y = blobs
    backup = tmp_path / "backup"
    make_model().fit(
        x,
        y,
        epochs=2,
        verbose=0,
        validation_split=0.25,
        callbacks=[BackupAndRestore(backup, delete_checkpoint=False)],
    )
    path = str(backup / "latest.pt")
    assert main(["inspect", path]) == 0
    text = capsys.readouterr().out
    assert "kind: training_state" in text and "epoch: 2" in text and "batch: 0" in text
    assert "History" in text and "val_loss" in text
    assert main(["inspect", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "torcheras.checkpoint" and info["epoch"] == 2
    assert info["global_step"] == 12
    assert set(info["last_epoch_logs"]) == {
        "accuracy",
        "learning_rate",
        "loss",
        "val_accuracy",
        "val_loss",
    }
    assert "History" in info["callbacks"]
    assert f"BackupAndRestore(backup_dir={str(backup)!r})" in info["callbacks"]


def test_inspect_weights_and_safetensors(tmp_path, capsys):
    model = make_model()
    model.save_weights(tmp_path / "w.safetensors")
    assert main(["inspect", str(tmp_path / "w.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "safetensors" and info["parameters"] == 195
    assert main(["inspect", str(tmp_path / "missing.pt")]) == 2
    assert "No checkpoint at" in capsys.readouterr().err
