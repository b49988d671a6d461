"""Keras's optimizer formulas where a Keras program needs Keras's numbers."""

from __future__ import annotations

import math
import os

import pytest
import torch

from torcheras.optimizers import KerasAdam


def _gradients(steps=100):
    """Gradients small enough that epsilon's placement matters (1e-4 .. 1e-7)."""
    gen = torch.Generator().manual_seed(0)
    scales = 10.0 ** -torch.randint(4, 8, (steps, 1), generator=gen)
    return list(torch.randn(steps, 5, generator=gen) * scales)


def _keras_formula(w0, grads, lr=1e-3, b1=0.9, b2=0.999, eps=1e-7):
    """keras/src/optimizers/adam.py's update, in float64."""
    w, m, v = w0.double().clone(), torch.zeros(5, dtype=torch.float64), torch.zeros(5).double()
    for t, g in enumerate(grads, 1):
        g = g.double()
        m += (g - m) * (1 - b1)
        v += (g * g - v) * (1 - b2)
        w -= lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (v.sqrt() + eps)
    return w


def _run(optimizer_cls, w0, grads, **kwargs):
    weight = torch.nn.Parameter(w0.clone())
    optimizer = optimizer_cls([weight], **kwargs)
    for g in grads:
        weight.grad = g.clone()
        optimizer.step()
    return weight.detach().double()


@pytest.mark.parametrize("foreach", [False, True])
def test_keras_adam_follows_keras_formula_where_torchs_adam_does_not(foreach):
    w0, grads = torch.randn(5, generator=torch.Generator().manual_seed(1)), _gradients()
    expected = _keras_formula(w0, grads)
    ours = _run(KerasAdam, w0, grads, foreach=foreach)
    torchs = _run(torch.optim.Adam, w0, grads, eps=1e-7, foreach=foreach)
    assert (ours - expected).abs().max() < 2e-6  # float32 against float64
    assert (torchs - expected).abs().max() > 1e-4  # epsilon after the bias correction


def test_keras_adam_equals_keras_itself():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("Keras runs on another backend in this process")
    w0, grads = torch.randn(5, generator=torch.Generator().manual_seed(2)), _gradients()
    variable, optimizer = keras.Variable(w0.numpy()), keras.optimizers.Adam()
    for g in grads:
        optimizer.apply([keras.ops.convert_to_tensor(g.numpy())], [variable])
    theirs = torch.as_tensor(keras.ops.convert_to_numpy(variable))
    torch.testing.assert_close(_run(KerasAdam, w0, grads).float(), theirs, rtol=0, atol=1e-6)


def test_keras_adam_trains_a_model_and_saves_its_state(tmp_path):
    import torcheras

    torch.manual_seed(0)
    model = torcheras.Model(torch.nn.Linear(3, 1))
    model.compile(KerasAdam(model.parameters(), lr=0.05), "mse")
    x = torch.randn(64, 3)
    y = x.sum(1, keepdim=True)
    history = model.fit(x, y, epochs=20, verbose=0)
    assert history.history["loss"][-1] < 0.1 * history.history["loss"][0]
    assert model.optimizer.param_groups[0]["eps"] == 1e-7  # the user's value, kept
