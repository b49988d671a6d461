"""The shared monitor: direction, min_delta, baseline, missing-metric warnings."""

from __future__ import annotations

import pytest
from conftest import drive, make_model

from torcheras.callbacks import EarlyStopping, ModelCheckpoint, ReduceLROnPlateau
from torcheras.callbacks.monitor import Monitor


@pytest.mark.parametrize(
    ("monitor", "direction"),
    [
        ("val_loss", "min"),
        ("loss", "min"),
        ("val_accuracy", "max"),
        ("acc", "max"),
        ("val_mae", "min"),
        ("auc", "max"),
        ("val_sparse_categorical_accuracy", "max"),
        ("kl_loss", "min"),
    ],
)
def test_auto_direction_from_name(monitor, direction):
    m = Monitor("EarlyStopping", monitor)
    assert m.resolve(None) == direction


def test_auto_direction_from_compiled_metric():
    def closeness(y_pred, y_true):
        return -(y_pred - y_true).abs()

    closeness.direction = "max"
    model = make_model(metrics=[closeness])
    assert Monitor("EarlyStopping", "val_closeness").resolve(model) == "max"


def test_undecidable_direction_asks_for_mode():
    with pytest.raises(ValueError, match=r"monitor=val_foo.*Pass `mode='max'`.*`mode='min'`"):
        drive(EarlyStopping(monitor="val_foo"), [1.0], monitor="val_foo")
    ran = drive(
        EarlyStopping(monitor="val_foo", mode="max", patience=1), [1.0, 0.5], monitor="val_foo"
    )
    assert ran == [0, 1]


@pytest.mark.parametrize("cls", [EarlyStopping, ReduceLROnPlateau])
def test_unknown_mode_warns_and_falls_back_to_auto(cls):
    with pytest.warns(
        UserWarning, match=f"{cls.__name__} mode 'sideways' is unknown, fallback to auto mode."
    ):
        cb = cls(mode="sideways")
    assert cb.monitor_state.mode == "auto"
    with pytest.warns(UserWarning, match="ModelCheckpoint mode 'up' is unknown"):
        ModelCheckpoint("x.pt", mode="up")


def test_min_delta_sign_ignored_and_improvement_strict():
    m = Monitor("X", "val_loss", min_delta=-0.1)
    m.resolve(None)
    assert m.min_delta == 0.1
    assert m.is_improvement(0.39, 0.5) and not m.is_improvement(0.4, 0.5)
    m0 = Monitor("X", "val_acc", mode="max")
    m0.resolve(None)
    assert not m0.is_improvement(0.5, 0.5) and m0.is_improvement(0.51, 0.5)


def test_missing_metric_message_names_keys_and_closest_match():
    m = Monitor("EarlyStopping", "val_los")
    with pytest.warns(UserWarning) as record:
        assert (
            m.get(
                {"loss": 1.0, "val_loss": 2.0}, warn_prefix="Early stopping conditioned on metric"
            )
            is None
        )
    text = str(record[0].message)
    assert "Available metrics are: loss,val_loss" in text and "Did you mean `val_loss`?" in text
    with pytest.warns(UserWarning, match="pass validation_data or validation_split"):
        Monitor("EarlyStopping", "val_loss").get({"loss": 1.0}, warn_prefix="x")
