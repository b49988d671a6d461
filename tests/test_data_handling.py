"""Data handling as Keras does it: steps_per_epoch, loaders across epochs, validation_split
before class_weight, inputs-only fit, numpy ints and pandas, and errors that name the argument."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import make_model
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torcheras
from torcheras.callbacks import Callback, LambdaCallback


def _count_batches(model, *args, **kwargs):
    counts = []
    probe = LambdaCallback(
        on_epoch_begin=lambda e, logs: counts.append(0),
        on_train_batch_end=lambda b, logs: counts.__setitem__(-1, counts[-1] + 1),
    )
    model.fit(*args, callbacks=[probe], verbose=0, **kwargs)
    return counts


def test_steps_per_epoch_caps_array_inputs(blobs):
    x, y = blobs  # 240 samples, 8 batches of 32
    assert _count_batches(make_model(), x, y, epochs=2, steps_per_epoch=2) == [2, 2]


def test_steps_per_epoch_beyond_the_arrays_warns_and_stops(blobs):
    x, y = blobs
    with pytest.warns(UserWarning, match="ran out of data"):
        counts = _count_batches(make_model(), x, y, epochs=3, steps_per_epoch=10)
    assert counts == [8]


def _first_of_each_batch(model, loader, **kwargs):
    firsts = []
    probe = LambdaCallback(
        on_train_batch_end=lambda b, logs: firsts.append(int(model.loop.current_batch[0][0, 0]))
    )
    model.fit(loader, callbacks=[probe], verbose=0, **kwargs)
    return firsts


def test_a_loader_with_steps_per_epoch_continues_where_the_last_epoch_stopped():
    x = torch.arange(40, dtype=torch.float32).reshape(40, 1).repeat(1, 8)
    y = torch.zeros(40, dtype=torch.long)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # 10 batches, not shuffled
    firsts = _first_of_each_batch(make_model(), loader, epochs=4, steps_per_epoch=3)
    # epochs 1-3 walk through batches 0..8; epoch 4 finds 1 batch left, then runs out
    assert firsts[:9] == [0, 4, 8, 12, 16, 20, 24, 28, 32]
    assert firsts[9] == 36


def test_a_loader_exhausted_at_an_epoch_boundary_starts_a_new_pass():
    x = torch.arange(24, dtype=torch.float32).reshape(24, 1).repeat(1, 8)
    loader = DataLoader(TensorDataset(x, torch.zeros(24, dtype=torch.long)), batch_size=4)
    firsts = _first_of_each_batch(make_model(), loader, epochs=4, steps_per_epoch=3)
    assert firsts == [0, 4, 8, 12, 16, 20, 0, 4, 8, 12, 16, 20]


def test_a_generator_with_steps_per_epoch_continues_across_epochs():
    def batches():
        for i in range(100):
            yield torch.full((2, 8), float(i)), torch.zeros(2, dtype=torch.long)

    firsts = _first_of_each_batch(make_model(), batches(), epochs=3, steps_per_epoch=2)
    assert firsts == [0, 1, 2, 3, 4, 5]


def test_validation_split_is_taken_before_class_weight(blobs):
    """Validation loss is never class-weighted: it equals evaluate() on the held-out part."""
    x, y = blobs
    tail = slice(180, None)
    model = make_model()
    history = model.fit(
        x,
        y,
        epochs=1,
        batch_size=60,
        validation_split=0.25,
        class_weight={0: 10.0, 1: 0.1, 2: 1.0},
        verbose=0,
    )
    held_out = model.evaluate(x[tail], y[tail], batch_size=60, verbose=0, return_dict=True)
    assert history.history["val_loss"][0] == pytest.approx(held_out["loss"], rel=1e-5)


def _first_batch_loss(x, y, **fit_kwargs):
    """The logged loss of one full batch, from a model seeded as the reference is."""
    torch.manual_seed(0)
    model = make_model()
    first = []
    probe = LambdaCallback(on_train_batch_end=lambda b, logs: first.append(logs["loss"]))
    model.fit(
        x, y, epochs=1, batch_size=240, shuffle=False, callbacks=[probe], verbose=0, **fit_kwargs
    )
    return first[0]


def _reference_losses(x, y):
    torch.manual_seed(0)
    with torch.no_grad():
        logits = make_model()(torch.from_numpy(x))
    return nn.functional.cross_entropy(logits, torch.from_numpy(y), reduction="none")


def test_class_weight_weights_the_right_class_in_training(blobs):
    """Weight 0 on every class but 0: the first step's loss is class 0's samples only."""
    x, y = blobs
    per_sample = _reference_losses(x, y)
    only_0 = _first_batch_loss(x, y, class_weight={0: 1.0, 1: 0.0, 2: 0.0})
    mask = torch.from_numpy(y == 0).float()
    assert only_0 == pytest.approx(float((per_sample * mask).sum() / 240), rel=1e-5)
    assert _first_batch_loss(x, y) == pytest.approx(float(per_sample.mean()), rel=1e-5)


def test_sample_weight_in_fit_weights_the_training_loss(blobs):
    x, y = blobs
    weights = np.zeros(240, dtype="float32")
    weights[:10] = 1.0
    per_sample = _reference_losses(x, y)
    assert _first_batch_loss(x, y, sample_weight=weights) == pytest.approx(
        float(per_sample[:10].sum() / 240), rel=1e-5
    )


def test_weighted_metrics_honour_sample_weight_and_metrics_do_not(blobs):
    """Keras: `metrics` ignore sample weights, `weighted_metrics` use them."""
    x, y = blobs
    model = make_model(metrics=["accuracy"], weighted_metrics=["sparse_categorical_accuracy"])
    weights = np.where(y == 0, 1.0, 0.0).astype("float32")
    result = model.evaluate(x, y, sample_weight=weights, verbose=0, return_dict=True)
    correct = model.predict(x, verbose=0).argmax(1) == y
    assert result["accuracy"] == pytest.approx(correct.mean())
    assert result["sparse_categorical_accuracy"] == pytest.approx(correct[y == 0].mean())


class GAN(torcheras.Model):
    """Keras's GAN-guide shape: fit on images alone, train_step keeps its own optimizers."""

    def __init__(self):
        super().__init__()
        self.generator = nn.Linear(2, 4)
        self.discriminator = nn.Linear(4, 1)
        self.d_opt = torch.optim.Adam(self.discriminator.parameters(), 1e-3)
        self.g_opt = torch.optim.Adam(self.generator.parameters(), 1e-3)
        self.steps = 0

    def train_step(self, batch):
        (real,) = batch
        noise = torch.randn(real.shape[0], 2)
        fake = self.generator(noise)
        bce = nn.functional.binary_cross_entropy_with_logits
        d_loss = bce(self.discriminator(real), torch.ones(len(real), 1)) + bce(
            self.discriminator(fake.detach()), torch.zeros(len(real), 1)
        )
        self.d_opt.zero_grad()
        d_loss.backward()
        self.d_opt.step()
        g_loss = bce(self.discriminator(self.generator(noise)), torch.ones(len(real), 1))
        self.g_opt.zero_grad()
        g_loss.backward()
        self.g_opt.step()
        self.steps += 1
        return {"d_loss": d_loss, "g_loss": g_loss}


def test_an_overridden_train_step_fits_on_inputs_alone():
    images = np.random.rand(64, 4).astype("float32")
    gan = GAN()
    gan.compile(optimizer=None, device="cpu")
    history = gan.fit(images, epochs=2, batch_size=16, verbose=0)
    assert gan.steps == 8 and sorted(history.history) == ["d_loss", "g_loss"]
    gan.fit(TensorDataset(torch.from_numpy(images)), epochs=1, batch_size=16, verbose=0)
    assert gan.steps == 12


def test_the_default_train_step_still_needs_y(blobs):
    x, _ = blobs
    with pytest.raises(ValueError, match="`y` is required.*override train_step"):
        make_model().fit(x, verbose=0)


def test_loader_batches_without_targets_under_the_default_train_step_say_so(blobs):
    x, _ = blobs
    loader = DataLoader(TensorDataset(torch.from_numpy(x)), batch_size=16)
    with pytest.raises(ValueError, match=r"no targets.*\(x, y\)"):
        make_model().fit(loader, verbose=0)


def test_numpy_integers_are_accepted_wherever_an_int_is(blobs):
    x, y = blobs
    model = make_model()
    history = model.fit(
        x,
        y,
        batch_size=np.int64(40),
        epochs=np.int32(3),
        initial_epoch=np.int64(1),
        steps_per_epoch=np.int64(2),
        validation_split=0.25,
        validation_freq=np.int64(1),
        validation_batch_size=np.int16(30),
        validation_steps=np.int64(1),
        verbose=0,
    )
    assert history.epoch == [1, 2]
    model.evaluate(x, y, batch_size=np.int64(50), steps=np.int64(2), verbose=0)
    assert model.predict(x, batch_size=np.int64(50), verbose=0).shape == (240, 3)


def test_pandas_dataframes_and_series_work_as_inputs(blobs):
    pd = pytest.importorskip("pandas")
    x, y = blobs
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(8)])
    series = pd.Series(y)
    model = make_model()
    history = model.fit(frame, series, epochs=3, validation_split=0.25, verbose=0)
    assert history.history["val_accuracy"][-1] > 0.9
    predictions = model.predict(frame, verbose=0)
    assert isinstance(predictions, np.ndarray)
    np.testing.assert_allclose(predictions, model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"x": np.array([["a"] * 8] * 240)}, r"`x` holds strings"),
        ({"y": np.array(["cat"] * 240)}, r"`y` holds strings"),
        ({"y": np.array([None] * 240, dtype=object)}, r"`y` holds objects"),
    ],
)
def test_string_or_object_arrays_are_an_error_naming_the_argument(kwargs, message, blobs):
    x, y = blobs
    arguments = {"x": x, "y": y, **kwargs}
    with pytest.raises(TypeError, match=message):
        make_model().fit(arguments["x"], arguments["y"], verbose=0)


def test_a_dataframe_with_text_columns_is_an_error_naming_them_and_the_fix(blobs):
    pd = pytest.importorskip("pandas")
    x, y = blobs
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(8)])
    frame["city"] = "Paris"
    frame["when"] = pd.Timestamp("2024-01-01")
    with pytest.raises(TypeError) as info:
        make_model(n_in=10).fit(frame, y, verbose=0)
    message = str(info.value)
    assert "`x` is a pandas DataFrame" in message
    assert re.search(r"'city' \((object|str)\), 'when' \(datetime64\[", message)
    assert "'f0'" not in message
    assert "pd.get_dummies(df, columns=['city', 'when'])" in message
    assert "df.drop(columns=['city', 'when'])" in message
    labels = pd.Series(np.array(["a", "b", "c"])[y], name="species")
    with pytest.raises(
        TypeError, match=r"`y` is a pandas Series of (object|str) \('species'\).*cat"
    ):
        make_model().fit(x, labels, verbose=0)
    frame = pd.DataFrame({"f": x[:, 0], "flag": x[:, 1] > 0, "n": y, "c": frame["city"]})
    make_model(n_in=3).fit(frame.drop(columns=["c"]), y, verbose=0)  # numbers and booleans


@pytest.mark.parametrize("validation_data", ["x_only", "four", "wrong_width", "wrong_length"])
def test_bad_validation_data_names_validation_data_and_its_forms(validation_data, blobs):
    x, y = blobs
    bad = {
        "x_only": (x,),
        "four": (x, y, np.ones(240), np.ones(240)),
        "wrong_width": (x[:, :5], y),
        "wrong_length": (x, y[:100]),
    }[validation_data]
    with pytest.raises(ValueError, match=r"validation_data.*Pass a tuple \(x_val, y_val\)") as info:
        make_model().fit(x, y, validation_data=bad, verbose=0)
    assert "validation_data" in str(info.value)


@pytest.mark.parametrize("class_weight", [{"0": 1.0}, {0.5: 1.0}, {-1: 2.0}, [1.0, 2.0]])
def test_class_weight_with_non_integer_keys_names_class_weight(class_weight, blobs):
    x, y = blobs
    with pytest.raises(ValueError, match="`class_weight`"):
        make_model().fit(x, y, class_weight=class_weight, verbose=0)


def test_stop_evaluating_during_validation_is_reset_before_the_next_validation(blobs):
    x, y = blobs
    counts = []

    class StopValidationEarly(Callback):
        def on_test_begin(self, logs=None):
            counts.append(0)

        def on_test_batch_end(self, batch, logs=None):
            counts[-1] += 1
            if len(counts) == 1:
                self.model.stop_evaluating = True

    make_model().fit(
        x,
        y,
        epochs=3,
        validation_split=0.5,
        validation_batch_size=30,
        verbose=0,
        callbacks=[StopValidationEarly()],
    )
    assert counts == [1, 4, 4]


def test_fit_inside_fit_raises_and_keeps_the_outer_history(blobs):
    x, y = blobs
    model = make_model()

    class Nested(Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.fit(x, y, verbose=0)

    with pytest.raises(RuntimeError, match="while fit\\(\\) is running"):
        model.fit(x, y, epochs=2, verbose=0, callbacks=[Nested()])
    history = model.fit(x, y, epochs=2, verbose=0)  # the model is usable afterwards
    assert history.epoch == [0, 1] and model.history is history


def test_evaluate_from_a_callback_during_fit_is_allowed(blobs):
    x, y = blobs
    results = []
    probe = LambdaCallback(
        on_epoch_end=lambda e, logs: results.append(model.evaluate(x, y, verbose=0))
    )
    model = make_model()
    model.fit(x, y, epochs=2, verbose=0, callbacks=[probe])
    assert len(results) == 2


def test_validation_with_validation_steps_restarts_from_the_first_batch_each_time():
    x = torch.arange(40, dtype=torch.float32).reshape(40, 1).repeat(1, 8)
    loader = DataLoader(TensorDataset(x, torch.zeros(40, dtype=torch.long)), batch_size=4)
    seen = []
    model = make_model()
    probe = LambdaCallback(on_test_batch_begin=lambda b, logs: seen.append(b))
    history = model.fit(
        x[:8],
        torch.zeros(8, dtype=torch.long),
        epochs=3,
        verbose=0,
        validation_data=loader,
        validation_steps=2,
        callbacks=[probe],
    )
    first_two = model.evaluate(x[:8], torch.zeros(8, dtype=torch.long), verbose=0, return_dict=True)
    assert seen == [0, 1] * 3
    assert history.history["val_loss"][-1] == pytest.approx(first_two["loss"], rel=1e-5)


@pytest.mark.parametrize("form", ["pair", "sparse", "dict_and_weights", "resumed"])
def test_shuffled_array_batches_hold_the_rows_of_the_order(form):
    """Each shuffled batch holds exactly ``x[order[i:i + bs]]`` (gathered by index_select),
    for a pair, a sparse COO input (which ``x[idx]`` refuses), a dict of inputs with sample
    weights, and an epoch resumed at a later batch."""
    from torcheras.data import ArraySource

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 3, generator=gen)
    y = torch.randint(0, 4, (37,), generator=gen)
    w = torch.rand(37, generator=gen)
    inputs = {"pair": x, "sparse": x.to_sparse(), "dict_and_weights": {"a": x, "b": x * 2}}
    source = ArraySource(
        inputs.get(form, x), y, w if form == "dict_and_weights" else None, 8, shuffle=True
    )
    order = source.new_order()
    start = 2 if form == "resumed" else 0
    batches = list(source.batches(order, start=start))
    assert len(batches) == 5 - start
    for n, batch in enumerate(batches, start):
        rows = order[n * 8 : n * 8 + 8]
        got_x = batch[0]
        if form == "sparse":
            got_x = got_x.to_dense()
        if form == "dict_and_weights":
            assert torch.equal(got_x["a"], x[rows]) and torch.equal(got_x["b"], 2 * x[rows])
            assert torch.equal(batch[2], w[rows])
        else:
            assert torch.equal(got_x, x[rows])
        assert torch.equal(batch[1], y[rows])
