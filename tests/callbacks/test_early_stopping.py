"""EarlyStopping: Keras's patience counting, baseline, restore and warm-up."""

from __future__ import annotations

import pytest
import torch
from conftest import drive, make_model

from torcheras.callbacks import EarlyStopping, ModelCheckpoint, ReduceLROnPlateau


@pytest.mark.parametrize(
    ("values", "patience", "ran", "stopped"),
    [
        ([1.0, 0.9, 0.95, 0.96, 0.8], 0, [0, 1, 2], 2),
        ([1.0, 0.9, 0.95, 0.96, 0.8], 1, [0, 1, 2], 2),  # patience 0 and 1 behave the same
        ([1.0, 0.9, 0.95, 0.96, 0.8], 2, [0, 1, 2, 3], 3),
        ([1.0, 0.9, 0.95, 0.85, 0.86, 0.87, 0.88], 3, [0, 1, 2, 3, 4, 5, 6], 6),
        ([1.0, 1.1], 0, [0, 1], 1),
        ([1.0, 0.9, 0.8, 0.7], 0, [0, 1, 2, 3], 0),
    ],
)
def test_patience_counting(values, patience, ran, stopped):
    stop = EarlyStopping(patience=patience)
    assert drive(stop, values) == ran
    assert stop.stopped_epoch == stopped


def test_improving_epochs_never_stop_even_below_baseline():
    stop = EarlyStopping(patience=0, baseline=0.1)
    assert drive(stop, [0.5, 0.4, 0.3]) == [0, 1, 2]
    stop = EarlyStopping(patience=0, baseline=0.1)
    assert drive(stop, [0.5, 0.6, 0.7]) == [0, 1]  # epoch 0 never stops; epoch 1 does
    assert stop.stopped_epoch == 1


def test_min_delta_and_max_mode():
    stop = EarlyStopping(monitor="val_accuracy", min_delta=0.05, patience=2)
    assert drive(stop, [0.5, 0.54, 0.56, 0.7, 0.72, 0.74], monitor="val_accuracy") == [
        0,
        1,
        2,
        3,
        4,
        5,
    ]
    stop = EarlyStopping(monitor="val_accuracy", min_delta=0.05, patience=2)
    assert drive(stop, [0.5, 0.54, 0.53, 0.7], monitor="val_accuracy") == [0, 1, 2]
    assert stop.best == 0.5 and stop.best_epoch == 0


def test_baseline_wait_resets_only_when_beating_baseline():
    stop = EarlyStopping(patience=3, baseline=0.5)
    # Improvements that do not beat the baseline do not reset the wait.
    assert drive(stop, [0.9, 0.95, 0.8, 0.85, 0.9]) == [0, 1, 2, 3]
    stop = EarlyStopping(patience=3)  # without a baseline, epoch 2 resets the wait
    assert drive(stop, [0.9, 0.95, 0.8, 0.85, 0.9]) == [0, 1, 2, 3, 4]


def test_start_from_epoch_ignores_warm_up_entirely():
    stop = EarlyStopping(patience=1, start_from_epoch=3)
    assert drive(stop, [0.1, 5.0, 6.0, 1.0, 2.0, 3.0]) == [0, 1, 2, 3, 4]
    assert stop.best == 1.0 and stop.best_epoch == 3


def test_missing_monitor_warns_every_epoch_and_never_stops():
    stop = EarlyStopping(monitor="val_accuracy", patience=0)  # a known direction, not logged
    with pytest.warns(
        UserWarning,
        match="Early stopping conditioned on metric `val_accuracy` which is not available",
    ) as record:
        ran = drive(stop, [1.0, 2.0, 3.0])
    assert ran == [0, 1, 2] and len(record) == 3


@pytest.mark.parametrize(
    "make",
    [
        lambda: EarlyStopping(monitor="val_los"),
        lambda: ReduceLROnPlateau(monitor="val_los"),
        lambda: ModelCheckpoint("never.pt", monitor="val_los", save_best_only=True),
    ],
)
def test_a_typo_in_auto_mode_raises_at_the_first_epoch_end_naming_the_closest_key(make, blobs):
    """A monitor whose direction cannot be told is Keras's ValueError, never a silent no-op."""
    x, y = blobs
    model = make_model()
    with pytest.raises(ValueError, match=r"monitor=val_los.*Did you mean 'val_loss'\?") as info:
        model.fit(x, y, epochs=3, validation_split=0.25, verbose=0, callbacks=[make()])
    assert "maximized or minimized" in str(info.value)
    assert len(model.history.epoch if model.history else []) == 0  # it stopped at epoch 0


def test_restore_best_weights_even_without_early_stop(blobs):
    """Sequence [0.5, 0.4, 0.45, 0.46] with patience 5 restores the weights of epoch 1."""
    model = make_model()
    snapshots = {}
    stop = EarlyStopping(patience=5, restore_best_weights=True)
    from torcheras.callbacks import CallbackList

    cbs = CallbackList([stop], model=model, epochs=4)
    cbs.on_train_begin()
    for epoch, value in enumerate([0.5, 0.4, 0.45, 0.46]):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(epoch))
        snapshots[epoch] = model.get_weights()
        cbs.on_epoch_begin(epoch)
        cbs.on_epoch_end(epoch, {"val_loss": value})
    cbs.on_train_end({})
    assert stop.stopped_epoch == 0 and stop.best_epoch == 1
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshots[1][key])


def test_real_fit_stops_and_prints_keras_messages(blobs, capsys):
    x, y = blobs
    model = make_model()
    losses = iter([1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1])

    from torcheras.callbacks import LambdaCallback

    fake = LambdaCallback(
        on_epoch_end=lambda epoch, logs: logs.__setitem__("val_loss", next(losses))
    )
    stop = EarlyStopping(patience=2, verbose=1, restore_best_weights=True)
    history = model.fit(x, y, epochs=8, verbose=0, callbacks=[fake, stop])
    assert history.epoch == [0, 1, 2, 3] and stop.stopped_epoch == 3
    out = capsys.readouterr().out
    assert "Epoch 4: early stopping" in out
    assert "Restoring model weights from the end of the best epoch: 2." in out


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patience": -1}, "`patience` must be a non-negative integer"),
        ({"start_from_epoch": 1.5}, "`start_from_epoch`"),
        ({"monitor": ""}, "`monitor` must be a log key"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EarlyStopping(**kwargs)
