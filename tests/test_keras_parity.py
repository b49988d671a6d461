"""keras-io ports with Keras-style trackers log Keras 3's own numbers (issue 20).

The VAE of keras-io's ``vae`` example and the GAN of Keras's guide
``customizing_what_happens_in_fit`` (its torch version) run in Keras 3 on the torch backend and
in torcheras from the same initial weights, on the same data and the same noise (fed as data:
the two frameworks draw different random numbers), with SGD (the same update in both). Their
History, evaluate() logs and final weights must agree. Runs where Keras is installed (the
``bench`` extra); skipped otherwise.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torcheras
from torcheras import metrics


def _torch_globals() -> tuple:
    return (
        torch.get_default_dtype(),
        torch.get_num_threads(),
        torch.is_grad_enabled(),
        torch.get_default_device(),
        torch.are_deterministic_algorithms_enabled(),
        torch.get_float32_matmul_precision(),
    )


_BEFORE = _torch_globals()
os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
if _torch_globals() != _BEFORE:  # importing Keras must leave the other tests' torch alone
    torch.set_default_dtype(_BEFORE[0])
    torch.set_num_threads(_BEFORE[1])
    torch.set_grad_enabled(_BEFORE[2])
    torch.set_default_device(_BEFORE[3])
    torch.use_deterministic_algorithms(_BEFORE[4])
    torch.set_float32_matmul_precision(_BEFORE[5])
if keras.backend.backend() != "torch":
    pytest.skip("Keras runs on another backend in this process", allow_module_level=True)

from keras import ops  # noqa: E402  (after the backend is chosen)

# Keras's own logs -> numpy conversion of torch tensors (keras/src/utils/python_utils.py), not ours
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)


@pytest.fixture(autouse=True)
def _torch_left_as_found():
    """Keras's fit must not change torch's global state for the tests that run after these."""
    before = _torch_globals()
    yield
    assert _torch_globals() == before


TOL = 1e-6  # logged numbers: Keras's, to 1e-6
WEIGHT_TOL = 1e-5  # final weights


def _values(keras_dense) -> tuple[torch.Tensor, torch.Tensor]:
    """A Dense layer's kernel and bias as torch tensors (the torch backend's own values)."""
    return keras_dense.kernel.value.detach().cpu(), keras_dense.bias.value.detach().cpu()


def _copy_dense(keras_dense, linear: nn.Linear) -> None:
    """Keras's Dense holds kernel (in, out) and computes x @ kernel + bias: weight = kernel.T."""
    kernel, bias = _values(keras_dense)
    with torch.no_grad():
        linear.weight.copy_(kernel.T)
        linear.bias.copy_(bias)


def _dense(units: int, seed: int, activation: str | None = None):
    """Seeded initializers: the same initial weights on every run, whatever ran before."""
    return keras.layers.Dense(
        units,
        activation=activation,
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
        bias_initializer=keras.initializers.RandomUniform(-0.1, 0.1, seed=seed + 100),
    )


def _assert_same_weights(pairs) -> float:
    worst = 0.0
    for keras_dense, linear in pairs:
        kernel, bias = _values(keras_dense)
        torch.testing.assert_close(linear.weight.detach(), kernel.T, rtol=0, atol=WEIGHT_TOL)
        torch.testing.assert_close(linear.bias.detach(), bias, rtol=0, atol=WEIGHT_TOL)
        worst = max(worst, float((linear.weight.detach() - kernel.T).abs().max()))
        worst = max(worst, float((linear.bias.detach() - bias).abs().max()))
    return worst


def _floats(values):
    """Keras's History keeps the torch backend's tensors: read them as floats."""
    if isinstance(values, (list, tuple)):
        return [float(v) for v in values]
    return float(values)


def _assert_same_logs(ours: dict, theirs: dict) -> float:
    # torcheras adds the learning rate to every epoch's logs (docs/porting.md); Keras does not
    assert set(ours) - {"learning_rate"} == set(theirs)
    worst = 0.0
    for key, values in theirs.items():
        values = _floats(values)
        np.testing.assert_allclose(ours[key], values, rtol=TOL, atol=TOL, err_msg=key)
        worst = max(worst, float(np.max(np.abs(np.subtract(ours[key], values)))))
    return worst


# ---- the VAE of keras-io's `vae` example ---------------------------------------------------

FEATURES, HIDDEN, LATENT = 12, 8, 2


class KerasVAE(keras.Model):
    """keras-io's VAE, with its torch train_step; the sampling noise comes with the data."""

    def __init__(self):
        super().__init__()
        inputs = keras.Input((FEATURES,))
        hidden = _dense(HIDDEN, 1, "relu")(inputs)
        z_mean, z_log_var = _dense(LATENT, 2)(hidden), _dense(LATENT, 3)(hidden)
        self.encoder = keras.Model(inputs, [z_mean, z_log_var], name="encoder")
        latent = keras.Input((LATENT,))
        hidden = _dense(HIDDEN, 4, "relu")(latent)
        self.decoder = keras.Model(latent, _dense(FEATURES, 5, "sigmoid")(hidden), name="decoder")
        self.total_loss_tracker = keras.metrics.Mean(name="total_loss")
        self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")
        self.built = True  # no call(): nothing for fit to build

    @property
    def metrics(self):
        return [self.total_loss_tracker, self.reconstruction_loss_tracker, self.kl_loss_tracker]

    def dense_layers(self):
        return [layer for m in (self.encoder, self.decoder) for layer in m.layers if layer.weights]

    def vae_losses(self, data):
        x, eps = data
        z_mean, z_log_var = self.encoder(x)
        z = z_mean + ops.exp(0.5 * z_log_var) * eps
        reconstruction = self.decoder(z)
        reconstruction_loss = ops.mean(
            ops.sum(
                keras.losses.binary_crossentropy(x[..., None], reconstruction[..., None]), axis=1
            )
        )
        kl_loss = -0.5 * (1 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var))
        kl_loss = ops.mean(ops.sum(kl_loss, axis=1))
        return reconstruction_loss + kl_loss, reconstruction_loss, kl_loss

    def _track(self, total_loss, reconstruction_loss, kl_loss):
        self.total_loss_tracker.update_state(total_loss)
        self.reconstruction_loss_tracker.update_state(reconstruction_loss)
        self.kl_loss_tracker.update_state(kl_loss)
        return {
            "loss": self.total_loss_tracker.result(),
            "reconstruction_loss": self.reconstruction_loss_tracker.result(),
            "kl_loss": self.kl_loss_tracker.result(),
        }

    def train_step(self, data):
        self.zero_grad()
        total_loss, reconstruction_loss, kl_loss = self.vae_losses(data)
        total_loss.backward()
        grads = [v.value.grad for v in self.trainable_weights]
        with torch.no_grad():
            self.optimizer.apply(grads, self.trainable_weights)
        return self._track(total_loss, reconstruction_loss, kl_loss)

    def test_step(self, data):
        return self._track(*self.vae_losses(data))


class VAE(torcheras.Model):
    """The same VAE in torcheras: Keras-style trackers, the keras-io key/name mismatch kept
    (the total's tracker is named "total_loss", its result logged under "loss")."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(FEATURES, HIDDEN)
        self.z_mean = nn.Linear(HIDDEN, LATENT)
        self.z_log_var = nn.Linear(HIDDEN, LATENT)
        self.decoder_hidden = nn.Linear(LATENT, HIDDEN)
        self.decoder_out = nn.Linear(HIDDEN, FEATURES)
        self.total_loss_tracker = metrics.Mean(name="total_loss")
        self.reconstruction_loss_tracker = metrics.Mean(name="reconstruction_loss")
        self.kl_loss_tracker = metrics.Mean(name="kl_loss")

    def linears(self):
        return [self.hidden, self.z_mean, self.z_log_var, self.decoder_hidden, self.decoder_out]

    def vae_losses(self, batch):
        x, eps = batch
        hidden = torch.relu(self.hidden(x))
        z_mean, z_log_var = self.z_mean(hidden), self.z_log_var(hidden)
        z = z_mean + torch.exp(0.5 * z_log_var) * eps
        reconstruction = torch.sigmoid(self.decoder_out(torch.relu(self.decoder_hidden(z))))
        clipped = reconstruction.clamp(1e-7, 1 - 1e-7)  # Keras's epsilon
        reconstruction_loss = F.binary_cross_entropy(clipped, x, reduction="none").sum(1).mean()
        kl_loss = -0.5 * (1 + z_log_var - z_mean.square() - z_log_var.exp())
        kl_loss = kl_loss.sum(1).mean()
        return reconstruction_loss + kl_loss, reconstruction_loss, kl_loss

    def _track(self, total_loss, reconstruction_loss, kl_loss):
        self.total_loss_tracker.update_state(total_loss)
        self.reconstruction_loss_tracker.update_state(reconstruction_loss)
        self.kl_loss_tracker.update_state(kl_loss)
        return {
            "loss": self.total_loss_tracker.result(),
            "reconstruction_loss": self.reconstruction_loss_tracker.result(),
            "kl_loss": self.kl_loss_tracker.result(),
        }

    def train_step(self, batch):
        self.optimizer.zero_grad()
        total_loss, reconstruction_loss, kl_loss = self.vae_losses(batch)
        self.backward(total_loss)
        self.optimizer.step()
        return self._track(total_loss, reconstruction_loss, kl_loss)

    def test_step(self, batch):
        return self._track(*self.vae_losses(batch))


def _vae_data():
    rng = np.random.default_rng(20)
    x = rng.uniform(0, 1, size=(64, FEATURES)).astype(np.float32)
    eps = rng.normal(size=(64, LATENT)).astype(np.float32)  # the sampling noise, per sample
    return x, eps


def run_vae():
    """Both VAEs trained and evaluated: (theirs, ours), each (history, evaluate logs)."""
    x, eps = _vae_data()
    fit = dict(batch_size=16, epochs=3, shuffle=False, verbose=0)
    evaluate = dict(batch_size=16, verbose=0, return_dict=True)
    with keras.device("cpu"):  # both on the CPU, on a GPU machine too
        keras_vae = KerasVAE()
        keras_vae.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05))
        vae = VAE()
        for keras_dense, linear in zip(keras_vae.dense_layers(), vae.linears()):
            _copy_dense(keras_dense, linear)
        theirs = keras_vae.fit(x, eps, **fit).history
        theirs_eval = keras_vae.evaluate(x, eps, **evaluate)
    vae.compile(optimizer=torch.optim.SGD(vae.parameters(), lr=0.05), device="cpu")
    ours = vae.fit(x, eps, **fit).history
    ours_eval = vae.evaluate(x, eps, **evaluate)
    pairs = list(zip(keras_vae.dense_layers(), vae.linears()))
    return (theirs, theirs_eval), (ours, ours_eval), pairs


def test_vae_with_keras_style_trackers_logs_keras_numbers():
    (theirs, theirs_eval), (ours, ours_eval), pairs = run_vae()
    assert sorted(theirs) == ["kl_loss", "loss", "reconstruction_loss"]
    assert all(len(values) == 3 for values in theirs.values())
    _assert_same_logs(ours, theirs)
    # "loss" is the total tracker's result: the two parts' results add up to it, every epoch
    np.testing.assert_allclose(
        ours["loss"], np.add(ours["reconstruction_loss"], ours["kl_loss"]), rtol=TOL, atol=TOL
    )
    _assert_same_logs(ours_eval, theirs_eval)
    _assert_same_weights(pairs)


# ---- the GAN of the guide `customizing_what_happens_in_fit` (torch) --------------------------

IMAGE, G_HIDDEN, D_HIDDEN, G_LATENT = 6, 8, 8, 3


def _split_given(given):
    """The noise each step would draw, fed as data: two latent batches and the label noise
    (one value per generated image, one per real image)."""
    first, second = given[:, :G_LATENT], given[:, G_LATENT : 2 * G_LATENT]
    label_noise = given[:, 2 * G_LATENT :]
    return first, second, torch.cat([label_noise[:, :1], label_noise[:, 1:]], dim=0)


class KerasGAN(keras.Model):
    """The guide's GAN (torch version), its `keras.random` draws replaced by the fed noise."""

    def __init__(self):
        super().__init__()
        self.discriminator = keras.Sequential(
            [
                keras.Input((IMAGE,)),
                _dense(D_HIDDEN, 11),
                keras.layers.LeakyReLU(negative_slope=0.2),
                _dense(1, 12),
            ],
            name="discriminator",
        )
        self.generator = keras.Sequential(
            [
                keras.Input((G_LATENT,)),
                _dense(G_HIDDEN, 13),
                keras.layers.LeakyReLU(negative_slope=0.2),
                _dense(IMAGE, 14, "sigmoid"),
            ],
            name="generator",
        )
        self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
        self.g_loss_tracker = keras.metrics.Mean(name="g_loss")
        self.built = True  # as in the guide

    @property
    def metrics(self):
        return [self.d_loss_tracker, self.g_loss_tracker]

    def dense_layers(self):
        return [
            layer
            for m in (self.discriminator, self.generator)
            for layer in m.layers
            if layer.weights
        ]

    def compile(self, d_optimizer, g_optimizer, loss_fn):
        super().compile()
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer
        self.loss_fn = loss_fn

    def train_step(self, data):
        real_images, given = data
        random_latent_vectors, second_latent_vectors, label_noise = _split_given(given)
        batch_size, device = real_images.shape[0], real_images.device
        generated_images = self.generator(random_latent_vectors)
        combined_images = torch.concat([generated_images, real_images], axis=0)
        labels = torch.concat(
            [
                torch.ones((batch_size, 1), device=device),
                torch.zeros((batch_size, 1), device=device),
            ],
            axis=0,
        )
        labels += 0.05 * label_noise  # the guide's trick, the noise fed

        self.zero_grad()
        predictions = self.discriminator(combined_images)
        d_loss = self.loss_fn(labels, predictions)
        d_loss.backward()
        grads = [v.value.grad for v in self.discriminator.trainable_weights]
        with torch.no_grad():
            self.d_optimizer.apply(grads, self.discriminator.trainable_weights)

        misleading_labels = torch.zeros((batch_size, 1), device=device)
        self.zero_grad()
        predictions = self.discriminator(self.generator(second_latent_vectors))
        g_loss = self.loss_fn(misleading_labels, predictions)
        g_loss.backward()
        grads = [v.value.grad for v in self.generator.trainable_weights]
        with torch.no_grad():
            self.g_optimizer.apply(grads, self.generator.trainable_weights)

        self.d_loss_tracker.update_state(d_loss)
        self.g_loss_tracker.update_state(g_loss)
        return {"d_loss": self.d_loss_tracker.result(), "g_loss": self.g_loss_tracker.result()}


class GAN(torcheras.Model):
    """The same GAN in torcheras: its own two optimizers, Keras-style trackers."""

    def __init__(self):
        super().__init__()
        self.discriminator = nn.Sequential(
            nn.Linear(IMAGE, D_HIDDEN), nn.LeakyReLU(0.2), nn.Linear(D_HIDDEN, 1)
        )
        self.generator = nn.Sequential(
            nn.Linear(G_LATENT, G_HIDDEN),
            nn.LeakyReLU(0.2),
            nn.Linear(G_HIDDEN, IMAGE),
            nn.Sigmoid(),
        )
        self.d_optimizer = torch.optim.SGD(self.discriminator.parameters(), lr=0.05)
        self.g_optimizer = torch.optim.SGD(self.generator.parameters(), lr=0.05)
        self.d_loss_tracker = metrics.Mean(name="d_loss")
        self.g_loss_tracker = metrics.Mean(name="g_loss")

    def linears(self):
        return [self.discriminator[0], self.discriminator[2], self.generator[0], self.generator[2]]

    def train_step(self, batch):
        real_images, given = batch
        random_latent_vectors, second_latent_vectors, label_noise = _split_given(given)
        n = real_images.shape[0]
        bce = F.binary_cross_entropy_with_logits
        combined_images = torch.cat([self.generator(random_latent_vectors), real_images])
        labels = torch.cat([torch.ones(n, 1), torch.zeros(n, 1)]) + 0.05 * label_noise

        self.zero_grad()
        d_loss = bce(self.discriminator(combined_images), labels)
        self.backward(d_loss)
        self.d_optimizer.step()

        self.zero_grad()
        g_loss = bce(self.discriminator(self.generator(second_latent_vectors)), torch.zeros(n, 1))
        self.backward(g_loss)
        self.g_optimizer.step()

        self.d_loss_tracker.update_state(d_loss)
        self.g_loss_tracker.update_state(g_loss)
        return {"d_loss": self.d_loss_tracker.result(), "g_loss": self.g_loss_tracker.result()}


def run_gan():
    rng = np.random.default_rng(21)
    images = rng.uniform(0, 1, size=(64, IMAGE)).astype(np.float32)
    latents = rng.normal(size=(64, 2 * G_LATENT))
    given = np.concatenate([latents, rng.uniform(size=(64, 2))], axis=1).astype(np.float32)
    fit = dict(batch_size=16, epochs=3, shuffle=False, verbose=0)
    with keras.device("cpu"):
        keras_gan = KerasGAN()
        keras_gan.compile(
            d_optimizer=keras.optimizers.SGD(learning_rate=0.05),
            g_optimizer=keras.optimizers.SGD(learning_rate=0.05),
            loss_fn=keras.losses.BinaryCrossentropy(from_logits=True),
        )
        gan = GAN()
        for keras_dense, linear in zip(keras_gan.dense_layers(), gan.linears()):
            _copy_dense(keras_dense, linear)
        theirs = keras_gan.fit(images, given, **fit).history
    gan.compile(optimizer=None, device="cpu")  # train_step owns its optimizers
    ours = gan.fit(images, given, **fit).history
    return theirs, ours, list(zip(keras_gan.dense_layers(), gan.linears()))


def test_gan_of_the_customizing_fit_guide_logs_keras_numbers():
    theirs, ours, pairs = run_gan()
    assert sorted(theirs) == ["d_loss", "g_loss"]
    assert all(len(values) == 3 for values in theirs.values())
    _assert_same_logs(ours, theirs)
    _assert_same_weights(pairs)
