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
from conftest import make_model
from torch.utils.data import TensorDataset

from torcheras.callbacks import LambdaCallback
from torcheras.data import make_fit_sources


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
