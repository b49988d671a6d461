"""compile(ema_momentum=...) and SwapEMAWeights, against Keras's formula."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

from torcheras import callbacks as cb


def test_the_average_follows_keras_formula_and_fit_ends_on_it(blobs):
    x, y = blobs
    model = make_model(optimizer="sgd", ema_momentum=0.9)
    after_steps = []
    record = cb.LambdaCallback(
        on_train_batch_end=lambda b, logs: after_steps.append(
            [p.detach().clone() for p in model.parameters()]
        )
    )
    model.fit(x, y, epochs=2, batch_size=60, verbose=0, callbacks=[record])
    average = after_steps[0]  # Keras: the first step copies the weights
    for weights in after_steps[1:]:
        average = [0.9 * a + 0.1 * w for a, w in zip(average, weights)]
    for got, want in zip(model.parameters(), average):
        torch.testing.assert_close(got.detach(), want)  # the weights are now the average
    assert not torch.equal(after_steps[-1][0], average[0])


def test_validation_runs_on_the_average_and_training_on_the_weights(blobs):
    x, y = blobs
    results = {}
    for swap in (False, True):
        torch.manual_seed(0)
        model = make_model(ema_momentum=0.95)
        callbacks = [cb.SwapEMAWeights()] if swap else []
        history = model.fit(x, y, epochs=3, validation_split=0.25, verbose=0, callbacks=callbacks)
        final = model.evaluate(x[180:], y[180:], verbose=0, return_dict=True)  # the average
        results[swap] = (history.history, final)
    (plain, plain_final), (swapped, swapped_final) = results[False], results[True]
    assert swapped["val_loss"][-1] == pytest.approx(swapped_final["loss"], rel=1e-5)
    assert plain["val_loss"][-1] != pytest.approx(plain_final["loss"], rel=1e-3)
    assert swapped["loss"] == pytest.approx(plain["loss"], rel=1e-6)  # training unchanged


def test_swap_on_epoch_checkpoints_the_average(blobs, tmp_path):
    x, y = blobs
    model = make_model(ema_momentum=0.9)
    model.fit(
        x, y, epochs=2, verbose=0,
        callbacks=[cb.SwapEMAWeights(swap_on_epoch=True), cb.ModelCheckpoint(tmp_path / "m.pt")],
    )  # fmt: skip
    saved = torch.load(tmp_path / "m.pt", weights_only=True)["model"]
    for key, value in model.state_dict().items():  # fit ended on the average too
        torch.testing.assert_close(saved[key], value)


def test_the_average_is_saved_with_the_model(blobs, tmp_path):
    x, y = blobs
    model = make_model(ema_momentum=0.9)
    model.fit(x, y, epochs=1, verbose=0)
    model.save(tmp_path / "model.pt")
    again = make_model(ema_momentum=0.9)
    again.load(tmp_path / "model.pt")
    assert again.ema.updates == model.ema.updates
    for a, b in zip(again.ema.average, model.ema.average):
        torch.testing.assert_close(a, b)


def test_without_an_average_the_callback_says_how_to_get_one(blobs):
    x, y = blobs
    with pytest.raises(ValueError, match="ema_momentum=0.99"):
        make_model().fit(x, y, epochs=1, verbose=0, callbacks=[cb.SwapEMAWeights()])
    with pytest.raises(ValueError, match="ema_momentum"):
        make_model(ema_momentum=1.5)
