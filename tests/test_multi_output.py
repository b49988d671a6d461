"""Models with several outputs: a loss (and metrics) per output, as in Keras.

Checked against Keras 3 (torch backend) with a two-headed functional model: the logs hold
``loss`` (the sum weighted by ``loss_weights``), ``<output>_loss`` (each output's own,
unweighted) and ``<output>_<metric>``; ``evaluate`` lists loss, the output losses, then the
metrics. The numbers here are checked against torch's functions.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torcheras
from torcheras import callbacks

RTOL = 1e-5


class TwoHeads(nn.Module):
    """A class head and a regression head on a shared body; a dict or a tuple of outputs."""

    def __init__(self, as_dict: bool = True) -> None:
        super().__init__()
        self.as_dict = as_dict
        self.body = nn.Linear(4, 16)
        self.label = nn.Linear(16, 3)
        self.box = nn.Linear(16, 2)

    def forward(self, x):
        h = self.body(x).relu()
        outputs = (self.label(h), self.box(h))
        return dict(zip(("label", "box"), outputs)) if self.as_dict else outputs


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(70, 4, generator=gen)
    labels = torch.randint(0, 3, (70,), generator=gen)
    boxes = torch.randn(70, 2, generator=gen)
    return x, labels, boxes


def _model(as_dict: bool = True, **compile_kwargs):
    torch.manual_seed(0)
    model = torcheras.Model(TwoHeads(as_dict))
    model.compile("adam", device="cpu", **compile_kwargs)
    return model


def test_dict_outputs_log_the_weighted_sum_each_outputs_loss_and_its_metrics(data):
    x, labels, boxes = data
    model = _model(
        loss={"label": "sparse_categorical_crossentropy", "box": "mse"},
        loss_weights={"box": 0.5},
        metrics={"label": ["accuracy"], "box": ["mae"]},
    )
    y = {"label": labels, "box": boxes}
    history = model.fit(x, y, epochs=2, batch_size=16, validation_data=(x, y), verbose=0)
    assert set(history.history) == {
        "loss", "label_loss", "box_loss", "label_accuracy", "box_mae", "learning_rate",
        "val_loss", "val_label_loss", "val_box_loss", "val_label_accuracy", "val_box_mae",
    }  # fmt: skip

    outputs = model.predict(x, verbose=0)
    ce = float(F.cross_entropy(outputs["label"], labels))
    mse = float(F.mse_loss(outputs["box"], boxes))
    logs = model.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)  # 16 ∤ 70
    assert logs["label_loss"] == pytest.approx(ce, rel=RTOL)
    assert logs["box_loss"] == pytest.approx(mse, rel=RTOL)
    assert logs["loss"] == pytest.approx(ce + 0.5 * mse, rel=RTOL)
    accuracy = float((outputs["label"].argmax(-1) == labels).float().mean())
    assert logs["label_accuracy"] == pytest.approx(accuracy)
    mae = float((outputs["box"] - boxes).abs().mean())
    assert logs["box_mae"] == pytest.approx(mae, rel=RTOL)
    # Keras's order: loss, each output's loss, then the metrics
    assert model.metrics_names == ["loss", "label_loss", "box_loss", "label_accuracy", "box_mae"]
    ordered = model.evaluate(x, y, batch_size=16, verbose=0)
    assert ordered == pytest.approx([logs[k] for k in model.metrics_names], rel=1e-6)


def test_training_on_several_losses_is_training_on_their_weighted_sum(data):
    x, labels, boxes = data
    per_output = _model(loss=["cross_entropy", "mse"], loss_weights=[1.0, 2.0], as_dict=False)

    def weighted_sum(y_pred, y_true):
        return F.cross_entropy(y_pred[0], y_true[0]) + 2.0 * F.mse_loss(y_pred[1], y_true[1])

    by_hand = _model(loss=weighted_sum, as_dict=False)
    fit = {"epochs": 3, "batch_size": 10, "shuffle": False, "verbose": 0}
    history = per_output.fit(x, (labels, boxes), **fit)
    expected = by_hand.fit(x, (labels, boxes), **fit)
    assert history.history["loss"] == pytest.approx(expected.history["loss"], rel=RTOL)
    for a, b in zip(per_output.parameters(), by_hand.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert {"output_0_loss", "output_1_loss"} <= set(history.history)


def test_tuple_outputs_take_metrics_per_output_and_callbacks_monitor_an_outputs_loss(data):
    x, labels, boxes = data
    model = _model(
        loss=["sparse_categorical_crossentropy", "mse"], metrics=[["accuracy"], None], as_dict=False
    )
    stop = callbacks.EarlyStopping(monitor="val_output_1_loss", patience=1)
    with warnings.catch_warnings(record=True) as record:  # a monitor not in the logs warns
        warnings.simplefilter("always")
        history = model.fit(
            x, (labels, boxes), epochs=3, validation_split=0.3, callbacks=[stop], verbose=0
        )
    assert not [w for w in record if "not available" in str(w.message)]
    assert len(history.history["val_output_1_loss"]) == len(history.history["loss"])
    assert "val_output_0_accuracy" in history.history
    assert stop.monitor_state.direction == "min"  # mode="auto": an output's loss falls


@pytest.mark.parametrize(
    ("compile_kwargs", "message"),
    [
        (
            {"loss": {"label": "cross_entropy", "box": "mse"}, "metrics": ["accuracy"]},
            r"give `metrics` per output, metrics=\{'<output>'",
        ),
        (
            {"loss": {"label": "cross_entropy"}, "loss_weights": {"boxes": 1.0}},
            r"`loss_weights` must name outputs that `loss` has \(\['label'\]\)",
        ),
        ({"loss": ["cross_entropy", "mse"], "loss_weights": [1, -1]}, "non-negative"),
        ({"loss": "mse", "loss_weights": [1.0]}, "give `loss` as a dict"),
        ({"loss": {"label": None}}, "give a loss for at least one output"),
    ],
)
def test_per_output_arguments_that_do_not_fit_are_clear_errors(compile_kwargs, message):
    model = torcheras.Model(TwoHeads())
    with pytest.raises(ValueError, match=message):
        model.compile("adam", device="cpu", **compile_kwargs)


def test_targets_without_the_outputs_names_are_an_error_naming_the_keys(data):
    x, labels, boxes = data
    model = _model(loss={"label": "cross_entropy", "box": "mse"})
    with pytest.raises(ValueError, match=r"output 'box' needs the model's targets.*\['label'\]"):
        model.fit(x, {"label": labels}, epochs=1, verbose=0)
    tuple_model = _model(loss={"label": "cross_entropy"}, as_dict=False)
    with pytest.raises(ValueError, match="outputs to hold it, but they are a tuple, not a dict"):
        tuple_model.fit(x, {"label": labels}, epochs=1, verbose=0)


def test_jit_compile_logs_each_outputs_loss_as_the_eager_step_does(data):
    x, labels, boxes = data
    kwargs = {"loss": {"label": "cross_entropy", "box": "mse"}, "loss_weights": {"box": 2.0}}
    compiled = _model(jit_compile=True, **kwargs)
    eager = _model(**kwargs)
    fit = {"epochs": 2, "batch_size": 35, "shuffle": False, "verbose": 0}
    y = {"label": labels, "box": boxes}
    history = compiled.fit(x, y, **fit).history
    expected = eager.fit(x, y, **fit).history
    for key in ("loss", "label_loss", "box_loss"):
        assert history[key] == pytest.approx(expected[key], rel=1e-5)


def test_a_crash_mid_epoch_resumes_each_outputs_running_loss_and_metrics_exactly(tmp_path, data):
    """BackupAndRestore keeps the per-output running losses and metric states of the
    interrupted epoch: the resumed History equals an unbroken run's."""
    x, labels, boxes = data
    y = {"label": labels, "box": boxes}

    class Crash(callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if self.model.loop.global_step == 7:  # epoch 1, batch 2 (5 batches an epoch)
                raise RuntimeError("simulated crash")

    def train(backup, crash=False):
        model = _model(
            loss={"label": "sparse_categorical_crossentropy", "box": "mse"},
            loss_weights={"box": 0.5},
            metrics={"label": ["accuracy"], "box": ["mae"]},
        )
        backups = [callbacks.BackupAndRestore(backup, save_freq=2)]
        extra = [Crash()] if crash else []
        history = model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=backups + extra)
        return history.history

    reference = train(tmp_path / "a")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tmp_path / "b", crash=True)
    assert train(tmp_path / "b") == reference
    assert {"label_loss", "box_loss", "label_accuracy", "box_mae"} <= set(reference)


def test_sample_weights_per_output_weigh_each_outputs_loss_and_metrics(data):
    """sample_weight={"label": w} (Keras's weights per output): the label loss and its
    weighted metrics use w, the box loss (absent from the dict) is unweighted; one array
    weighs every output alike."""
    x, labels, boxes = data
    model = _model(
        loss={"label": "sparse_categorical_crossentropy", "box": "mse"},
        weighted_metrics={"label": ["accuracy"]},
    )
    y = {"label": labels, "box": boxes}
    w = torch.linspace(0.0, 2.0, 70)
    outputs = model.predict(x, verbose=0)
    ce = F.cross_entropy(outputs["label"], labels, reduction="none")
    se = (outputs["box"] - boxes).square().mean(-1)
    correct = (outputs["label"].argmax(-1) == labels).float()

    logs = model.evaluate(x, y, sample_weight={"label": w}, batch_size=16, verbose=0,
                          return_dict=True)  # fmt: skip
    assert logs["label_loss"] == pytest.approx(float((ce * w).mean()), rel=RTOL)
    assert logs["box_loss"] == pytest.approx(float(se.mean()), rel=RTOL)
    assert logs["label_accuracy"] == pytest.approx(float((correct * w).sum() / w.sum()))
    logs = model.evaluate(x, y, sample_weight=w, batch_size=16, verbose=0, return_dict=True)
    assert logs["box_loss"] == pytest.approx(float((se * w).mean()), rel=RTOL)
    history = model.fit(x, y, sample_weight={"label": w}, epochs=1, verbose=0,
                        validation_split=0.2)  # fmt: skip
    assert "val_label_accuracy" in history.history

    single = torcheras.Model(nn.Linear(4, 3))
    single.compile("adam", "cross_entropy", device="cpu")
    with pytest.raises(ValueError, match="compile a loss per output"):
        single.evaluate(x, labels, sample_weight={"label": w}, verbose=0)


def test_jit_compile_with_several_outputs_compiles_once_not_per_batch(data):
    """Each output's loss is logged from inside the compiled step: the graph must not guard
    on the running sums (it recompiled every batch, then fell back to eager)."""
    from torch._dynamo.utils import counters

    model = _model(jit_compile=True, loss={"label": "sparse_categorical_crossentropy",
                                           "box": "mse"})  # fmt: skip
    x, labels, boxes = data
    y = {"label": labels, "box": boxes}
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    graphs = counters["stats"]["unique_graphs"]
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing recompiled
    assert {"label_loss", "box_loss"} <= set(history.history)
