"""Model: compile / fit / evaluate / predict, as a user sees them."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch
import torchmetrics
from conftest import make_model
from torch import nn

import torcheras
from torcheras.callbacks import Callback, History


def test_fit_learns_and_returns_history(blobs):
    x, y = blobs
    model = make_model()
    history = model.fit(x, y, epochs=5, batch_size=32, validation_split=0.25, verbose=0)
    assert isinstance(history, History) and model.history is history
    assert history.epoch == [0, 1, 2, 3, 4]
    assert sorted(history.history) == [
        "accuracy",
        "learning_rate",
        "loss",
        "val_accuracy",
        "val_loss",
    ]
    assert all(type(v) is float for vals in history.history.values() for v in vals)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert history.history["val_accuracy"][-1] > 0.9
    assert history.params == {"verbose": 0, "epochs": 5, "steps": 6}


def test_evaluate_returns_float_list_or_dict(blobs):
    x, y = blobs
    model = make_model()
    model.fit(x, y, epochs=2, verbose=0)
    as_list = model.evaluate(x, y, verbose=0)
    as_dict = model.evaluate(x, y, verbose=0, return_dict=True)
    assert isinstance(as_list, list) and len(as_list) == 2
    assert as_dict == {"accuracy": as_list[1], "loss": as_list[0]}
    loss_only = make_model(metrics=[])
    assert isinstance(loss_only.evaluate(x, y, verbose=0), float)


def test_evaluate_matches_manual_computation(blobs):
    x, y = blobs
    model = make_model()
    logits = model(torch.from_numpy(x))
    expected_loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)).item()
    expected_acc = (logits.argmax(1) == torch.from_numpy(y)).float().mean().item()
    result = model.evaluate(x, y, batch_size=50, verbose=0, return_dict=True)
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert result["accuracy"] == pytest.approx(expected_acc)


def test_predict_numpy_in_numpy_out_tensor_in_tensor_out(blobs):
    x, _ = blobs
    model = make_model()
    out = model.predict(x, batch_size=7, verbose=0)
    assert isinstance(out, np.ndarray) and out.shape == (240, 3)
    out_t = model.predict(torch.from_numpy(x), verbose=0)
    assert isinstance(out_t, torch.Tensor) and out_t.device.type == "cpu"
    # batches of 7 and of 32: float32 matmuls of other shapes differ in the last bits
    np.testing.assert_allclose(out, out_t.numpy(), rtol=1e-5, atol=1e-6)
    assert model.training  # predict restores the mode


def test_subclassing_api(blobs):
    class Net(torcheras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = nn.Linear(8, 16)
            self.out = nn.Linear(16, 3)

        def forward(self, x):
            return self.out(torch.relu(self.hidden(x)))

    x, y = blobs
    model = Net()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["acc"])
    history = model.fit(x, y, epochs=8, verbose=0)
    assert history.history["acc"][-1] > 0.9


def test_model_without_forward_says_how_to_fix():
    with pytest.raises(NotImplementedError, match="subclass torcheras.Model"):
        torcheras.Model()(torch.zeros(1))
    with pytest.raises(TypeError, match="takes a torch.nn.Module"):
        torcheras.Model("not a module")  # type: ignore[arg-type]


def test_multiple_inputs_tuple_and_dict():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

        def forward(self, left, right):
            return self.a(left) + self.b(right)

    left, right = np.random.rand(40, 3).astype("float32"), np.random.rand(40, 4).astype("float32")
    target = np.random.rand(40, 2).astype("float32")
    model = torcheras.Model(TwoInputs())
    model.compile("sgd", "mse")
    model.fit((left, right), target, epochs=1, batch_size=8, verbose=0)
    assert model.predict((left, right), verbose=0).shape == (40, 2)
    model.fit({"left": left, "right": right}, target, epochs=1, verbose=0)
    assert model.predict({"left": left, "right": right}, verbose=0).shape == (40, 2)


def test_dataset_dataloader_and_iterables(blobs):
    x, y = blobs
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    model = make_model()
    h1 = model.fit(dataset, epochs=2, batch_size=40, verbose=0)
    assert h1.params["steps"] == 6
    loader = torch.utils.data.DataLoader(dataset, batch_size=60)
    h2 = model.fit(loader, epochs=1, verbose=0, validation_data=loader)
    assert "val_loss" in h2.history and h2.params["steps"] == 4
    batches = [
        (torch.from_numpy(x[i : i + 48]), torch.from_numpy(y[i : i + 48]))
        for i in range(0, 240, 48)
    ]
    assert model.fit(batches, epochs=2, verbose=0).params["steps"] == 5
    assert isinstance(model.evaluate(loader, verbose=0), list)
    assert model.predict(loader, verbose=0).shape == (240, 3)


def test_generator_with_steps_per_epoch_and_validation_steps(blobs):
    x, y = blobs

    def forever():
        while True:
            for i in range(0, 240, 30):
                yield torch.from_numpy(x[i : i + 30]), torch.from_numpy(y[i : i + 30])

    seen = []

    class Count(Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(("train", batch))

        def on_test_batch_end(self, batch, logs=None):
            seen.append(("test", batch))

    model = make_model()
    model.fit(
        forever(),
        epochs=2,
        steps_per_epoch=3,
        validation_data=forever(),
        validation_steps=4,
        verbose=0,
        callbacks=[Count()],
    )
    assert [s for s in seen if s[0] == "train"] == [("train", b) for b in (0, 1, 2)] * 2
    assert len([s for s in seen if s[0] == "test"]) == 8


def test_generator_that_runs_out_warns_and_stops(blobs):
    x, y = blobs
    gen = (
        (torch.from_numpy(x[i : i + 60]), torch.from_numpy(y[i : i + 60]))
        for i in range(0, 240, 60)
    )
    model = make_model()
    with pytest.warns(UserWarning, match="ran out of data"):
        history = model.fit(gen, epochs=3, steps_per_epoch=6, verbose=0)
    assert history.epoch == [0]


def test_validation_split_takes_the_last_fraction_before_shuffling(blobs):
    x, y = blobs
    model = make_model(optimizer="sgd")
    history = model.fit(x, y, epochs=1, validation_split=0.25, verbose=0)
    tail = model.evaluate(x[180:], y[180:], verbose=0, return_dict=True)
    assert history.history["val_loss"][0] == pytest.approx(tail["loss"], rel=1e-6)
    assert history.params["steps"] == 6  # 180 training samples / 32


def test_validation_freq_and_initial_epoch(blobs):
    x, y = blobs
    model = make_model()
    history = model.fit(x, y, epochs=3, validation_data=(x, y), validation_freq=2, verbose=0)
    assert len(history.history["loss"]) == 3 and len(history.history["val_loss"]) == 1
    history = model.fit(x, y, epochs=4, initial_epoch=2, verbose=0)
    assert history.epoch == [2, 3]
    history = model.fit(x, y, epochs=3, validation_data=(x, y), validation_freq=[1, 3], verbose=0)
    assert len(history.history["val_loss"]) == 2


def test_epochs_zero_calls_only_train_begin_and_end(blobs):
    x, y = blobs
    history = make_model().fit(x, y, epochs=0, verbose=0)
    assert history.history == {} and history.epoch == []


def test_sample_weight_weights_the_loss_as_keras():
    model = torcheras.Model(nn.Linear(1, 1, bias=False))
    model.compile("sgd", "mse")
    with torch.no_grad():
        model.module.weight.fill_(0.0)
    x = np.array([[1.0], [1.0]], dtype="float32")
    y = np.array([[1.0], [3.0]], dtype="float32")  # squared errors 1 and 9
    assert model.evaluate(x, y, verbose=0) == pytest.approx(5.0)
    weighted = model.evaluate(x, y, sample_weight=np.array([1.0, 0.0]), verbose=0)
    assert weighted == pytest.approx(0.5)  # sum(w * loss) / batch size, as Keras


def test_class_weight_changes_training(blobs):
    x, y = blobs
    torch.manual_seed(1)
    plain = make_model(optimizer="sgd").fit(x, y, epochs=1, shuffle=False, verbose=0)
    torch.manual_seed(1)
    weighted = make_model(optimizer="sgd").fit(
        x, y, epochs=1, shuffle=False, verbose=0, class_weight={0: 5.0, 1: 1.0, 2: 1.0}
    )
    assert weighted.history["loss"][0] != pytest.approx(plain.history["loss"][0])


def test_optimizer_names_instances_and_factories():
    net = nn.Linear(2, 1)
    model = torcheras.Model(net)
    model.compile("adam", "mse")
    assert isinstance(model.optimizer, torch.optim.Adam)
    model.compile(torch.optim.SGD(model.parameters(), lr=0.3), "mse")
    assert model.learning_rate == pytest.approx(0.3)
    model.compile(functools.partial(torch.optim.SGD, lr=0.2, momentum=0.9), "mse")
    assert model.optimizer.param_groups[0]["momentum"] == 0.9
    model.compile("rmsprop", "mse", learning_rate=0.05)
    assert model.learning_rate == pytest.approx(0.05)


def test_learning_rate_property_keeps_the_ratio_between_groups():
    model = torcheras.Model(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)))
    opt = torch.optim.SGD(
        [
            {"params": model.module[0].parameters(), "lr": 0.1},
            {"params": model.module[1].parameters(), "lr": 0.2},
        ]
    )
    model.compile(opt, "mse")
    assert model.learning_rate == pytest.approx(0.1)
    model.learning_rate = 0.01
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.01), pytest.approx(0.02)]


def test_a_tensor_learning_rate_stays_a_tensor():
    model = torcheras.Model(nn.Linear(2, 1))
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01))
    model.compile(opt, "mse", device="cpu")
    rate = opt.param_groups[0]["lr"]
    model.learning_rate = 0.004
    assert opt.param_groups[0]["lr"] is rate and float(rate) == pytest.approx(0.004)
    history = model.fit(np.ones((4, 2), "float32"), np.ones((4, 1), "float32"), verbose=0)
    assert history.history["learning_rate"] == [pytest.approx(0.004)]
    assert type(history.history["learning_rate"][0]) is float


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer": "adamm"}, r"Unknown optimizer 'adamm'\. Did you mean 'adam'\?.*sgd"),
        (
            {"loss": "sparse_categorical_crossentrop"},
            r"Unknown loss.*Did you mean 'sparse_categorical_crossentropy'\?.* Known losses: ",
        ),
        ({"metrics": ["acuracy"]}, r"Unknown metric 'acuracy'.*Known metrics: .*accuracy"),
        ({"optimizer": "adamm"}, r"Known optimizers: .*adam"),
        ({"metrics": "accuracy"}, r"`metrics` must be a list"),
    ],
)
def test_unknown_names_list_the_known_ones(kwargs, message):
    model = torcheras.Model(nn.Linear(2, 1))
    args = {"optimizer": "adam", "loss": "mse", **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        model.compile(**args)


def test_losses_keras_torch_module_and_callable(blobs):
    x, y = blobs
    for loss in (
        "sparse_categorical_crossentropy",
        "cross_entropy",
        nn.CrossEntropyLoss(),
        torch.nn.functional.cross_entropy,
    ):
        model = make_model(loss=loss)
        history = model.fit(x, y, epochs=3, verbose=0)
        assert history.history["loss"][-1] < history.history["loss"][0]
    onehot = np.eye(3, dtype="float32")[y]
    model = make_model(loss="categorical_crossentropy")
    assert model.fit(x, onehot, epochs=3, verbose=0).history["accuracy"][-1] > 0.8


def test_binary_and_regression_losses():
    x = np.random.rand(64, 4).astype("float32")
    y_bin = (x.sum(1) > 2).astype("float32")
    model = make_model(4, 1, loss="binary_crossentropy", metrics=["accuracy"])
    history = model.fit(x, y_bin, epochs=30, verbose=0)
    assert history.history["accuracy"][-1] > 0.8
    y_reg = x.sum(1, keepdims=True)
    for loss in ("mse", "mae", "huber", "mean_squared_logarithmic_error", "log_cosh"):
        model = make_model(4, 1, loss=loss, metrics=["mae", "rmse"])
        with torch.no_grad():  # start with positive outputs: MSLE has no gradient below 0
            model.module[2].bias.fill_(1.0)
        history = model.fit(x, y_reg, epochs=5, verbose=0)
        assert history.history["loss"][-1] < history.history["loss"][0], loss


def test_metrics_torchmetrics_and_callables_and_directions(blobs):
    x, y = blobs

    def error_rate(y_pred, y_true):
        return (y_pred.argmax(-1) != y_true).float()

    tm = torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro")
    model = make_model(metrics=["accuracy", tm, error_rate])
    history = model.fit(x, y, epochs=3, verbose=0)
    assert history.history["multiclass_accuracy"] == pytest.approx(history.history["accuracy"])
    assert history.history["error_rate"][-1] == pytest.approx(1 - history.history["accuracy"][-1])
    assert model.metric_direction("val_accuracy") == "max"
    assert model.metric_direction("multiclass_accuracy") == "max"
    assert model.metric_direction("val_loss") == "min"
    assert model.metric_direction("error_rate") is None


def test_get_set_weights_and_save_load_roundtrip(tmp_path, blobs):
    x, y = blobs
    model = make_model()
    model.fit(x, y, epochs=1, verbose=0)
    weights = model.get_weights()
    before = model.predict(x, verbose=0)
    for name in ("w.pt", "w.safetensors", "full.ckpt"):
        path = tmp_path / name
        (model.save if name == "full.ckpt" else model.save_weights)(path)
        other = make_model()
        assert not np.allclose(other.predict(x, verbose=0), before)
        other.load_weights(path)
        np.testing.assert_allclose(other.predict(x, verbose=0), before, rtol=1e-6)
        assert torch.load(path, weights_only=True) if name != "w.safetensors" else True
    model.fit(x, y, epochs=1, verbose=0)
    model.set_weights(weights)
    np.testing.assert_allclose(model.predict(x, verbose=0), before, rtol=1e-6)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp files left


def test_load_weights_accepts_a_plain_torch_state_dict(tmp_path, blobs):
    x, _ = blobs
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    model = make_model()
    model.load_weights(tmp_path / "plain.pt")
    np.testing.assert_allclose(
        model.predict(x, verbose=0),
        net(torch.from_numpy(x)).detach().numpy(),
        rtol=1e-5,  # batches of 32 against one batch of 240: float32 reality
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="do not fit this model"):
        make_model(n_in=5).load_weights(tmp_path / "plain.pt")


def test_summary_lists_layers_and_parameters(capsys):
    make_model().summary()
    out = capsys.readouterr().out
    assert "0 (Linear)" in out
    assert "Total params: 195" in out  # 8*16+16 + 16*3+3


def test_gan_like_train_step_with_two_optimizers():
    class TinyGAN(torcheras.Model):
        def __init__(self):
            super().__init__()
            self.generator = nn.Linear(2, 2)
            self.discriminator = nn.Sequential(nn.Linear(2, 1))
            self.g_opt = torch.optim.Adam(self.generator.parameters(), 1e-2)
            self.d_opt = torch.optim.Adam(self.discriminator.parameters(), 1e-2)

        def train_step(self, batch):
            (real,) = batch
            bce = nn.functional.binary_cross_entropy_with_logits
            fake = self.generator(torch.randn_like(real))
            d_real, d_fake = self.discriminator(real), self.discriminator(fake.detach())
            d_loss = bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))
            self.d_opt.zero_grad()
            self.backward(d_loss)
            self.d_opt.step()
            g_out = self.discriminator(fake)
            g_loss = bce(g_out, torch.ones_like(g_out))
            self.g_opt.zero_grad()
            g_loss.backward()
            self.g_opt.step()
            return {"d_loss": d_loss, "g_loss": g_loss}

    gan = TinyGAN()
    gan.compile(optimizer=None)
    g_before = gan.generator.weight.detach().clone()
    d_before = gan.discriminator[0].weight.detach().clone()
    real = torch.randn(64, 2) * 0.5 + 3
    grads_seen = []

    class GradProbe(Callback):
        def on_after_backward(self, batch):
            grads_seen.append(gan.discriminator[0].weight.grad is not None)

    history = gan.fit(
        torch.utils.data.TensorDataset(real),
        epochs=2,
        batch_size=16,
        verbose=0,
        callbacks=[GradProbe()],
    )
    assert sorted(history.history) == ["d_loss", "g_loss"]
    assert len(history.history["d_loss"]) == 2
    assert not torch.equal(gan.generator.weight, g_before)
    assert not torch.equal(gan.discriminator[0].weight, d_before)
    assert grads_seen == [True] * 8


def test_device_auto_resolves_to_what_is_available():
    model = torcheras.Model(nn.Linear(2, 1))
    model.compile("sgd", "mse")
    expected = (
        "cuda"
        if torch.cuda.is_available()
        else ("mps" if torch.backends.mps.is_available() else "cpu")
    )
    assert model.device.type == expected
    assert next(model.parameters()).device.type == expected


def test_jit_compile_compiles_the_whole_train_step(monkeypatch):
    real_compile, calls = torch.compile, []

    def spy_compile(fn, *args, **kwargs):
        compiled = real_compile(fn, *args, **kwargs)
        name = getattr(fn, "__name__", type(fn).__name__)

        def counted(*a, **k):
            calls.append(name)
            return compiled(*a, **k)

        return counted

    monkeypatch.setattr(torch, "compile", spy_compile)
    torch.manual_seed(0)
    model = torcheras.Model(nn.Linear(3, 1))
    model.compile(
        torch.optim.Adam(model.parameters(), lr=1e-3), "mse", jit_compile=True, device="cpu"
    )
    torch.manual_seed(0)
    eager = torcheras.Model(nn.Linear(3, 1))
    eager.compile(torch.optim.Adam(eager.parameters(), lr=1e-3), "mse", device="cpu")
    x = np.random.rand(32, 3).astype("float32")
    y = x.sum(1, keepdims=True)
    history = model.fit(x, y, epochs=3, verbose=0, shuffle=False)
    expected = eager.fit(x, y, epochs=3, verbose=0, shuffle=False)
    # every batch: forward + loss (and their backward) in one graph, the optimizer step in another
    assert calls == ["_forward_loss", "step"] * 3
    np.testing.assert_allclose(history.history["loss"], expected.history["loss"], rtol=1e-5)
    for a, b in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_validation_split_on_a_dataset_takes_its_last_samples(blobs):
    x, y = blobs
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    model = make_model(optimizer="sgd")
    history = model.fit(dataset, epochs=1, batch_size=30, validation_split=0.25, verbose=0)
    assert history.params["steps"] == 6  # 180 training samples / 30
    tail = model.evaluate(x[180:], y[180:], verbose=0, return_dict=True)
    assert history.history["val_loss"][0] == pytest.approx(tail["loss"], rel=1e-6)


def test_summary_shows_keras_output_shapes_once_known(blobs, capsys):
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    model = torcheras.Model(net)
    model.compile("adam", "sparse_categorical_crossentropy", device="cpu")
    model.summary()
    out = capsys.readouterr().out
    assert "Output Shape" not in out and "unknown until fit runs a batch" in out
    model.summary(input_shape=(1, 8, 8))
    lines = capsys.readouterr().out.splitlines()
    table = {line.split()[0]: line for line in lines if line.split() and line.split()[0] in "0123"}
    assert "(None, 4, 6, 6)" in table["0"] and "40" in table["0"]  # 1*4*3*3 + 4
    assert "(None, 144)" in table["2"] and "(None, 3)" in table["3"]
    x = np.random.rand(10, 1, 8, 8).astype("float32")
    model.fit(x, np.arange(10) % 3, epochs=1, verbose=0)
    model.summary()
    assert "(None, 144)" in capsys.readouterr().out  # known from the batches fit saw
    assert model.training is True


def test_custom_steps_that_return_the_loss_alone_log_it_as_the_loss():
    """A custom ``train_step`` / ``test_step`` may return the loss tensor itself: fit and
    evaluate log it as ``loss``, the same numbers as ``{"loss": loss}``."""

    class ReturnsTheLoss(torcheras.Model):
        def train_step(self, batch):
            x, y = batch
            self.optimizer.zero_grad()
            loss = nn.functional.cross_entropy(self(x), y)
            loss.backward()
            self.optimizer.step()
            return loss

        def test_step(self, batch):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

    class ReturnsLogs(ReturnsTheLoss):
        def train_step(self, batch):
            return {"loss": super().train_step(batch)}

        def test_step(self, batch):
            return {"loss": super().test_step(batch)}

    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 4)).astype("float32")
    y = rng.integers(0, 3, 96)
    results = []
    for cls in (ReturnsTheLoss, ReturnsLogs):
        torch.manual_seed(0)
        model = cls(nn.Linear(4, 3))
        model.compile("adam", "sparse_categorical_crossentropy")
        history = model.fit(x, y, batch_size=32, epochs=2, verbose=0, shuffle=False,
                            validation_data=(x, y))  # fmt: skip
        results.append((history.history, model.evaluate(x, y, verbose=0, return_dict=True)))
    assert results[0] == results[1]
    (history, evaluated), _ = results
    assert set(history) == {"loss", "val_loss", "learning_rate"}
    assert evaluated["loss"] == pytest.approx(history["val_loss"][-1], rel=1e-6)
