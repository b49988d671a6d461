"""ReduceLROnPlateau: scripted plateaus with exact learning rates, cooldown, min_lr."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

from torcheras.callbacks import CallbackList, ReduceLROnPlateau


def run(callback, values, lr=1.0, groups=None):
    """Drive scripted val_loss values; return the learning rate after each epoch."""
    model = make_model(optimizer=torch.optim.SGD(make_model().parameters(), lr=lr))
    net = model.module
    if groups:
        model.optimizer = torch.optim.SGD(
            [
                {"params": net[0].parameters(), "lr": groups[0]},
                {"params": net[2].parameters(), "lr": groups[1]},
            ]
        )
    cbs = CallbackList([callback], model=model, epochs=len(values))
    cbs.on_train_begin()
    rates = []
    for epoch, value in enumerate(values):
        cbs.on_epoch_begin(epoch)
        cbs.on_epoch_end(epoch, {"val_loss": value})
        rates.append([g["lr"] for g in model.optimizer.param_groups])
    cbs.on_train_end()
    return rates


def test_reduces_after_patience():
    rates = run(ReduceLROnPlateau(factor=0.5, patience=2), [1.0, 1.0, 1.0, 1.0, 1.0, 0.5])
    assert [r[0] for r in rates] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


def test_min_delta_default_counts_tiny_gains_as_plateau():
    rates = run(ReduceLROnPlateau(factor=0.1, patience=1), [1.0, 0.99995, 0.9])
    assert [r[0] for r in rates] == [1.0, pytest.approx(0.1), pytest.approx(0.1)]


def test_cooldown_and_min_lr():
    rates = run(
        ReduceLROnPlateau(factor=0.5, patience=1, cooldown=2, min_lr=0.2),
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    )
    # Reduce at 1; the counter runs out at 3, where the wait is counted again (Keras checks
    # the cooldown after decrementing it): 0.25; then 0.2 (min_lr) at 5; never below it.
    assert [r[0] for r in rates] == [1.0, 0.5, 0.5, 0.25, 0.25, 0.2, 0.2, 0.2]


def test_param_groups_keep_their_ratio_when_reduced():
    rates = run(ReduceLROnPlateau(factor=0.1, patience=1), [1.0, 1.0], groups=(0.5, 0.02))
    assert rates[-1] == [pytest.approx(0.05), pytest.approx(0.002)]
    floored = run(
        ReduceLROnPlateau(factor=0.1, patience=1, min_lr=0.1), [1.0, 1.0], groups=(0.5, 0.02)
    )
    assert floored[-1] == [pytest.approx(0.1), pytest.approx(0.004)]  # min_lr bounds the first


def test_verbose_message(capsys):
    run(ReduceLROnPlateau(factor=0.5, patience=1, verbose=1), [1.0, 1.0])
    assert "Epoch 2: ReduceLROnPlateau reducing learning rate to 0.5." in capsys.readouterr().out


def test_logged_learning_rate_is_the_one_used_during_the_epoch(blobs):
    x, y = blobs
    model = make_model()
    history = model.fit(
        x,
        y,
        epochs=4,
        verbose=0,
        callbacks=[ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=10.0)],
    )
    # Epoch 0 sets the best; each later epoch is a plateau (min_delta=10) and reduces at its end.
    assert history.history["learning_rate"] == pytest.approx([0.02, 0.02, 0.01, 0.005])
    assert model.learning_rate == pytest.approx(0.0025)


def test_missing_monitor_warns_with_available_keys():
    with pytest.warns(
        UserWarning,
        match="Learning rate reduction is conditioned on metric "
        "`val_acc` which is not available. Available metrics "
        "are: val_loss",
    ):
        run(ReduceLROnPlateau(monitor="val_acc"), [1.0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"factor": 1.0}, r"does not support a factor >= 1.0. Received factor=1.0"),
        ({"factor": 2}, "factor >= 1.0"),
        ({"patience": -2}, "`patience` must be a non-negative integer"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReduceLROnPlateau(**kwargs)
