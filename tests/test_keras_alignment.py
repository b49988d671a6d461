"""Keras's rules where torcheras used to differ (issue 26): the ``validation_split`` cut, Keras
loss objects called directly, the class axis of ``sparse_categorical_crossentropy``, batch-per-
item datasets (``PyDataset``) and callbacks driven by a hand-written loop.

Where Keras is installed (the ``bench`` extra) its own functions are the reference too.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_weights, copy_keras_weights, make_model
from torch.utils.data import TensorDataset

import torcheras
from torcheras import losses
from torcheras.callbacks import (
    CallbackList,
    EarlyStopping,
    LambdaCallback,
    LearningRateScheduler,
    ReduceLROnPlateau,
)
from torcheras.data import PyDataset, make_fit_sources


def _keras_module(name: str):
    """A Keras module, imported with torch's global settings left as they were; None when
    Keras is not installed or runs on another backend."""
    before = (torch.get_default_dtype(), torch.get_num_threads(), torch.is_grad_enabled())
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import importlib

        keras = importlib.import_module("keras")
        module = importlib.import_module(name)
    except Exception:
        return None
    finally:
        torch.set_default_dtype(before[0])
        torch.set_num_threads(before[1])
        torch.set_grad_enabled(before[2])
    if keras.backend.backend() != "torch":
        return None
    return module


# ---- 1. validation_split cuts where Keras does ------------------------------------------------


def _fit_sizes(x, y, split, **kwargs):
    """(training samples, validation samples) that fit used, counted batch by batch."""
    seen = {"train": 0, "val": 0}
    probe = LambdaCallback(
        on_train_batch_end=lambda b, logs: seen.__setitem__("train", seen["train"] + 1),
        on_test_batch_end=lambda b, logs: seen.__setitem__("val", seen["val"] + 1),
    )
    model = make_model()
    model.fit(
        x, y, batch_size=1, epochs=1, validation_split=split, verbose=0, callbacks=[probe], **kwargs
    )
    return seen["train"], seen["val"]


@pytest.mark.parametrize(("n", "split"), [(5, 0.3), (10, 0.25), (7, 0.5), (9, 0.1), (3, 0.34)])
def test_validation_split_cuts_at_floor_of_n_times_one_minus_split(n, split):
    x = np.random.default_rng(0).normal(size=(n, 8)).astype("float32")
    y = np.arange(n) % 3
    expected = math.floor(n * (1 - split))
    assert _fit_sizes(x, y, split) == (expected, n - expected)
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    seen = []
    model = make_model()
    model.fit(
        dataset,
        batch_size=1,
        epochs=1,
        validation_split=split,
        verbose=0,
        callbacks=[LambdaCallback(on_train_batch_end=lambda b, logs: seen.append(b))],
    )
    assert len(seen) == expected
    slicing = _keras_module("keras.src.trainers.data_adapters.array_slicing")
    if slicing is not None:
        train, val = slicing.train_validation_split((x, y), validation_split=split)
        assert (len(train[0]), len(val[0])) == (expected, n - expected)


def test_five_samples_split_point_three_train_three_validate_two():
    x, y = np.zeros((5, 8), "float32"), np.zeros(5, "int64")
    assert _fit_sizes(x, y, 0.3) == (3, 2)


def test_validation_split_of_dicts_dataframes_and_tensors_cut_alike():
    pd = pytest.importorskip("pandas")
    x = np.random.default_rng(1).normal(size=(5, 8)).astype("float32")
    y = np.array([0, 1, 2, 0, 1])
    for xs, ys in [(torch.from_numpy(x), torch.from_numpy(y)), (pd.DataFrame(x), pd.Series(y))]:
        assert _fit_sizes(xs, ys, 0.3) == (3, 2)
    train, val = make_fit_sources(
        {"a": x, "b": x[:, :2]},
        {"out": y},
        None,
        batch_size=1,
        shuffle=False,
        class_weight=None,
        steps_per_epoch=None,
        epochs_to_run=1,
        validation_split=0.3,
        validation_data=None,
        validation_steps=None,
        validation_batch_size=None,
        validation_freq=1,
    )
    assert (train.num_samples, val.num_samples) == (3, 2)
    np.testing.assert_array_equal(val.x["b"].numpy(), x[3:, :2])


def test_validation_split_leaving_no_training_sample_names_keras_rule():
    with pytest.raises(ValueError, match=r"leaves 0 for training and 10 for validation"):
        make_model().fit(
            np.zeros((10, 8), "float32"), np.zeros(10, "int64"), validation_split=0.95, verbose=0
        )


# ---- 3. Keras's loss objects called directly --------------------------------------------------


def _class_data():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 4, generator=gen)
    labels = torch.randint(0, 4, (6,), generator=gen)
    return logits, labels, F.one_hot(labels, 4).float()


def test_keras_loss_objects_called_directly_return_keras_reduced_scalar():
    logits, labels, one_hot = _class_data()
    weights = torch.tensor([1.0, 0.5, 2.0, 0.0, 1.0, 3.0])
    ce = F.cross_entropy(logits, labels, reduction="none")
    cases = [
        (losses.CategoricalCrossentropy(from_logits=True), one_hot, logits),
        (losses.SparseCategoricalCrossentropy(from_logits=True), labels, logits),
        (losses.CategoricalCrossentropy(), one_hot, logits.softmax(-1)),
        (losses.SparseCategoricalCrossentropy(), labels, logits.softmax(-1)),
    ]
    for loss, y_true, y_pred in cases:
        value = loss(y_true, y_pred.clone().requires_grad_())
        assert value.dim() == 0
        value.backward()  # a scalar, as Keras's
        torch.testing.assert_close(value.detach(), ce.mean(), rtol=1e-5, atol=1e-6)
        weighted = loss(y_true, y_pred, sample_weight=weights)
        torch.testing.assert_close(weighted, (ce * weights).sum() / 6, rtol=1e-5, atol=1e-6)
    y = (labels % 2).float()
    bce = losses.BinaryCrossentropy(from_logits=True)
    torch.testing.assert_close(
        bce(y, logits[:, 0]), F.binary_cross_entropy_with_logits(logits[:, 0], y)
    )


def test_keras_loss_objects_take_keras_reductions():
    logits, labels, _ = _class_data()
    weights = torch.tensor([1.0, 0.5, 2.0, 0.0, 1.0, 3.0])
    ce = F.cross_entropy(logits, labels, reduction="none")
    make = losses.SparseCategoricalCrossentropy
    torch.testing.assert_close(make(True, reduction="sum")(labels, logits), ce.sum())
    torch.testing.assert_close(make(True, reduction="none")(labels, logits), ce)
    torch.testing.assert_close(make(True, reduction=None)(labels, logits), ce)
    torch.testing.assert_close(
        make(True, reduction="mean_with_sample_weight")(labels, logits, weights),
        (ce * weights).sum() / weights.sum(),
    )
    with pytest.raises(ValueError, match="`reduction` must be one of"):
        make(True, reduction="batchmean")


@pytest.mark.parametrize(
    ("loss", "first", "second"),
    [
        ("sparse", "logits", "labels"),
        ("categorical", "logits", "one_hot"),
        ("binary", "logits", "binary"),
    ],
)
def test_keras_loss_objects_given_torch_order_name_the_fix(loss, first, second):
    logits, labels, one_hot = _class_data()
    data = {"logits": logits, "labels": labels, "one_hot": one_hot, "binary": one_hot}
    obj = {
        "sparse": losses.SparseCategoricalCrossentropy(from_logits=True),
        "categorical": losses.CategoricalCrossentropy(from_logits=True),
        "binary": losses.BinaryCrossentropy(from_logits=True),
    }[loss]
    with pytest.raises(ValueError, match=r"call loss\(y_true, y_pred\)"):
        obj(data[first], data[second])


def test_compiled_keras_loss_objects_still_train_and_match_the_names():
    x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
    y = np.arange(32) % 3
    results = []
    for loss in ["sparse_categorical_crossentropy", losses.SparseCategoricalCrossentropy(True)]:
        torch.manual_seed(0)
        model = make_model(loss=loss)
        results.append(model.fit(x, y, epochs=2, verbose=0).history["loss"])
    assert results[0] == pytest.approx(results[1], rel=1e-6)


def test_keras_loss_objects_agree_with_keras():
    keras_losses = _keras_module("keras.losses")
    if keras_losses is None:
        pytest.skip("Keras (torch backend) is not installed")
    logits, labels, one_hot = _class_data()
    weights = torch.tensor([1.0, 0.5, 2.0, 0.0, 1.0, 3.0])
    probs = logits.softmax(-1)
    y_bin = (one_hot > 0).float()
    for name, y_true, y_pred, kwargs in [
        ("CategoricalCrossentropy", one_hot, logits, {"from_logits": True}),
        ("CategoricalCrossentropy", one_hot, probs, {"label_smoothing": 0.1}),
        ("SparseCategoricalCrossentropy", labels, logits, {"from_logits": True}),
        ("SparseCategoricalCrossentropy", labels, probs, {}),
        ("BinaryCrossentropy", y_bin, logits, {"from_logits": True}),
        ("BinaryCrossentropy", y_bin, logits.sigmoid(), {}),
    ]:
        for reduction in ["sum_over_batch_size", "sum", "none", "mean_with_sample_weight"]:
            ours = getattr(losses, name)(**kwargs, reduction=reduction)(y_true, y_pred, weights)
            theirs = getattr(keras_losses, name)(**kwargs, reduction=reduction)(
                y_true.numpy(), y_pred.numpy(), sample_weight=weights.numpy()
            )
            np.testing.assert_allclose(
                ours.numpy(), np.asarray(theirs.cpu()), rtol=1e-5, atol=1e-6, err_msg=name
            )


# ---- 4. the class axis of sparse_categorical_crossentropy -------------------------------------


def test_sparse_categorical_crossentropy_reads_keras_channels_last_like_f_cross_entropy():
    gen = torch.Generator().manual_seed(2)
    nhwc = torch.randn(2, 5, 6, 3, generator=gen)  # classes last, as Keras lays them out
    labels = torch.randint(0, 3, (2, 5, 6), generator=gen)
    expected = F.cross_entropy(nhwc.movedim(-1, 1), labels)
    torch.testing.assert_close(
        losses.get("sparse_categorical_crossentropy")(nhwc, labels), expected
    )
    nchw = nhwc.movedim(-1, 1).contiguous()  # torch's layout: "cross_entropy"
    torch.testing.assert_close(losses.get("cross_entropy")(nchw, labels), expected)


@pytest.mark.parametrize("from_logits", [True, False])
def test_sparse_categorical_crossentropy_on_torch_layout_names_cross_entropy(from_logits):
    outputs = torch.randn(2, 3, 5, 6)  # (N, C, H, W)
    labels = torch.randint(0, 3, (2, 5, 6))
    losses_to_try = [
        losses.get("sparse_categorical_crossentropy"),
        losses.get(losses.SparseCategoricalCrossentropy(from_logits=from_logits)),
    ]
    for loss in losses_to_try:
        with pytest.raises(ValueError, match=r"loss='cross_entropy'.*movedim\(1, -1\)"):
            loss(outputs if from_logits else outputs.softmax(1), labels)


def test_fit_of_a_segmentation_net_names_cross_entropy_and_trains_with_it():
    x = np.random.default_rng(0).normal(size=(4, 1, 6, 6)).astype("float32")
    y = np.random.default_rng(1).integers(0, 3, size=(4, 6, 6))
    net = torch.nn.Conv2d(1, 3, 3, padding=1)
    model = torcheras.Model(net)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"], device="cpu")
    with pytest.raises(ValueError, match="loss='cross_entropy'"):
        model.fit(x, y, epochs=1, verbose=0)
    model.compile("adam", "cross_entropy", metrics=["accuracy"], device="cpu")
    history = model.fit(x, y, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


# ---- 7. callbacks driven by a hand-written loop ----------------------------------------------


def _hand_written_loop(callbacks, epochs=8, val_losses=None):
    net = torch.nn.Linear(2, 1)
    net.optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    cbs = CallbackList(callbacks, add_history=True, model=net, epochs=epochs, steps=1)
    net.stop_training = False
    cbs.on_train_begin()
    for epoch in range(epochs):
        cbs.on_epoch_begin(epoch)
        cbs.on_train_batch_begin(0)
        cbs.on_train_batch_end(0, {"loss": 1.0})
        cbs.on_epoch_end(epoch, {"loss": 1.0, "val_loss": (val_losses or [1.0] * epochs)[epoch]})
        if net.stop_training:
            break
    cbs.on_train_end()
    return net, net.history


def test_history_of_a_hand_written_loop_keeps_the_stop_reason():
    _, history = _hand_written_loop([EarlyStopping(patience=2)])
    assert history.epoch == [0, 1, 2]
    assert history.stop_reason is not None and "EarlyStopping" in history.stop_reason


def test_lr_callbacks_put_learning_rate_in_a_hand_written_loop_logs():
    plateau = ReduceLROnPlateau(patience=1, factor=0.5)
    _, history = _hand_written_loop([plateau], epochs=4)
    # the rate each epoch ran with, before the reduction at its end (Keras's)
    assert history.history["learning_rate"] == pytest.approx([0.1, 0.1, 0.05, 0.025])
    schedule = LearningRateScheduler(lambda epoch: 0.1 / (epoch + 1))
    _, history = _hand_written_loop([schedule], epochs=3)
    assert history.history["learning_rate"] == pytest.approx([0.1, 0.05, 0.1 / 3])


def test_fit_logs_learning_rate_once_with_lr_callbacks(blobs):
    x, y = blobs
    model = make_model(optimizer="sgd")
    plateau = ReduceLROnPlateau(monitor="loss", patience=0, factor=0.5, min_delta=10.0)
    history = model.fit(x, y, epochs=3, verbose=0, callbacks=[plateau])
    assert history.history["learning_rate"] == pytest.approx([0.02, 0.02, 0.01])  # as before


# ---- 5. datasets of batches: PyDataset ---------------------------------------------------------


class _Batches(PyDataset):
    def __init__(self, x, y, batch_size):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size
        self.seen, self.ends = [], 0

    def __len__(self):
        return math.ceil(len(self.x) / self.batch_size)

    def __getitem__(self, i):
        self.seen.append(i)
        part = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.x[part], self.y[part]

    def on_epoch_end(self):
        self.ends += 1


def test_a_py_dataset_gives_one_batch_per_item(blobs):
    x, y = blobs
    batches = _Batches(torch.from_numpy(x), torch.from_numpy(y), 40)
    model = make_model()
    model.fit(batches, epochs=2, verbose=0)
    assert len(batches.seen) == 12 and sorted(batches.seen[:6]) == list(range(6))
    assert batches.seen[:6] != list(range(6)) or batches.seen[6:] != list(range(6))  # shuffled
    assert batches.ends == 2
    batches.seen.clear()
    model.fit(batches, epochs=1, shuffle=False, verbose=0)
    assert batches.seen == list(range(6))  # Keras: in order without shuffle
    batches.seen.clear()
    predictions = model.predict(batches, verbose=0)
    assert batches.seen == list(range(6)) and predictions.shape == (240, 3)
    np.testing.assert_allclose(predictions, model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    expected = model.evaluate(x, y, verbose=0, return_dict=True)
    got = model.evaluate(batches, verbose=0, return_dict=True)
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_a_keras_style_sequence_is_recognised_without_keras():
    Sequence = type("Sequence", (), {"__module__": "keras.src.utils"})

    class Batches(Sequence):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.ones(4, 8), torch.zeros(4, dtype=torch.long)

    model = make_model()
    history = model.fit(Batches(), epochs=1, verbose=0)
    assert history.params["steps"] == 2
    with pytest.raises(ValueError, match="Do not pass `batch_size` with a PyDataset"):
        model.fit(Batches(), batch_size=4, verbose=0)


def test_keras_py_dataset_instances_are_accepted():
    keras_utils = _keras_module("keras.utils")
    if keras_utils is None:
        pytest.skip("Keras (torch backend) is not installed")

    class Batches(keras_utils.PyDataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return np.ones((5, 8), "float32"), np.zeros(5, "int64")

    history = make_model().fit(Batches(), epochs=1, verbose=0)
    assert history.params["steps"] == 3


class _DatasetOfBatches(torch.utils.data.Dataset):
    """A map-style Dataset whose every item is already a batch of 8 samples: the mistake a
    PyDataset exists for. Its DataLoader makes (30, 8, 8) inputs of the blobs."""

    def __init__(self, x, y):
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)

    def __len__(self):
        return len(self.x) // 8

    def __getitem__(self, i):
        return self.x[i * 8 : (i + 1) * 8], self.y[i * 8 : (i + 1) * 8]


@pytest.mark.parametrize("method", ["fit", "evaluate", "predict"])
def test_a_dataset_of_batches_batched_again_is_refused_naming_py_dataset(blobs, method):
    x, y = blobs
    model = make_model()
    model.fit(x, y, epochs=1, verbose=0)  # given (batch, 8) inputs
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as error:
        getattr(model, method)(_DatasetOfBatches(x, y), verbose=0)
    message = str(error.value)
    assert "(30, 8, 8)" in message and "one rank more" in message  # 30 items, batched
    assert "torcheras.data.PyDataset" in message and "batch_size=None" in message
    # refused before any step: the weights are untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


class _Masked(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x, mask=None):
        return self.linear(x) if mask is None else self.linear(x) * mask


class _TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.image = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(18, 3))
        self.table = torch.nn.Linear(5, 3)

    def forward(self, image, table):
        return self.image(image) + self.table(table)


class _Generator(torcheras.Model):
    """A custom train_step whose batch (real samples) is not the model's input (noise)."""

    def __init__(self):
        super().__init__(torch.nn.Linear(2, 8))

    def train_step(self, batch):
        real = batch[0]
        self.optimizer.zero_grad()
        fake = self.module(torch.randn(len(real), 2))
        loss = (fake.mean(0) - real.reshape(len(real), -1).mean(0)).pow(2).sum()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss}


def test_inputs_of_another_form_than_before_still_work():
    """Only a Dataset's items batched again are refused: a model that flattens takes (N, 28,
    28) and (N, 1, 28, 28); an optional input may be left out; dict inputs come in any key
    order; a custom train_step's batch need not be the model's input."""
    rng = np.random.default_rng(0)
    flat = torcheras.Model(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)))
    flat.compile("adam", "cross_entropy")
    images = rng.normal(size=(16, 28, 28)).astype("float32")
    flat.fit(images, rng.integers(0, 10, 16), epochs=1, verbose=0)
    assert flat.predict(images[:, None], verbose=0).shape == (16, 10)
    assert flat.predict(TensorDataset(torch.from_numpy(images[:, None])), verbose=0).shape == (
        16,
        10,
    )

    masked = torcheras.Model(_Masked())
    masked.compile("adam", "cross_entropy")
    x = rng.normal(size=(32, 4)).astype("float32")
    masked.fit((x, np.ones((32, 3), "float32")), rng.integers(0, 3, 32), epochs=1, verbose=0)
    assert masked.predict(x, verbose=0).shape == (32, 3)

    two = torcheras.Model(_TwoInputs())
    two.compile("adam", "cross_entropy")
    image, table = rng.normal(size=(16, 2, 3, 3)), rng.normal(size=(16, 5))
    inputs = {"image": image.astype("float32"), "table": table.astype("float32")}
    two.fit(inputs, rng.integers(0, 3, 16), epochs=1, verbose=0)
    assert two.predict(dict(reversed(inputs.items())), verbose=0).shape == (16, 3)

    generator = _Generator()
    generator.compile("adam")
    generator.fit(rng.normal(size=(32, 1, 2, 4)).astype("float32"), epochs=1, verbose=0)
    assert generator.predict(rng.normal(size=(5, 2)).astype("float32"), verbose=0).shape == (5, 8)


def test_a_dataset_of_sequences_keeps_its_rank_and_trains():
    """Items of (steps, features) per sample are samples, not batches: they batch to
    (batch, steps, features) every pass, and nothing is refused."""
    rng = np.random.default_rng(0)
    xs = torch.from_numpy(rng.normal(size=(64, 5, 4)).astype("float32"))
    ys = torch.from_numpy(rng.integers(0, 3, size=(64, 5)))
    model = torcheras.Model(torch.nn.Linear(4, 3))
    model.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])
    history = model.fit(TensorDataset(xs, ys), epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2
    assert model.predict(TensorDataset(xs), verbose=0).shape == (64, 5, 3)


# ---- the differential program: Keras and torcheras on the same weights, data and order -------


@pytest.mark.parametrize(
    ("name", "kwargs"), [("sgd", {"momentum": 0.9}), ("rmsprop", {}), ("adam", {})]
)
def test_a_keras_program_with_callbacks_class_weights_and_a_split_gives_keras_numbers(
    name, kwargs, keras
):
    """One program, as a Keras user writes it: a classifier, ``validation_split`` (103
    samples, not a multiple of anything), ``class_weight``, ``"accuracy"``, EarlyStopping and
    ReduceLROnPlateau that fire within the run. History (every key, learning rate included)
    and the weights agree with Keras 3 to 1e-5."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(103, 6)).astype("float32")
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype("int64") + (x[:, 2] > 1).astype("int64")
    class_weight = {0: 1.0, 1: 2.0, 2: 0.5}
    keras.utils.set_random_seed(0)
    theirs = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(16, "relu"), keras.layers.Dense(3)]
    )
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    copy_keras_weights(keras, theirs, [net[0], net[2]])

    def their_callbacks():
        plateau = keras.callbacks.ReduceLROnPlateau
        return [
            plateau(monitor="loss", factor=0.5, patience=1, min_delta=1e9),
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=3, min_delta=1e9),
        ]

    their_optimizer = keras.optimizers.get(name).__class__(learning_rate=0.05, **kwargs)
    theirs.compile(
        optimizer=their_optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    their_history = theirs.fit(
        x, y, batch_size=16, epochs=8, shuffle=False, verbose=0, validation_split=0.3,
        class_weight=class_weight, callbacks=their_callbacks(),
    ).history  # fmt: skip

    model = torcheras.Model(net)
    model.compile(
        optimizer=name,
        loss=losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        learning_rate=0.05,
    )
    if kwargs:
        model.optimizer = type(model.optimizer)(net.parameters(), lr=0.05, **kwargs)
    history = model.fit(
        x, y, batch_size=16, epochs=8, shuffle=False, verbose=0, validation_split=0.3,
        class_weight=class_weight,
        callbacks=[
            ReduceLROnPlateau(monitor="loss", factor=0.5, patience=1, min_delta=1e9),
            EarlyStopping(monitor="val_loss", patience=3, min_delta=1e9),
        ],
    ).history  # fmt: skip

    assert len(their_history["loss"]) == 4 < 8  # EarlyStopping fired; the rate was halved
    assert sorted(history) == sorted(their_history)
    for key, theirs_values in their_history.items():
        np.testing.assert_allclose(history[key], theirs_values, rtol=0, atol=1e-5, err_msg=key)
    assert_same_weights(keras, theirs, [net[0], net[2]], atol=1e-5)
