"""Bad input fails before training starts, with a message naming the argument and the fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_model
from torch import nn

import torcheras
from torcheras.callbacks import LambdaCallback


@pytest.fixture
def started():
    """Records whether training started (on_train_begin fired)."""
    calls = []
    return calls, LambdaCallback(on_train_begin=lambda logs: calls.append("begin"))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"y": np.zeros(9, dtype="int64")},
            ValueError,
            r"`x` and `y` have different lengths: 10 samples and 9 targets",
        ),
        (
            {"x": np.zeros((0, 8), dtype="float32"), "y": np.zeros(0, dtype="int64")},
            ValueError,
            r"`x` is empty",
        ),
        ({"validation_split": 1.0}, ValueError, r"`validation_split` must be a float in \[0, 1\)"),
        ({"validation_split": -0.1}, ValueError, r"`validation_split`"),
        ({"sample_weight": np.ones(3)}, ValueError, r"`sample_weight` has 3 rows but `x` has 10"),
        ({"x": "data.csv"}, TypeError, r"`x` must be a numpy array, a tensor"),
        ({"y": None}, ValueError, r"`y` is required"),
        ({"batch_size": 0}, ValueError, r"`batch_size` must be a positive integer"),
        ({"epochs": -1}, ValueError, r"`epochs` must be a non-negative integer"),
        ({"verbose": 3}, ValueError, r"`verbose` must be 'auto', 0, 1 or 2"),
        ({"validation_split": 0.95}, ValueError, r"leaves 0 for training and 10 for validation"),
    ],
)
def test_bad_fit_arguments_fail_before_training(started, kwargs, error, message):
    calls, probe = started
    args = {
        "x": np.zeros((10, 8), dtype="float32"),
        "y": np.zeros(10, dtype="int64"),
        "verbose": 0,
        "callbacks": [probe],
        **kwargs,
    }
    with pytest.raises(error, match=message):
        make_model().fit(**args)
    assert calls == []


def test_fit_before_compile():
    with pytest.raises(RuntimeError, match=r"fit\(\) needs compile\(\) first"):
        torcheras.Model(nn.Linear(2, 1)).fit(np.zeros((4, 2)), np.zeros((4, 1)))
    with pytest.raises(RuntimeError, match=r"evaluate\(\) needs compile\(\) first"):
        torcheras.Model(nn.Linear(2, 1)).evaluate(np.zeros((4, 2)), np.zeros((4, 1)))


def test_compile_without_loss_needs_train_step():
    model = torcheras.Model(nn.Linear(2, 1))
    model.compile("sgd")
    with pytest.raises(ValueError, match=r"fit\(\) needs a loss"):
        model.fit(np.zeros((4, 2)), np.zeros((4, 1)))


def test_iterator_without_steps_per_epoch_for_several_epochs(started):
    calls, probe = started
    gen = ((torch.zeros(2, 8), torch.zeros(2, dtype=torch.long)) for _ in range(3))
    with pytest.raises(ValueError, match=r"pass `steps_per_epoch`"):
        make_model().fit(gen, epochs=2, verbose=0, callbacks=[probe])
    assert calls == []


def test_dataloader_with_batch_size_or_y():
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.zeros(4, 8), torch.zeros(4, dtype=torch.long))
    )
    with pytest.raises(ValueError, match="Do not pass `batch_size` with a DataLoader"):
        make_model().fit(loader, batch_size=2, verbose=0)
    with pytest.raises(ValueError, match="`y` must not be given"):
        make_model().fit(loader, np.zeros(4), verbose=0)
    with pytest.raises(
        ValueError, match="`validation_split` works with arrays, tensors and Datasets"
    ):
        make_model().fit(loader, validation_split=0.5, verbose=0)


def test_ragged_and_multi_input_length_errors():
    with pytest.raises(TypeError, match="could not be converted|dtype object"):
        make_model().fit([[1.0, 2.0], [1.0]], [0, 1], verbose=0)
    with pytest.raises(ValueError, match="different lengths"):
        make_model().fit((np.zeros((4, 8)), np.zeros((5, 8))), np.zeros(4), verbose=0)


def test_float64_numpy_is_cast_like_keras():
    model = make_model()
    history = model.fit(np.random.rand(16, 8), np.zeros(16, dtype="int64"), verbose=0)
    assert history.history["loss"]
