"""The integrations where they meet the training features: WandbLogger with
validation_interval, the scikit-learn wrappers with fit's validation, callbacks and
validation_interval in a parallel grid search, and export after mixed precision,
jit_compile and EMA."""

from __future__ import annotations

import io
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


# --- scikit-learn: fit's validation, callbacks and validation_interval through the wrapper -----
def test_a_parallel_grid_search_keeps_validation_callbacks_and_interval_per_fit():
    pytest.importorskip("sklearn")
    from sklearn.model_selection import GridSearchCV

    from torcheras.wrappers import SKLearnClassifier

    x, y = blobs()
    labels = np.array(["ant", "bee", "cat"])[y]
    stop = cb.EarlyStopping(patience=2, restore_best_weights=True)
    clf = SKLearnClassifier(
        build_net, fit__epochs=4, fit__batch_size=16, fit__validation_split=0.25,
        fit__validation_interval=4, fit__callbacks=[stop], random_state=0,
    )  # fmt: skip
    search = GridSearchCV(clf, {"model__hidden": [4, 16]}, cv=2, n_jobs=2).fit(x, labels)
    best = search.best_estimator_
    history = best.model_.history
    # 150 samples, the last 25% held out as Keras does: 112 training samples, 7 batches an
    # epoch; a validation every 4 steps and at each epoch's end, each step once
    steps = history.validation_history["step"]
    due = sorted({s for s in range(1, 29) if s % 4 == 0 or s % 7 == 0})
    assert steps == due[: len(steps)] and steps[-1] == 7 * len(history.epoch)
    assert best.history_ == history.history
    assert len(history.history["val_loss"]) == len(history.epoch)
    # the refit's callback is a clone's: the estimator's own EarlyStopping never ran
    (fitted_stop,) = best.get_params()["fit__callbacks"]
    assert fitted_stop is not stop and stop.model is None and fitted_stop.model is best.model_
    # score is the accuracy of predict, predict the labels of predict_proba's argmax
    proba = best.predict_proba(x)
    assert np.allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    assert list(best.classes_) == ["ant", "bee", "cat"]
    predicted = best.predict(x)
    assert (predicted == best.classes_[proba.argmax(axis=1)]).all()
    assert search.score(x, labels) == pytest.approx((predicted == labels).mean())


def build_net(n_features_in, n_classes, hidden=16):
    return torch.nn.Sequential(
        torch.nn.Linear(n_features_in, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, n_classes)
    )


# --- export after mixed precision, jit_compile and EMA -----------------------------------------
@pytest.mark.parametrize(
    "settings",
    [{"precision": "bf16-mixed"}, {"jit_compile": True}, {"ema_momentum": 0.9}],
    ids=["bf16-mixed", "jit_compile", "ema"],
)
def test_export_after_fit_holds_the_live_weights_in_float32(settings, tmp_path):
    x, y = blobs()
    model = build(**settings)
    model.fit(x, y, epochs=2, batch_size=32, verbose=0)
    live = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    path = model.export(tmp_path / "model.pt2")
    program = torch.export.load(path)
    exported = program.state_dict
    assert exported.keys() == live.keys()
    for name, value in live.items():
        assert exported[name].dtype == torch.float32
        assert torch.equal(exported[name], value), name
    sample = torch.from_numpy(x[:7])  # a batch size fit never saw
    with torch.no_grad():
        eager = model.module.eval()(sample)
        torch.testing.assert_close(program.module()(sample), eager, atol=1e-6, rtol=1e-6)
    predicted = torch.from_numpy(model.predict(x[:7], verbose=0))
    # predict runs under the compiled precision; the export is the float32 network
    tolerance = 2e-2 if "precision" in settings else 1e-6
    torch.testing.assert_close(predicted, eager, atol=tolerance, rtol=tolerance)
    if "ema_momentum" in settings:
        assert model.ema is not None and model.ema.updates > 0  # fit ended on the average


def test_export_to_a_url_writes_the_object_not_a_local_folder(tmp_path, monkeypatch):
    """The guide says every path may be a URL; export wrote ``memory:/...`` locally before."""
    fsspec = pytest.importorskip("fsspec")
    onnxruntime = pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    x, y = blobs()
    model = build()
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    root = f"memory://{tmp_path.name}"
    assert model.export(f"{root}/model.pt2") == f"{root}/model.pt2"
    assert model.export(f"{root}/model.onnx", format="onnx") == f"{root}/model.onnx"
    assert list(tmp_path.iterdir()) == []  # nothing local
    memory = fsspec.filesystem("memory")
    sample = torch.from_numpy(x[:5])
    with torch.no_grad():
        eager = model.module.eval()(sample)
    program = torch.export.load(io.BytesIO(memory.cat_file(f"/{tmp_path.name}/model.pt2")))
    torch.testing.assert_close(program.module()(sample), eager, atol=1e-6, rtol=1e-6)
    session = onnxruntime.InferenceSession(memory.cat_file(f"/{tmp_path.name}/model.onnx"))
    (out,) = session.run(None, {session.get_inputs()[0].name: x[:5]})
    np.testing.assert_allclose(out, eager.numpy(), atol=1e-5, rtol=0)  # the 1e-5
