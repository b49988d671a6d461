"""What a new user types first from the guide: the snippets of "Validating inside long epochs"
(combining.md) and "Saving to object storage" (resume.md), run as printed, with the data and
model they assume defined here; what the pages promise is then checked."""

from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest
import torch
from conftest import guide_snippet

import torcheras
from torcheras import callbacks as cb


def namespace(samples: int) -> dict:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, 10)).astype(np.float32)
    y = (x[:, :2].sum(axis=1) > 0).astype(np.int64)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model = torcheras.Model(net)
    model.compile("adam", "sparse_categorical_crossentropy", device="cpu")
    return {"x": x, "y": y, "model": model, "cb": cb}


def test_validating_inside_long_epochs_runs_as_the_guide_says(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = guide_snippet("combining.md", "Validating inside long epochs")
    assert "validation_interval=500" in code
    # 16,840 samples, 5% held out: 15,998 in 500 batches of 32 an epoch. validation_interval
    # 500 then falls on the epochs' ends: each is validated once, at its end
    names = namespace(16_840)
    names["model"].compile("adam", "sparse_categorical_crossentropy", device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "combining.md", "exec"), names)
    history = names["history"]
    validations = history.validation_history
    assert validations["step"] == [500 * (e + 1) for e in history.epoch]
    assert validations["val_loss"] == history.history["val_loss"]
    with open("runs/a/log.validation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "epoch", "val_loss"]
    assert [int(r["step"]) for r in rows] == validations["step"]
    assert (tmp_path / "runs/a/best.pt").exists() and (tmp_path / "runs/a/log.csv").exists()


def test_validating_inside_long_epochs_mid_epoch(tmp_path, monkeypatch):
    """The same snippet where an epoch is longer than 500 steps: 3 epochs of 800 batches,
    validations at 500, 800 (an end), 1000, 1500, 1600 (an end), 2000, 2400 (an end)."""
    monkeypatch.chdir(tmp_path)
    code = guide_snippet("combining.md", "Validating inside long epochs")
    names = namespace(26_948)  # 5% held out (Keras's int split): 25,600 = 800 batches of 32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "combining.md", "exec"), names)
    history = names["history"]
    steps = history.validation_history["step"]
    due = [500, 800, 1000, 1500, 1600, 2000, 2400]
    assert steps == due[: len(steps)]  # EarlyStopping(patience=4) may end it early
    assert history.history["val_loss"] == [
        v
        for s, v in zip(steps, history.validation_history["val_loss"])
        if s % 800 == 0 or s == steps[-1] and history.stop_reason
    ]


fsspec = pytest.importorskip("fsspec")


def test_saving_to_object_storage_snippet_with_a_memory_url(tmp_path):
    """The snippet as printed, its bucket URL turned into a memory:// one (no S3 here; the
    moto-backed tests in test_checkpoint_urls.py cover s3:// itself)."""
    code = guide_snippet("resume.md", "Saving to object storage")
    assert "s3://my-bucket/runs/a" in code
    root = f"memory://{tmp_path.name}"
    code = code.replace("s3://my-bucket", root)
    names = namespace(400)
    before = {k: v.clone() for k, v in names["model"].state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "resume.md", "exec"), names)
    memory = fsspec.filesystem("memory")
    base = f"/{tmp_path.name}/runs/a"
    assert memory.exists(f"{base}/best.pt") and memory.exists(f"{base}/log.csv")
    assert not memory.exists(f"{base}/backup/latest.pt")  # a clean end deletes the backup
    rows = list(csv.DictReader(memory.cat_file(f"{base}/log.csv").decode().splitlines()))
    assert len(rows) == 50
    # model.load(URL) brought back the best epoch's file (0-based "epoch" in it, as History)
    best_epoch = int(np.argmin([float(r["val_loss"]) for r in rows]))
    saved = torcheras.checkpoint.load(f"{root}/runs/a/best.pt")
    assert saved["epoch"] == best_epoch
    assert saved["logs"]["val_loss"] == pytest.approx(float(rows[best_epoch]["val_loss"]))
    loaded = names["model"].state_dict()
    assert loaded.keys() == saved["model"].keys()
    assert all(torch.equal(loaded[k], saved["model"][k]) for k in loaded)
    assert any(not torch.equal(loaded[k], before[k]) for k in before)
