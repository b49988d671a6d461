"""The integrations where they meet the training features: WandbLogger with
validation_interval, the scikit-learn wrappers with fit's validation, callbacks and
validation_interval in a parallel grid search, and export after mixed precision,
jit_compile and EMA."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import torcheras
from torcheras import callbacks as cb

sys.path.insert(0, str(Path(__file__).parent.parent))
TOL = 1e-6  # float32 results carried as Python floats (JSON keeps them exactly)


def blobs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 2, size=(3, 8))
    y = rng.integers(0, 3, size=150)
    return (centers[y] + rng.normal(0, 1.5, size=(150, 8))).astype(np.float32), y


def build(**compile_kwargs) -> torcheras.Model:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    model = torcheras.Model(net)
    compile_kwargs.setdefault("learning_rate", 0.02)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"],
                  device="cpu", **compile_kwargs)  # fmt: skip
    return model


# --- WandbLogger + validation_interval ---------------------------------------------------------
@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    home = str(tmp_path / "wandb-home")
    for name in ("DIR", "CACHE_DIR", "DATA_DIR", "CONFIG_DIR"):
        monkeypatch.setenv(f"WANDB_{name}", home)
    for name, value in {"MODE": "offline", "SILENT": "true", "CONSOLE": "off",
                        "X_DISABLE_STATS": "true", "DISABLE_GIT": "true"}.items():  # fmt: skip
        monkeypatch.setenv(f"WANDB_{name}", value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_wandb_has_every_validation_at_its_global_step(offline_wandb, tmp_path):
    from wandb_files import offline_runs

    x, y = blobs()  # 120 training samples in batches of 32: 4 batches an epoch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = build().fit(
            x, y, epochs=3, batch_size=32, validation_split=0.2, validation_interval=3,
            verbose=0, callbacks=[cb.WandbLogger("tests", dir=tmp_path)],
        )  # fmt: skip
    (run,) = offline_runs(tmp_path)
    validations = history.validation_history
    assert validations["step"] == [3, 4, 6, 8, 9, 12]  # no accumulation: steps = batches
    rows = {row["_step"]: row for row in run.rows if "val_loss" in row}
    assert sorted(rows) == validations["step"]
    for key in ("val_loss", "val_accuracy"):
        got = [rows[step][key] for step in validations["step"]]
        assert got == pytest.approx(validations[key], rel=TOL), key
    epoch_rows = [row for row in run.rows if "epoch" in row]
    assert [row["_step"] for row in epoch_rows] == [4, 8, 12]
    assert [row["val_loss"] for row in epoch_rows] == pytest.approx(
        history.history["val_loss"], rel=TOL
    )
