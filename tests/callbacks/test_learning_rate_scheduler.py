"""LearningRateScheduler: Keras's schedule functions, torch schedulers, per epoch or batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_model

import torcheras
from torcheras import schedules
from torcheras.callbacks import LearningRateScheduler, ReduceLROnPlateau


def _fit(callbacks, epochs=4, batch_size=120, **kwargs):
    x = np.random.rand(240, 8).astype("float32")
    y = np.random.randint(0, 3, 240)
    model = kwargs.pop("model", None) or make_model()
    history = model.fit(
        x, y, epochs=epochs, batch_size=batch_size, verbose=0, callbacks=callbacks, **kwargs
    )
    return model, history


def test_two_argument_schedule_gets_epoch_and_current_lr():
    calls = []

    def schedule(epoch, lr):
        calls.append((epoch, lr))
        return lr * 0.5

    _, history = _fit([LearningRateScheduler(schedule)], epochs=3)
    assert calls == [(0, pytest.approx(0.02)), (1, pytest.approx(0.01)), (2, pytest.approx(0.005))]
    assert type(calls[0][1]) is float
    assert history.history["learning_rate"] == pytest.approx([0.01, 0.005, 0.0025])


def test_one_argument_schedule_and_ints_and_numpy_floats():
    _, history = _fit(
        [LearningRateScheduler(lambda epoch: [1, 0.5, np.float32(0.25)][epoch])], epochs=3
    )
    assert history.history["learning_rate"] == [1.0, 0.5, 0.25]


@pytest.mark.parametrize("bad", ["0.1", None, torch.tensor(0.1), True, float("nan"), np.inf])
def test_non_real_result_is_an_error_naming_the_schedule_and_epoch(bad):
    def warmup(epoch, lr):
        return 0.01 if epoch == 0 else bad

    with pytest.raises(
        ValueError, match=r"should be a float. Got: .* schedule 'warmup' at epoch 1"
    ):
        _fit([LearningRateScheduler(warmup)], epochs=2)


def test_a_torch_scheduler_on_another_optimizer_is_an_error():
    model = make_model()
    stray = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(stray, step_size=1)
    with pytest.raises(ValueError, match="bound to another optimizer"):
        model.fit(
            np.zeros((4, 8), "float32"),
            np.zeros(4, "int64"),
            verbose=0,
            callbacks=[LearningRateScheduler(scheduler)],
        )


def test_setting_the_rate_keeps_the_ratio_between_param_groups():
    """A backbone at a tenth of the head's rate stays at a tenth."""
    model = make_model()
    net = model.module
    model.compile(
        torch.optim.SGD(
            [
                {"params": net[2].parameters(), "lr": 0.1},  # the head
                {"params": net[0].parameters(), "lr": 0.01},  # the backbone
            ]
        ),
        "sparse_categorical_crossentropy",
        device="cpu",
    )
    seen = []
    cb = LearningRateScheduler(lambda epoch, lr: [0.5, 0.2][epoch])
    probe = torcheras.callbacks.LambdaCallback(
        on_epoch_end=lambda e, logs: seen.append([g["lr"] for g in model.optimizer.param_groups])
    )
    history = model.fit(
        np.zeros((4, 8), "float32"),
        np.zeros(4, "int64"),
        epochs=2,
        verbose=0,
        callbacks=[cb, probe],
    )
    assert seen == [
        [pytest.approx(0.5), pytest.approx(0.05)],
        [pytest.approx(0.2), pytest.approx(0.02)],
    ]
    assert history.history["learning_rate"] == pytest.approx([0.5, 0.2])


def test_verbose_message(capsys):
    _fit([LearningRateScheduler(lambda epoch, lr: 0.1, verbose=1)], epochs=1)
    assert "Epoch 1: LearningRateScheduler setting learning rate to 0.1." in capsys.readouterr().out


def test_torch_scheduler_per_epoch():
    model = make_model()
    step = torch.optim.lr_scheduler.StepLR(model.optimizer, step_size=1, gamma=0.1)
    _, history = _fit([LearningRateScheduler(step)], epochs=3, model=model)
    assert history.history["learning_rate"] == pytest.approx([0.02, 0.002, 0.0002])


def test_torch_scheduler_per_batch():
    model = make_model()
    onecycle = torch.optim.lr_scheduler.OneCycleLR(model.optimizer, max_lr=0.1, total_steps=8)
    seen = []
    from torcheras.callbacks import LambdaCallback

    probe = LambdaCallback(on_train_batch_begin=lambda b, logs: seen.append(model.learning_rate))
    _fit([LearningRateScheduler(onecycle, interval="batch"), probe], epochs=4, model=model)
    assert len(set(seen)) == 8 and 0.09 < max(seen) <= 0.1 and seen[0] == pytest.approx(0.004)


def test_function_per_batch_gets_the_global_step():
    steps = []
    _fit(
        [LearningRateScheduler(lambda step, lr: steps.append(step) or 0.01, interval="batch")],
        epochs=2,
    )
    assert steps == [0, 1, 2, 3]


def test_ready_schedules():
    _, history = _fit(
        [LearningRateScheduler(schedules.step_decay(0.1, drop=0.5, every=2))], epochs=4
    )
    assert history.history["learning_rate"] == pytest.approx([0.1, 0.1, 0.05, 0.05])
    cosine = schedules.cosine_annealing(1.0, total=10, warmup=2, min_lr=0.0)
    assert [cosine(e) for e in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert cosine(6) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)
    exp = schedules.exponential_decay(1.0, decay_rate=0.5, decay_steps=2, staircase=True)
    assert [exp(e) for e in range(5)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    with pytest.raises(ValueError, match="`warmup` must be in"):
        schedules.cosine_annealing(1.0, total=5, warmup=5)


def test_relative_schedule_keeps_plateau_reductions():
    from torcheras.callbacks import LambdaCallback

    fake = LambdaCallback(on_epoch_end=lambda e, logs: logs.__setitem__("val_loss", 1.0))
    _, history = _fit(
        [
            LearningRateScheduler(lambda epoch, lr: lr),
            fake,
            ReduceLROnPlateau(factor=0.5, patience=1),
        ],
        epochs=4,
    )
    assert history.history["learning_rate"] == pytest.approx([0.02, 0.02, 0.01, 0.005])


@pytest.mark.parametrize(
    ("args", "match"), [(("not callable",), "must be a function"), ((lambda e: 0.1,), None)]
)
def test_argument_errors(args, match):
    if match is None:
        with pytest.raises(ValueError, match="`interval` must be 'epoch' or 'batch'"):
            LearningRateScheduler(*args, interval="step")
    else:
        with pytest.raises(ValueError, match=match):
            LearningRateScheduler(*args)
    opt = torch.optim.SGD(make_model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="use torcheras.callbacks.ReduceLROnPlateau"):
        LearningRateScheduler(torch.optim.lr_scheduler.ReduceLROnPlateau(opt))
