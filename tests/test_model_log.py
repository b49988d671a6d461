"""Model.log: values from inside a step or a batch hook join the logs as running means."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import make_model

import torcheras
from torcheras import callbacks as cb


class LoggingModel(torcheras.Model):
    """Logs the mean absolute logit of every batch, in training and in validation."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__(net)
        self.seen: dict[str, list[tuple[float, int]]] = {"train": [], "test": []}

    def _log_logits(self, batch, phase: str) -> None:
        x = batch[0]
        value = self(x).abs().mean()
        self.seen[phase].append((float(value), x.shape[0]))
        self.log("mean_abs_logit", value)

    def train_step(self, batch):
        logs = super().train_step(batch)
        with torch.no_grad():
            self._log_logits(batch, "train")
        return logs

    def test_step(self, batch):
        self._log_logits(batch, "test")
        return super().test_step(batch)


def weighted_mean(pairs: list[tuple[float, int]]) -> float:
    return sum(v * n for v, n in pairs) / sum(n for _, n in pairs)


def test_values_logged_in_the_steps_reach_history_and_the_csv(blobs, tmp_path):
    x, y = blobs
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    model = LoggingModel(net)
    model.compile("adam", "sparse_categorical_crossentropy", device="cpu")
    log = cb.CSVLogger(tmp_path / "log.csv")
    history = model.fit(
        x, y, epochs=1, batch_size=50, validation_split=0.25, callbacks=[log], verbose=0
    )
    # 180 training samples in batches of 50: the last one has 30; weighted as Keras's means
    assert [n for _, n in model.seen["train"]] == [50, 50, 50, 30]
    assert history.history["mean_abs_logit"][0] == pytest.approx(
        weighted_mean(model.seen["train"]), rel=1e-6
    )
    assert history.history["val_mean_abs_logit"][0] == pytest.approx(
        weighted_mean(model.seen["test"]), rel=1e-6
    )
    with open(tmp_path / "log.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["mean_abs_logit"]) == pytest.approx(history.history["mean_abs_logit"][0])
    evaluated = model.evaluate(x, y, batch_size=240, verbose=0, return_dict=True)
    assert evaluated["mean_abs_logit"] == pytest.approx(model.seen["test"][-1][0], rel=1e-6)


def test_a_callback_batch_hook_can_log_and_the_progress_bar_shows_it(blobs, capsys):
    x, y = blobs
    model = make_model()
    first_weight = model.module[0].weight

    def log_norm(batch, logs):
        model.log("w_norm", torch.linalg.vector_norm(first_weight.detach()))

    history = model.fit(
        x, y, epochs=2, batch_size=60, verbose=2,
        callbacks=[cb.LambdaCallback(on_train_batch_end=log_norm)],
    )  # fmt: skip
    assert len(history.history["w_norm"]) == 2
    assert history.history["w_norm"][-1] > 0
    assert "w_norm:" in capsys.readouterr().out


def test_log_outside_fit_or_under_a_metric_name_is_a_clear_error(blobs):
    model = make_model()
    with pytest.raises(RuntimeError, match="outside fit and evaluate"):
        model.log("x", 1.0)

    x, y = blobs

    def clash(batch, logs):
        model.log("accuracy", 1.0)

    with pytest.raises(ValueError, match="already a compiled or tracked metric"):
        model.fit(
            x, y, epochs=1, verbose=0, callbacks=[cb.LambdaCallback(on_train_batch_end=clash)]
        )
