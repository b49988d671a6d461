"""PredictionLogger: the CSV equals what predict() says, from the validation pass itself."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import make_model

import torcheras
from torcheras import callbacks as cb


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_samples_and_misclassified_match_predict_and_cost_no_second_pass(blobs, tmp_path):
    x, y = blobs
    x = x + np.random.default_rng(1).normal(0, 3, x.shape).astype(np.float32)  # some errors
    xv, yv = x[180:], y[180:]
    model = make_model()
    passes = []
    original = model.test_step
    model.test_step = lambda batch: (passes.append(len(batch[0])), original(batch))[1]
    logger = cb.PredictionLogger(tmp_path, every_n_epochs=2, num_samples=5, num_worst=8)
    model.fit(x[:180], y[:180], epochs=4, batch_size=16, validation_data=(xv, yv), verbose=0,
              callbacks=[logger])  # fmt: skip
    assert sum(passes) == 4 * len(xv)  # one validation pass per epoch, nothing more
    written = rows(tmp_path / "predictions.csv")
    assert {r["epoch"] for r in written} == {"2", "4"}
    last = [r for r in written if r["epoch"] == "4"]
    logits = torch.as_tensor(model.predict(xv, verbose=0))
    predicted = logits.argmax(dim=1)
    samples = [r for r in last if r["kind"] == "sample"]
    assert [int(r["index"]) for r in samples] == [0, 1, 2, 3, 4]
    for r in samples:
        i = int(r["index"])
        assert int(r["target"]) == yv[i] and int(r["prediction"]) == predicted[i]
    # the misclassified: the wrong predictions with the largest margin of error
    true = logits[torch.arange(len(yv)), torch.as_tensor(yv)]
    others = logits.clone()
    others[torch.arange(len(yv)), torch.as_tensor(yv)] = -float("inf")
    margin = true - others.max(dim=1).values
    wrong = (margin < 0).nonzero().flatten()
    expected = wrong[margin[wrong].argsort()][:8].tolist()
    assert len(expected) >= 3  # the noise makes mistakes to find
    misclassified = [r for r in last if r["kind"] == "misclassified"]
    assert [int(r["index"]) for r in misclassified] == expected
    for r in misclassified:
        i = int(r["index"])
        assert int(r["prediction"]) == predicted[i] != int(r["target"])
        assert float(r["score"]) == pytest.approx(float(margin[i]), abs=1e-4)


def test_regression_logs_the_largest_errors(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0], dtype=np.float32))[:, None]
    model = make_model(n_in=4, n_out=1, loss="mse", metrics=[])
    logger = cb.PredictionLogger(tmp_path, num_samples=2, num_worst=3)
    model.fit(x, y, epochs=1, validation_split=0.3, verbose=0, callbacks=[logger])
    xv, yv = x[140:], y[140:]
    errors = np.abs(model.predict(xv, verbose=0) - yv)[:, 0]
    worst = [r for r in rows(tmp_path / "predictions.csv") if r["kind"] == "worst"]
    assert [int(r["index"]) for r in worst] == list(np.argsort(-errors)[:3])
    assert json.loads(worst[0]["prediction"])[0] == pytest.approx(
        float(model.predict(xv[[int(worst[0]["index"])]], verbose=0)[0, 0]), abs=1e-5
    )


def test_image_inputs_give_a_grid_of_the_worst_and_tensorboard_reads_it(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    from PIL import Image
    from sklearn.datasets import load_digits
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    digits = load_digits()
    x = (digits.data / 16).astype(np.float32).reshape(-1, 1, 8, 8)[:400]
    y = digits.target[:400]
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    model = torcheras.Model(net)
    model.compile("sgd", "sparse_categorical_crossentropy", learning_rate=0.01, device="cpu")
    logger = cb.PredictionLogger(tmp_path, num_worst=6, log_dir=tmp_path / "tb")
    model.fit(x, y, epochs=1, validation_split=0.5, verbose=0, callbacks=[logger])
    misclassified = [r for r in rows(tmp_path / "predictions.csv") if r["kind"] == "misclassified"]
    assert len(misclassified) == 6  # barely trained: plenty of mistakes
    grid = Image.open(tmp_path / "worst_epoch001.png")
    assert grid.size == (8 * 6 * (8 + 2) + 8 * 2, 8 * (8 + 2) + 8 * 2)  # 6 tiles, scaled x8
    events = EventAccumulator(str(tmp_path / "tb" / "predictions"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("worst")] == [0]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="task"):
        cb.PredictionLogger("x", task="segmentation")
    with pytest.raises(ValueError, match="every_n_epochs"):
        cb.PredictionLogger("x", every_n_epochs=0)


def test_a_resumed_fit_keeps_the_rows_before_its_backup_and_no_duplicates(blobs, tmp_path):
    x, y = blobs
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"

    def fit(directory, crash_at_epoch=None):
        torch.manual_seed(0)
        model = make_model()
        callbacks = [
            cb.PredictionLogger(directory, num_samples=2, num_worst=2),
            cb.BackupAndRestore(tmp_path / f"backup-{directory.name}"),
        ]
        if crash_at_epoch is not None:

            def crash(epoch, logs):
                if epoch == crash_at_epoch:
                    raise RuntimeError("crash")

            callbacks.append(cb.LambdaCallback(on_epoch_end=crash))
        model.fit(x, y, epochs=4, validation_split=0.25, verbose=0, callbacks=callbacks)

    fit(reference_dir)
    with pytest.raises(RuntimeError, match="crash"):
        fit(resumed_dir, crash_at_epoch=2)  # epoch 3's rows are written, its backup is not
    fit(resumed_dir)
    assert rows(resumed_dir / "predictions.csv") == rows(reference_dir / "predictions.csv")
