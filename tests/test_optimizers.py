"""Keras's optimizer formulas where a Keras program needs Keras's numbers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import assert_same_weights, copy_keras_weights

from torcheras.optimizers import KerasAdam, set_learning_rate
from torcheras.optimizers import get as get_optimizer


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


def test_keras_adam_equals_keras_itself(keras):
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


# Keras 3's update formulas (keras/src/optimizers/*.py), in float64, with Keras's decoupled
# weight decay (w -= w * wd * lr, before the update). State starts as Keras's does.
def _keras_update(name, w, grads, rates, **hp):
    w = w.double().clone()
    z = torch.zeros_like(w)
    s = {"m": z.clone(), "v": z.clone(), "a": z.clone(), "b": z.clone(), "u": z.clone()}
    s["acc"] = torch.full_like(w, hp.get("initial_accumulator_value", 0.1))
    u_product = 1.0
    for t, (g, lr) in enumerate(zip(grads, rates), 1):
        g = g.double()
        w -= w * hp.get("weight_decay", 0.0) * lr
        if name in ("adam", "adamw"):
            b1, b2, eps = hp.get("beta_1", 0.9), hp.get("beta_2", 0.999), hp.get("epsilon", 1e-7)
            s["m"] += (g - s["m"]) * (1 - b1)
            s["v"] += (g * g - s["v"]) * (1 - b2)
            alpha = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
            w -= alpha * s["m"] / (s["v"].sqrt() + eps)
        elif name == "sgd":
            momentum = hp.get("momentum", 0.0)
            if momentum:
                s["m"] = momentum * s["m"] - lr * g
                w += momentum * s["m"] - lr * g if hp.get("nesterov") else s["m"]
            else:
                w -= lr * g
        elif name == "rmsprop":
            rho, eps, momentum = hp.get("rho", 0.9), hp.get("epsilon", 1e-7), hp.get("momentum", 0)
            s["v"] = rho * s["v"] + (1 - rho) * g * g
            if hp.get("centered"):
                s["a"] = rho * s["a"] + (1 - rho) * g
                increment = lr * g / (s["v"] - s["a"] ** 2 + eps).sqrt()
            else:
                increment = lr * g / (s["v"] + eps).sqrt()
            if momentum:
                s["b"] = momentum * s["b"] + increment
                w -= s["b"]
            else:
                w -= increment
        elif name == "adagrad":
            s["acc"] += g * g
            w -= lr * g / (s["acc"] + hp.get("epsilon", 1e-7)).sqrt()
        elif name == "adadelta":
            rho, eps = hp.get("rho", 0.95), hp.get("epsilon", 1e-7)
            s["a"] = rho * s["a"] + (1 - rho) * g * g
            delta = -(s["b"] + eps).sqrt() * g / (s["a"] + eps).sqrt()
            s["b"] = rho * s["b"] + (1 - rho) * delta * delta
            w += lr * delta
        elif name == "adamax":
            b1, b2, eps = 0.9, 0.999, 1e-7
            s["m"] += (g - s["m"]) * (1 - b1)
            s["u"] = torch.maximum(b2 * s["u"], g.abs())
            w -= lr * s["m"] / ((1 - b1**t) * (s["u"] + eps))
        elif name == "nadam":
            b1, b2, eps = 0.9, 0.999, 1e-7
            u_t, u_t1 = b1 * (1 - 0.5 * 0.96**t), b1 * (1 - 0.5 * 0.96 ** (t + 1))
            u_product *= u_t
            s["m"] += (g - s["m"]) * (1 - b1)
            s["v"] += (g * g - s["v"]) * (1 - b2)
            m_hat = u_t1 * s["m"] / (1 - u_product * u_t1) + (1 - u_t) * g / (1 - u_product)
            w -= m_hat * lr / ((s["v"] / (1 - b2**t)).sqrt() + eps)
        elif name == "lion":
            b1, b2 = 0.9, 0.99
            w -= lr * torch.sign(s["m"] * b1 + g * (1 - b1))
            s["m"] = s["m"] * b2 + g * (1 - b2)
    return w


def _varied(steps=60, seed=0):
    """Gradients from 1e-1 down to 1e-7, and a rate that changes every step (0 for two)."""
    gen = torch.Generator().manual_seed(seed)
    scales = 10.0 ** -torch.randint(1, 8, (steps, 1), generator=gen)
    grads = list(torch.randn(steps, 5, generator=gen) * scales)
    factors = [
        0.0 if t in (30, 31) else 0.5 + float(torch.rand((), generator=gen)) for t in range(steps)
    ]
    return grads, factors


# (name, Keras's keyword arguments, the same in torch's names for our class)
CASES = [
    ("adam", {}, {}),
    ("adam", {"weight_decay": 0.01}, {"weight_decay": 0.01}),
    ("adamw", {}, {}),
    ("sgd", {}, {}),
    ("sgd", {"momentum": 0.9}, {"momentum": 0.9}),
    ("sgd", {"momentum": 0.9, "nesterov": True}, {"momentum": 0.9, "nesterov": True}),
    ("sgd", {"momentum": 0.5, "weight_decay": 0.1}, {"momentum": 0.5, "weight_decay": 0.1}),
    ("rmsprop", {}, {}),
    ("rmsprop", {"momentum": 0.9, "centered": True, "rho": 0.8},
     {"momentum": 0.9, "centered": True, "alpha": 0.8}),
    ("adagrad", {}, {}),
    ("adagrad", {"weight_decay": 0.01}, {"weight_decay": 0.01}),
    ("adadelta", {}, {}),
    ("adamax", {}, {}),
    ("nadam", {}, {}),
    ("lion", {}, {}),
]  # fmt: skip
_DEFAULT_LR = {"sgd": 0.01}
_IDS = [f"{n}-{'-'.join(k) or 'defaults'}" for n, k, _ in CASES]


def _run_named(name, w0, grads, factors, dtype, **kwargs):
    weight = torch.nn.Parameter(w0.to(dtype).clone())
    optimizer = get_optimizer(name, [weight])
    if kwargs:
        optimizer = type(optimizer)([weight], **kwargs)
    base = optimizer.param_groups[0]["lr"]
    for g, f in zip(grads, factors):
        set_learning_rate(optimizer, base * f)
        weight.grad = g.to(dtype).clone()
        optimizer.step()
    return weight.detach().double()


@pytest.mark.parametrize(("name", "keras_kwargs", "kwargs"), CASES, ids=_IDS)
def test_each_name_follows_keras_formula_step_by_step(name, keras_kwargs, kwargs):
    w0 = torch.randn(5, generator=torch.Generator().manual_seed(3))
    grads, factors = _varied()
    base = _DEFAULT_LR.get(name, 1e-3)
    rates = [base * f for f in factors]
    if name == "adamw":
        keras_kwargs = {"weight_decay": 0.004}
    expected = _keras_update(name, w0, grads, rates, **keras_kwargs)
    ours = _run_named(name, w0, grads, factors, torch.float64, **kwargs)
    assert (ours - expected).abs().max() < 1e-10  # nadam keeps its mu product in float32
    ours32 = _run_named(name, w0, grads, factors, torch.float32, **kwargs)
    assert (ours32 - expected).abs().max() < 1e-6


@pytest.mark.parametrize(("name", "keras_kwargs", "kwargs"), CASES, ids=_IDS)
def test_each_name_equals_keras_itself(name, keras_kwargs, kwargs, keras):
    w0 = torch.randn(5, generator=torch.Generator().manual_seed(4))
    grads, factors = _varied(seed=1)
    base = _DEFAULT_LR.get(name, 1e-3)
    variable = keras.Variable(w0.numpy())
    optimizer = keras.optimizers.get(name).__class__(**keras_kwargs)
    for g, f in zip(grads, factors):
        optimizer.learning_rate = base * f
        optimizer.apply([keras.ops.convert_to_tensor(g.numpy())], [variable])
    theirs = torch.as_tensor(keras.ops.convert_to_numpy(variable)).double()
    ours = _run_named(name, w0, grads, factors, torch.float32, **kwargs)
    assert (ours - theirs).abs().max() < 2e-6  # float32 both, rounded in different orders


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("sgd", {"momentum": 0.9}), ("rmsprop", {}), ("adam", {}), ("nadam", {}), ("adagrad", {})],
)
def test_fit_by_name_equals_keras_fit(name, kwargs, keras):
    import torcheras

    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(96, 4, generator=gen), torch.randn(96, 1, generator=gen)
    keras.utils.set_random_seed(0)
    theirs = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, "tanh"), keras.layers.Dense(1)]
    )
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    copy_keras_weights(keras, theirs, [net[0], net[2]])
    optimizer = keras.optimizers.get(name).__class__(learning_rate=0.05, **kwargs)
    theirs.compile(optimizer=optimizer, loss="mse")
    their_history = theirs.fit(x.numpy(), y.numpy(), batch_size=16, epochs=4, shuffle=False,
                               verbose=0).history  # fmt: skip
    model = torcheras.Model(net)
    model.compile(optimizer=name, loss="mse", learning_rate=0.05)
    if kwargs:
        model.optimizer = type(model.optimizer)(net.parameters(), lr=0.05, **kwargs)
    history = model.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0).history
    assert max(abs(a - b) for a, b in zip(history["loss"], their_history["loss"])) < 1e-5
    assert_same_weights(keras, theirs, [net[0], net[2]], atol=1e-5)


def test_sgd_state_resumes_exactly(tmp_path):
    net = torch.nn.Linear(3, 2)
    optimizer = get_optimizer("sgd", net.parameters())
    optimizer = type(optimizer)(net.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 3)
    for lr in (0.1, 0.05):
        set_learning_rate(optimizer, lr)
        net(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    clone = torch.nn.Linear(3, 2)
    clone.load_state_dict(net.state_dict())
    other = type(optimizer)(clone.parameters(), lr=0.1, momentum=0.9)
    other.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for model, opt in ((net, optimizer), (clone, other)):
        set_learning_rate(opt, 0.02)
        model(x).square().sum().backward()
        opt.step()
    torch.testing.assert_close(net.weight, clone.weight, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["rmsprop", "adamax", "lion"])
def test_foreach_optimizers_save_and_restore_their_state(name):
    net = torch.nn.Linear(3, 2)
    optimizer = get_optimizer(name, net.parameters())
    x = torch.randn(8, 3)
    net(x).square().sum().backward()
    optimizer.step()
    clone = torch.nn.Linear(3, 2)
    clone.load_state_dict(net.state_dict())
    other = get_optimizer(name, clone.parameters())
    other.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for model, opt in ((net, optimizer), (clone, other)):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    torch.testing.assert_close(net.weight, clone.weight, rtol=0, atol=0)
    assert other.param_groups[0]["keras_steps"] == 2


def test_a_torch_optimizer_keeps_torchs_meaning():
    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.RMSprop(net.parameters())
    assert get_optimizer(optimizer, net.parameters()) is optimizer
    assert type(get_optimizer("rmsprop", net.parameters())).__name__ == "KerasRMSprop"
