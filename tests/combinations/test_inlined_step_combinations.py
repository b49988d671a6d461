"""fit's inlined default step (``Model._inlined_train_parts``, on ``Stepping.plain``: run by
``Model._inlined_train_step`` between callbacks, by the plain batch loop where none runs
between batches) where it meets the rest of the library: each test trains a default model
(the inlined path) and a twin whose class overrides one seam trivially (``call_on`` calling
``super()``: every batch then takes ``train_step`` itself) from the same weights, data and
seeds, with many features at once, and asserts the same History and weights bit for bit
(rtol=0, atol=0: the same torch ops run in the same order on both sides, so no tolerance is
needed), and the same files.

Which path ran is seen from ``Stepping.zero_grad``, which only ``train_step`` calls. The
evaluation pass's inlined ``test_step`` (``Model._inlined_test_step``) is compared the same
way at the end."""

from __future__ import annotations

import csv
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

import torcheras
from torcheras import callbacks as cb
from torcheras import data

torchmetrics = pytest.importorskip("torchmetrics")


class Seamed(torcheras.Model):
    """One seam overridden, as trivially as possible: never inlined."""

    def call_on(self, x):
        return super().call_on(x)


def mlp(n_in: int = 8, n_out: int = 3, dropout: float = 0.0) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(n_in, 16), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(16, n_out))


def build(seamed: bool, net=None, **compile_kwargs) -> torcheras.Model:
    torch.manual_seed(0)
    model = (Seamed if seamed else torcheras.Model)(mlp() if net is None else net())
    compile_kwargs.setdefault("optimizer", "adam")
    compile_kwargs.setdefault("loss", "sparse_categorical_crossentropy")
    compile_kwargs.setdefault("learning_rate", 0.02)
    model.compile(device="cpu", **compile_kwargs)
    return model


@pytest.fixture
def calls(train_step_calls):
    """The (epoch, batch) of every batch that went through ``Model.train_step`` itself."""
    return train_step_calls


def assert_same_model(a: torcheras.Model, b: torcheras.Model) -> None:
    wa, wb = a.get_weights(), b.get_weights()
    assert wa.keys() == wb.keys()
    for name, value in wa.items():
        torch.testing.assert_close(value, wb[name], rtol=0, atol=0, msg=name)


def assert_same_history(a, b) -> None:
    assert a.history == b.history
    assert a.epoch == b.epoch
    assert a.stop_reason == b.stop_reason


def both(fit, calls):
    """``fit(seamed)`` for the default model then the twin: (inlined, seamed) results and the
    batches each sent through train_step."""
    calls.clear()
    inlined = fit(False)
    inlined_calls = list(calls)
    calls.clear()
    seamed = fit(True)
    seamed_calls = list(calls)
    calls.clear()
    return inlined, seamed, inlined_calls, seamed_calls


def every_batch(epochs, batches: int) -> list[tuple[int, int]]:
    return [(e, b) for e in epochs for b in range(batches)]


# ---- many callbacks at once -------------------------------------------------------------------
class LogWeightNorm(cb.Callback):
    """Model.log from a batch hook: joins the epoch's logs on either path."""

    def on_train_batch_end(self, batch, logs=None):
        self.model.log("first_norm", torch.linalg.vector_norm(self.model.module[0].weight.detach()))


def test_classification_with_a_stack_of_callbacks(blobs, calls, tmp_path):
    """Per-batch LR schedule, ReduceLROnPlateau, EarlyStopping(restore_best_weights),
    ModelCheckpoint(save_best_only), CSVLogger, TerminateOnNaN, Model.log from a callback,
    a torchmetrics metric, validation_split and validation_interval."""
    x, y = blobs

    def fit(seamed):
        folder = tmp_path / ("seamed" if seamed else "inlined")
        folder.mkdir()
        model = build(
            seamed,
            learning_rate=0.2,  # high: val_loss goes up and down, the plateau callbacks act
            metrics=["accuracy", torchmetrics.classification.MulticlassAccuracy(num_classes=3)],
        )
        callbacks = [
            cb.LearningRateScheduler(lambda step, lr: lr * 0.99, interval="batch"),
            cb.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=1),
            cb.EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True),
            cb.ModelCheckpoint(
                str(folder / "best.pt"), save_best_only=True, save_weights_only=True
            ),
            cb.CSVLogger(str(folder / "log.csv")),
            cb.TerminateOnNaN(),
            LogWeightNorm(),
        ]
        torch.manual_seed(1)
        history = model.fit(x, y, batch_size=16, epochs=8, verbose=0, validation_split=0.25,
                            validation_interval=5, callbacks=callbacks)  # fmt: skip
        return model, history, folder

    (a, ha, fa), (b, hb, fb), inlined_calls, seamed_calls = both(fit, calls)
    assert inlined_calls == [(0, 0)]  # 180 samples: 12 batches an epoch, the first checked
    assert seamed_calls == every_batch(ha.epoch, 12)
    assert_same_history(ha, hb)
    assert {"first_norm", "multiclass_accuracy", "val_multiclass_accuracy"} <= set(ha.history)
    assert len(set(ha.history["learning_rate"])) > 1
    assert_same_model(a, b)
    assert sorted(os.listdir(fa)) == sorted(os.listdir(fb))
    for name in os.listdir(fa):
        if name.endswith(".csv"):
            assert (fa / name).read_text() == (fb / name).read_text(), name
    saved_a, saved_b = build(False), build(False)
    saved_a.load_weights(fa / "best.pt")
    saved_b.load_weights(fb / "best.pt")
    assert_same_model(saved_a, saved_b)


# ---- a loss module, a DataLoader, dropout, a frozen layer -------------------------------------
def test_a_loss_module_a_shuffling_dataloader_dropout_and_a_frozen_layer(blobs, calls):
    """List batches from a DataLoader are inlined; dropout draws the same random numbers;
    a frozen layer stays put on both paths."""
    x, y = (torch.as_tensor(v) for v in blobs)
    data = torch.utils.data.TensorDataset(x[:200], y[:200])

    def fit(seamed):
        model = build(
            seamed,
            net=lambda: mlp(dropout=0.3),
            loss=nn.CrossEntropyLoss(label_smoothing=0.1),
            metrics=["accuracy"],
        )
        torcheras.freeze(model.module[0])
        frozen = model.module[0].weight.detach().clone()
        torch.manual_seed(2)
        loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True)
        history = model.fit(loader, epochs=3, verbose=0, validation_data=(x[200:], y[200:]))
        assert torch.equal(model.module[0].weight, frozen)
        return model, history

    (a, ha), (b, hb), inlined_calls, seamed_calls = both(fit, calls)
    assert inlined_calls == [(0, 0)]
    assert seamed_calls == every_batch(range(3), 7)
    assert_same_history(ha, hb)
    assert_same_model(a, b)


# ---- regression --------------------------------------------------------------------------------
def test_mse_regression_with_sgd_momentum_and_a_torchmetrics_metric(calls):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(150, 8)).astype(np.float32)
    y = (x @ rng.normal(size=(8, 1)) + 0.1 * rng.normal(size=(150, 1))).astype(np.float32)

    def fit(seamed):
        model = build(
            seamed,
            net=lambda: mlp(n_out=1),
            optimizer="sgd",
            loss="mse",
            metrics=["mae", torchmetrics.MeanSquaredError()],
        )
        model.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        torch.manual_seed(1)
        history = model.fit(x, y, batch_size=20, epochs=4, verbose=0, validation_split=0.2,
                            callbacks=[cb.EarlyStopping(monitor="loss", patience=1)])  # fmt: skip
        return model, history

    (a, ha), (b, hb), inlined_calls, seamed_calls = both(fit, calls)
    assert inlined_calls == [(0, 0)]
    assert seamed_calls == every_batch(ha.epoch, 6)
    assert_same_history(ha, hb)
    assert_same_model(a, b)


class HalfOut(nn.Module):
    """Half-precision outputs under precision "32"."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(n_out=1)

    def forward(self, x):
        return self.net(x).half()


def test_half_precision_outputs_under_precision_32(calls):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    y = rng.normal(size=(64, 1)).astype(np.float32)

    def fit(seamed):  # the loss of float16 outputs is computed in float32 on both paths
        model = build(seamed, net=HalfOut, loss="mse", learning_rate=0.01)
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False,
                            validation_data=(x[:32], y[:32]))  # fmt: skip
        return model, history

    (a, ha), (b, hb), inlined_calls, _ = both(fit, calls)
    assert inlined_calls == [(0, 0)]
    assert_same_history(ha, hb)
    assert_same_model(a, b)


# ---- batches the inlined step hands to train_step ---------------------------------------------
@pytest.mark.parametrize("weights", ["class_weight", "sample_weight"])
def test_class_and_sample_weights_take_train_step_and_still_agree(blobs, calls, weights):
    x, y = blobs
    extra = (
        {"class_weight": {0: 1.0, 1: 2.0, 2: 0.5}}
        if weights == "class_weight"
        else {"sample_weight": np.linspace(0.5, 1.5, len(y)).astype(np.float32)}
    )

    def fit(seamed):
        model = build(seamed, metrics=["accuracy"])
        torch.manual_seed(1)
        return model, model.fit(x, y, batch_size=40, epochs=2, verbose=0, **extra)

    (a, ha), (b, hb), inlined_calls, seamed_calls = both(fit, calls)
    assert inlined_calls == seamed_calls == every_batch(range(2), 6)  # (x, y, w) batches
    assert_same_history(ha, hb)
    assert_same_model(a, b)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, left, right):
        return self.head(torch.relu(self.a(left) + self.b(right)))


def test_tuple_inputs_take_train_step_and_still_agree(blobs, calls):
    x, y = blobs

    def fit(seamed):
        model = build(seamed, net=TwoInputs, metrics=["accuracy"])
        torch.manual_seed(1)
        history = model.fit((x[:, :4], x[:, 4:]), y, batch_size=60, epochs=2, verbose=0)
        return model, history

    (a, ha), (b, hb), inlined_calls, seamed_calls = both(fit, calls)
    assert inlined_calls == seamed_calls == every_batch(range(2), 4)
    assert_same_history(ha, hb)
    assert_same_model(a, b)


def test_a_bad_label_later_in_the_data_fails_alike(blobs, calls):
    """An error raised inside the step (a label out of range at the third batch): the same
    exception and message on either path."""
    x, y = blobs
    y = y.copy()
    y[130] = 7  # batch 2 of 60-sample batches

    def fit(seamed):
        model = build(seamed)
        with pytest.raises(Exception) as caught:
            model.fit(x, y, batch_size=60, epochs=1, verbose=0, shuffle=False)
        return type(caught.value), str(caught.value), model.loop.batch

    inlined, seamed, _, _ = both(fit, calls)
    assert inlined == seamed
    assert inlined[2] == 2


# ---- state across fits -------------------------------------------------------------------------
def test_recompiles_between_fits_switch_the_path_and_results_agree(blobs, calls):
    """weighted_metrics (never inlined) and a plain compile again; then find_learning_rate
    (train_step outside fit) on the fitted models."""
    x, y = blobs
    compiles = [  # factories: each model gets its own metric objects
        lambda: {"metrics": ["accuracy"]},
        lambda: {"metrics": [], "weighted_metrics": ["accuracy"], "optimizer": "sgd"},
        lambda: {"metrics": [torchmetrics.classification.MulticlassAccuracy(num_classes=3)]},
    ]

    def fit(seamed):
        model = build(seamed, **compiles[0]())
        paths, histories = [], []
        for i, settings in enumerate(compiles):
            if i:
                model.compile(device="cpu", loss="sparse_categorical_crossentropy",
                              learning_rate=0.05, **settings())  # fmt: skip
            calls.clear()
            torch.manual_seed(i)
            histories.append(model.fit(x, y, batch_size=60, epochs=2, verbose=0).history)
            paths.append(list(calls))
        found = model.find_learning_rate(x, y, batch_size=60, num_steps=8)
        return model, histories, paths, found

    (a, ha, pa, fa), (b, hb, pb, fb), _, _ = both(fit, calls)
    assert pa == [[(0, 0)], every_batch(range(2), 4), [(0, 0)]]
    assert pb == [every_batch(range(2), 4)] * 3
    assert ha == hb
    assert_same_model(a, b)
    assert fa.learning_rates == fb.learning_rates and fa.losses == fb.losses


def test_sklearn_classifier_trains_alike(blobs, calls):
    wrappers = pytest.importorskip("torcheras.wrappers")
    x, y = blobs

    def fit(seamed):
        def make(n_features_in, n_classes):
            return (Seamed if seamed else torcheras.Model)(mlp(n_features_in, n_classes))

        clf = wrappers.SKLearnClassifier(make, random_state=0, fit__epochs=2,
                                         fit__batch_size=60)  # fmt: skip
        clf.fit(x, y)
        return clf.history_, clf.predict_proba(x)

    (ha, pa), (hb, pb), inlined_calls, seamed_calls = both(fit, calls)
    assert inlined_calls == [(0, 0)] and len(seamed_calls) == 8
    assert ha == hb
    np.testing.assert_array_equal(pa, pb)


# ---- BackupAndRestore: a crash mid-epoch, then the resumed run ---------------------------------
class Crash(cb.Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, batch, logs=None):
        if self.model.loop.global_step == self.at:
            raise RuntimeError("simulated crash")


def test_backup_and_restore_resumes_mid_epoch_alike(blobs, calls, tmp_path):
    x, y = blobs

    def train(seamed, folder, crash_at=-1):
        model = build(seamed, net=lambda: mlp(dropout=0.2), metrics=["accuracy"])
        callbacks = [
            cb.BackupAndRestore(str(folder / "backup"), save_freq=2),
            cb.CSVLogger(str(folder / "log.csv"), append=True),
            cb.LearningRateScheduler(lambda step, lr: 0.02 / (1 + 0.05 * step), interval="batch"),
            Crash(crash_at),
        ]
        torch.manual_seed(1)
        history = model.fit(x, y, batch_size=32, epochs=3, verbose=0, validation_split=0.25,
                            callbacks=callbacks)  # fmt: skip
        return model, history

    def fit(seamed):
        folder = tmp_path / ("seamed" if seamed else "inlined")
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(seamed, folder, crash_at=9)  # epoch 1 (6 batches each), batch 2; backup at 8
        calls.clear()
        model, history = train(seamed, folder)
        resumed_calls = list(calls)
        reference, ref_history = train(seamed, tmp_path / f"ref-{seamed}")
        assert_same_history(history, ref_history)
        assert_same_model(model, reference)
        return model, history, resumed_calls, (folder / "log.csv").read_text()

    (a, ha, ca, la), (b, hb, cb_, lb), _, _ = both(fit, calls)
    assert ca == [(1, 2)]  # the resumed fit's first batch (its checks) alone
    assert cb_ == [(1, b_) for b_ in range(2, 6)] + every_batch([2], 6)
    assert_same_history(ha, hb)
    assert_same_model(a, b)
    assert la == lb
    assert [row[0] for row in csv.reader(la.splitlines())] == ["epoch", "0", "1", "2"]


# ---- what a callback changes in the middle of an epoch -----------------------------------------
def test_a_callback_replacing_the_optimizer_mid_epoch(blobs, calls):
    """A callback swaps ``model.optimizer`` for SGD at batch 2 of the first epoch.
    ``train_step`` steps the new optimizer from that batch on; the inlined step captured the
    optimizer when the epoch started (model.py, ``_inlined_train_step``)."""
    x, y = blobs

    class SwapOptimizer(cb.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if self.model.loop.epoch == 0 and batch == 2:
                self.model.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.5)

    def fit(seamed):
        model = build(seamed)
        return model, model.fit(x, y, batch_size=60, epochs=2, verbose=0, shuffle=False,
                                callbacks=[SwapOptimizer()])  # fmt: skip

    (a, ha), (b, hb), _, _ = both(fit, calls)
    assert_same_model(a, b)
    assert ha.history["loss"] == hb.history["loss"]


def test_a_seam_set_on_the_instance_mid_epoch_runs_from_the_next_epoch(blobs, calls):
    """A callback sets ``model.compute_loss`` at batch 2 of the first epoch: a model already
    on train_step calls it from that batch on, the inlined step from the next epoch (seams
    are read when an epoch begins, as the plain path's settings are; forward hooks and
    replaced objects are looked at every batch)."""
    x, y = blobs
    seen = []

    def fit(seamed):
        model = build(seamed)
        seen.clear()

        def compute_loss(x, y, y_pred, sample_weight=None):
            seen.append((model.loop.epoch, model.loop.batch))
            return torcheras.Model.compute_loss(model, x, y, y_pred, sample_weight)

        def set_seam(batch, logs):
            if model.loop.epoch == 0 and batch == 2:
                model.compute_loss = compute_loss

        model.fit(x, y, batch_size=60, epochs=2, verbose=0, shuffle=False,
                  callbacks=[cb.LambdaCallback(on_train_batch_begin=set_seam)])  # fmt: skip
        return list(seen)

    inlined, seamed, _, _ = both(fit, calls)
    assert seamed == [(0, 2), (0, 3)] + every_batch([1], 4)
    assert inlined == every_batch([1], 4)


# ---- the evaluation pass's inlined test_step ---------------------------------------------------
class SeenOutputs(cb.Callback):
    """Reads each evaluation batch's outputs: a forward hook on the model for the pass."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def on_test_batch_outputs(self, batch, x, y, y_pred):
        self.seen += 1


class SwapMetricsMidPass(cb.Callback):
    """Recompiles the metrics' list in place of the old one after the evaluation's 2nd batch."""

    def on_test_batch_end(self, batch, logs=None):
        if batch == 1:
            self.model.compiled_metrics = list(self.model.compiled_metrics)


@pytest.mark.parametrize(
    "case", ["plain", "sample_weight", "outputs_hook", "metrics_swapped", "inside_fit"]
)
def test_evaluate_runs_the_inlined_test_step_where_nothing_can_tell(blobs, monkeypatch, case):
    """``evaluate`` (and fit's validation) run the default test_step's body inlined from the
    second batch: the same numbers as the twin that takes ``test_step`` every batch, bit for
    bit; a batch with sample weights, a forward hook for ``on_test_batch_outputs`` and a
    metrics list replaced mid-pass take ``test_step`` itself."""
    x, y = blobs
    through_test_step: list[bool] = []  # (not a seam replaced: that alone stops the inlining)
    unpack = data.unpack

    def counted(batch):
        caller = sys._getframe(1)
        if caller.f_code.co_name == "test_step":
            through_test_step.append(type(caller.f_locals["self"]) is torcheras.Model)
        return unpack(batch)

    monkeypatch.setattr(data, "unpack", counted)
    results, taken = [], []
    for seamed in (False, True):
        model = build(
            seamed, metrics=["accuracy", torchmetrics.Accuracy("multiclass", num_classes=3)]
        )
        callbacks = []
        kwargs = {}
        if case == "sample_weight":
            kwargs["sample_weight"] = torch.linspace(0.5, 2.0, len(x))
        elif case == "outputs_hook":
            callbacks = [SeenOutputs()]
        elif case == "metrics_swapped":
            callbacks = [SwapMetricsMidPass()]
        through_test_step.clear()
        if case == "inside_fit":
            history = model.fit(x[:64], y[:64], batch_size=16, epochs=2, verbose=0,
                                validation_data=(x[64:], y[64:]))  # fmt: skip
            results.append(history.history)
        else:
            results.append(model.evaluate(x, y, batch_size=16, verbose=0, callbacks=callbacks,
                                          return_dict=True, **kwargs))  # fmt: skip
        taken.append(sum(through_test_step))
        if case == "outputs_hook":
            assert callbacks[0].seen == -(-len(x) // 16)
    assert results[0] == results[1]
    batches = -(-len(x) // 16) if case != "inside_fit" else 2 * -(-(len(x) - 64) // 16)
    assert taken[1] == 0  # the twin's class is not Model: counted as not inlined-able
    inlined_model_calls = taken[0]
    expected = {
        "plain": 1,  # the first batch: its one-time checks
        "sample_weight": batches,
        "outputs_hook": batches,
        "metrics_swapped": batches - 1,  # batch 0 (checks), then the swapped list's batches
        "inside_fit": 0,  # the one-time checks ran at fit's first training batch
    }[case]
    assert inlined_model_calls == expected


# ---- predict's inlined predict_step ------------------------------------------------------------
def test_predict_runs_the_inlined_step_and_sees_a_hook_added_mid_pass(blobs):
    """predict calls the wrapped module directly (``Model._inlined_predict_step``) and gives
    the twin's outputs bit for bit; a forward hook a batch-end hook adds to the model takes
    effect from the next batch, as it does on predict_step."""
    x, _ = blobs
    seen: dict[bool, list[int]] = {}

    def predict(seamed):
        model = build(seamed)
        calls: list[int] = []
        seen[seamed] = calls

        def add_hook(batch, logs):
            if batch == 1:
                model.register_forward_hook(lambda module, args, out: calls.append(len(out)))

        plain = model.predict(x, batch_size=50, verbose=0)
        hook_adder = cb.LambdaCallback(on_predict_batch_end=add_hook)
        hooked = model.predict(x, batch_size=50, verbose=0, callbacks=[hook_adder])
        return plain, hooked

    (a, ah), (b, bh), _, _ = both(predict, [])
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ah, bh)
    np.testing.assert_array_equal(a, ah)
    assert seen[False] == seen[True] == [50, 50, 40]  # batches 2, 3, 4 of 240 samples


class HookOrModuleForThePass(cb.Callback):
    """In ``on_test_begin`` / ``on_predict_begin`` (no batch hook): a forward hook on the
    model for the pass (removed at its end), or another module in place of the model's."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what
        self.seen: list[int] = []
        self.handle = None

    def _begin(self):
        if self.what == "hook":
            self.handle = self.model.register_forward_hook(
                lambda module, args, out: self.seen.append(len(out))
            )
        else:
            torch.manual_seed(1)
            self.model.module = mlp()  # other weights

    def _end(self):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def on_test_begin(self, logs=None):
        self._begin()

    def on_test_end(self, logs=None):
        self._end()

    def on_predict_begin(self, logs=None):
        self._begin()

    def on_predict_end(self, logs=None):
        self._end()


@pytest.mark.parametrize("what", ["hook", "module"])
@pytest.mark.parametrize("pass_", ["evaluate", "predict", "validation"])
def test_a_hook_or_module_set_in_a_pass_begin_hook_counts_from_the_first_batch(
    blobs, calls, pass_, what
):
    """A forward hook added to the model, or the module replaced, in the pass's begin hook
    (a callback without batch hooks) runs for every batch of that pass: the inlined steps
    are made after ``on_test_begin`` / ``on_predict_begin``, and give the twin's numbers."""
    x, y = blobs
    seen: dict[bool, list[int]] = {}

    def run(seamed):
        model = build(seamed)
        callback = HookOrModuleForThePass(what)
        seen[seamed] = callback.seen
        if pass_ == "evaluate":
            return model.evaluate(x, y, batch_size=50, verbose=0, callbacks=[callback],
                                  return_dict=True)  # fmt: skip
        if pass_ == "predict":
            return model.predict(x, batch_size=50, verbose=0, callbacks=[callback])
        return model.fit(x[:40], y[:40], batch_size=20, epochs=1, verbose=0, shuffle=False,
                         validation_data=(x, y), validation_batch_size=50,
                         callbacks=[callback]).history  # fmt: skip

    (a, b, _, _) = both(run, calls)
    if pass_ == "predict":
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b
    if what == "hook":
        assert seen[False] == seen[True] == [50, 50, 50, 50, 40]


class AskAtForward(nn.Module):
    """An MLP whose 4th training forward asks for an interrupt (as a signal handler would,
    between two batches of an epoch with no batch hook)."""

    def __init__(self):
        super().__init__()
        self.net = mlp()
        self.loop = None
        self.calls = 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == 4:
                self.loop.request_interrupt(7)
        return self.net(x)


def test_an_interrupt_handler_that_replaces_the_optimizer_mid_epoch(blobs, calls):
    """An ``interrupt_handler`` (set in ``on_train_begin``) that swaps in SGD and returns:
    the batches after it step SGD on both paths (the inlined step gives way to train_step,
    which reads ``model.optimizer`` each batch)."""
    x, y = blobs

    class SwapOnInterrupt(cb.Callback):
        def on_train_begin(self, logs=None):
            model = self.model
            model.module.loop = model.loop

            def swap(code):
                model.optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

            model.loop.interrupt_handler = swap

    def fit(seamed):
        model = build(seamed, net=AskAtForward)
        history = model.fit(x, y, batch_size=20, epochs=2, verbose=0, shuffle=False,
                            callbacks=[SwapOnInterrupt()])  # fmt: skip
        return model, history

    (a, ha), (b, hb), inlined_calls, _ = both(fit, calls)
    assert isinstance(a.optimizer, torch.optim.SGD)
    # 12 batches an epoch; the handler ran after batch 3: train_step to the epoch's end,
    # then a step inlined anew (with SGD) from the next epoch
    assert inlined_calls == [(0, 0)] + [(0, b) for b in range(4, 12)]
    assert_same_history(ha, hb)
    assert_same_model(a, b)
