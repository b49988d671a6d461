"""The callback engine: Keras's exact hook order, logs, params and stop_training checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_model

from torcheras.callbacks import Callback, CallbackList, EarlyStopping, History, ProgbarLogger
from torcheras.callbacks.callback_list import HOOKS
from torcheras.logs import BatchLogs, LogCollector

NOT_KERAS = ("on_train_batches_end", "on_test_batch_outputs")  # ours, with other signatures


class Recorder(Callback):
    """Records every Keras hook with its index and sorted log keys."""

    def __init__(self):
        self.events = []
        for hook in HOOKS:
            if hook not in ("on_after_backward", "on_exception", *NOT_KERAS):
                setattr(self, hook, self._recorder(hook))

    def _recorder(self, name):
        indexed = "batch" in name or "epoch" in name

        def record(*args):
            index, logs = args if indexed else (None, args[0])
            keys = sorted(logs) if logs is not None else None
            self.events.append((name, index, keys) if indexed else (name, keys))

        return record

    def set_params(self, params):
        super().set_params(params)
        self.events.append(("set_params", dict(params)))


def _data(n):
    rng = np.random.default_rng(0)
    return rng.random((n, 8), dtype=np.float32), rng.random((n, 3), dtype=np.float32)


def test_full_hook_sequence_of_fit_evaluate_and_predict():
    """KERAS_SEMANTICS §0.1/§0.2: 8 samples, batch 4, 4 val samples, val batch 2, 2 epochs."""
    x, y = _data(8)
    vx, vy = _data(4)
    model = make_model(8, 3, loss="mse", metrics=["mae"])
    rec = Recorder()
    model.fit(
        x,
        y,
        batch_size=4,
        epochs=2,
        verbose=0,
        validation_data=(vx, vy),
        validation_batch_size=2,
        callbacks=[rec],
    )
    m = ["loss", "mae"]
    epoch_keys = ["learning_rate", "loss", "mae", "val_loss", "val_mae"]
    per_epoch = lambda e: [  # noqa: E731
        ("on_epoch_begin", e, []),
        ("on_train_batch_begin", 0, []),
        ("on_train_batch_end", 0, m),
        ("on_train_batch_begin", 1, []),
        ("on_train_batch_end", 1, m),
        ("on_test_begin", []),
        ("on_test_batch_begin", 0, []),
        ("on_test_batch_end", 0, m),
        ("on_test_batch_begin", 1, []),
        ("on_test_batch_end", 1, m),
        ("on_test_end", m),
        ("on_epoch_end", e, epoch_keys),
    ]
    assert rec.events == [
        ("set_params", {"verbose": 0, "epochs": 2, "steps": 2}),
        ("on_train_begin", []),
        *per_epoch(0),
        *per_epoch(1),
        ("on_train_end", epoch_keys),
    ]

    rec.events.clear()
    model.evaluate(vx, vy, batch_size=2, verbose=0, callbacks=[rec])
    assert rec.events == [
        ("set_params", {"verbose": 0, "epochs": 1, "steps": 2}),
        ("on_test_begin", []),
        ("on_test_batch_begin", 0, []),
        ("on_test_batch_end", 0, m),
        ("on_test_batch_begin", 1, []),
        ("on_test_batch_end", 1, m),
        ("on_test_end", m),
    ]

    rec.events.clear()
    model.predict(vx, batch_size=2, verbose=0, callbacks=[rec])
    assert rec.events == [
        ("set_params", {"verbose": 0, "epochs": 1, "steps": 2}),
        ("on_predict_begin", []),
        ("on_predict_batch_begin", 0, []),
        ("on_predict_batch_end", 0, ["outputs"]),
        ("on_predict_batch_begin", 1, []),
        ("on_predict_batch_end", 1, ["outputs"]),
        ("on_predict_end", []),
    ]


def test_logs_are_floats_and_batch_logs_are_running_means():
    x, y = _data(8)
    seen = {}

    class Grab(Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen[batch] = dict(logs)

        def on_epoch_end(self, epoch, logs=None):
            seen["epoch"] = logs

    model = make_model(8, 3, loss="mse", metrics=["mae"], optimizer="sgd")
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[Grab()])
    assert all(type(v) is float for v in seen[0].values())
    # The epoch logs equal the last batch's running means (Keras's observed behaviour).
    assert seen["epoch"]["loss"] == pytest.approx(seen[1]["loss"])
    assert seen["epoch"]["mae"] == pytest.approx(seen[1]["mae"])


def test_batch_logs_are_not_read_unless_a_callback_reads_them():
    x, y = _data(16)
    kept = []

    class Ignore(Callback):
        def on_train_batch_end(self, batch, logs=None):
            kept.append(logs)

    model = make_model(8, 3, loss="mse", metrics=["mae"])
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[Ignore()])
    assert len(kept) == 4 and all(isinstance(logs, BatchLogs) for logs in kept)
    assert not any(logs.materialized for logs in kept)
    assert sorted(kept[0]) == ["loss", "mae"]  # the keys need no device read
    assert isinstance(kept[0]["loss"], float) and kept[0].materialized


def test_no_batch_logs_are_built_when_no_callback_wants_them(monkeypatch):
    x, y = _data(16)
    model = make_model(8, 3, loss="mse")
    calls = []
    monkeypatch.setattr(LogCollector, "snapshot", lambda self: calls.append(1))
    model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    assert calls == []


def test_callback_list_order_and_history_progbar_added():
    mine = Recorder()
    cbs = CallbackList([mine, [EarlyStopping()]], add_history=True, add_progbar=True)
    kinds = [type(c) for c in cbs.callbacks]
    assert kinds == [Recorder, EarlyStopping, History, ProgbarLogger]
    user_history = History()
    cbs = CallbackList([user_history], add_history=True)
    assert cbs.callbacks == [user_history]


def test_end_without_begin_raises():
    cbs = CallbackList([Recorder()])
    with pytest.raises(ValueError, match="`on_train_end` called without corresponding"):
        cbs.on_train_end()
    cbs.on_test_begin()
    cbs.on_test_end()
    with pytest.raises(ValueError, match="`on_test_end` called without"):
        cbs.on_test_end()


def test_non_callback_is_rejected_with_a_hint():
    with pytest.raises(TypeError, match="wrap functions in LambdaCallback"):
        CallbackList([print])


@pytest.mark.parametrize(
    ("where", "expected_batches", "expected_epochs"),
    [
        ("on_train_batch_end", [0], [0]),
        ("on_epoch_begin", [0], [0]),
        ("on_epoch_end", [0, 1, 2, 3], [0]),
    ],
)
def test_stop_training_edge_cases(where, expected_batches, expected_epochs):
    x, y = _data(16)
    batches, epochs, tests = [], [], []

    class Stop(Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if where == "on_epoch_begin":
                self.model.stop_training = True

        def on_train_batch_end(self, batch, logs=None):
            batches.append(batch)
            if where == "on_train_batch_end":
                self.model.stop_training = True

        def on_test_begin(self, logs=None):
            tests.append(1)

        def on_epoch_end(self, epoch, logs=None):
            epochs.append(epoch)
            if where == "on_epoch_end":
                self.model.stop_training = True

    history = make_model(8, 3, loss="mse").fit(
        x, y, batch_size=4, epochs=3, verbose=0, validation_data=(x, y), callbacks=[Stop()]
    )
    assert batches == expected_batches and epochs == expected_epochs
    assert history.epoch == expected_epochs and tests == [1]  # validation still runs


def test_exception_in_callback_propagates_after_on_exception_and_skips_train_end():
    x, y = _data(8)
    events = []

    class Boom(Callback):
        def on_train_batch_end(self, batch, logs=None):
            raise RuntimeError("boom")

    class Watch(Callback):
        def on_exception(self, exception):
            events.append(("exception", str(exception)))

        def on_train_end(self, logs=None):
            events.append("train_end")

    with pytest.raises(RuntimeError, match="boom"):
        make_model(8, 3, loss="mse").fit(x, y, epochs=1, verbose=0, callbacks=[Boom(), Watch()])
    assert events == [("exception", "boom")]


def test_keyboard_interrupt_reaches_on_exception():
    x, y = _data(8)
    seen = []

    class Interrupt(Callback):
        def on_train_batch_begin(self, batch, logs=None):
            raise KeyboardInterrupt

        def on_exception(self, exception):
            seen.append(type(exception))

    with pytest.raises(KeyboardInterrupt):
        make_model(8, 3, loss="mse").fit(x, y, epochs=1, verbose=0, callbacks=[Interrupt()])
    assert seen == [KeyboardInterrupt]


def test_on_after_backward_sees_the_gradients_before_the_step():
    x, y = _data(8)
    norms = []

    class GradNorm(Callback):
        def on_after_backward(self, batch):
            grads = [p.grad for p in self.model.parameters()]
            norms.append((batch, all(g is not None for g in grads)))

    make_model(8, 3, loss="mse").fit(
        x, y, batch_size=4, epochs=2, verbose=0, callbacks=[GradNorm()]
    )
    assert norms == [(0, True), (1, True)] * 2


def test_hand_written_loop_driven_by_callback_list():
    net = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    rec = Recorder()
    stop = EarlyStopping(monitor="loss", patience=1)
    cbs = CallbackList([rec, stop], add_history=True, model=net, epochs=50, steps=2)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    net.stop_training = False
    cbs.on_train_begin()
    for epoch in range(50):
        cbs.on_epoch_begin(epoch)
        for batch in range(2):
            cbs.on_train_batch_begin(batch)
            loss = torch.nn.functional.mse_loss(
                net(x[batch * 4 : (batch + 1) * 4]), y[batch * 4 : (batch + 1) * 4]
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            cbs.on_train_batch_end(batch, {"loss": loss.detach()})  # tensors become floats
        cbs.on_epoch_end(epoch, {"loss": 3.0 - epoch if epoch < 2 else 2.5})
        if net.stop_training:
            break
    cbs.on_train_end()
    assert stop.stopped_epoch == 2
    assert net.history.epoch == [0, 1, 2]
    assert rec.events[0] == ("set_params", {"epochs": 50, "steps": 2})
    batch_end = [e for e in rec.events if e[0] == "on_train_batch_end"]
    assert batch_end[0] == ("on_train_batch_end", 0, ["loss"])


def test_state_dict_roundtrip_of_a_callback_list():
    cbs = CallbackList(
        [EarlyStopping(monitor="loss")], add_history=True, model=make_model(), epochs=3
    )
    cbs.on_train_begin()
    cbs.on_epoch_begin(0)
    cbs.on_epoch_end(0, {"loss": 0.5})
    state = cbs.state_dict()
    other = CallbackList(
        [EarlyStopping(monitor="loss")], add_history=True, model=make_model(), epochs=3
    )
    other.load_state_dict(state)
    assert other.callbacks[0].best == 0.5
    assert other.callbacks[1].history == {"loss": [0.5]}


def test_states_follow_their_callback_when_callbacks_are_added_or_reordered():
    """A backup keys each state by the callback's class and identifying arguments: a script
    restarted with callbacks reordered, or one added in front, gives each its own state."""
    first = [EarlyStopping(monitor="loss"), EarlyStopping(monitor="val_loss")]
    cbs = CallbackList(first, model=make_model(), epochs=3)
    cbs.on_train_begin()
    cbs.on_epoch_begin(0)
    cbs.on_epoch_end(0, {"loss": 0.5, "val_loss": 0.7})
    state = cbs.state_dict()
    assert set(state) == {"EarlyStopping(monitor='loss')", "EarlyStopping(monitor='val_loss')"}
    later = [History(), EarlyStopping(monitor="val_loss"), EarlyStopping(monitor="loss")]
    CallbackList(later, model=make_model(), epochs=3).load_state_dict(state)
    assert (later[1].best, later[2].best) == (0.7, 0.5)


def test_backups_keyed_by_class_name_alone_still_load():
    """Backups written before keys named arguments (``EarlyStopping``, ``EarlyStopping:2``)."""
    stopper = EarlyStopping(monitor="loss")
    CallbackList([stopper]).load_state_dict(
        {"EarlyStopping": {**EarlyStopping().state_dict(), "best": 0.25}}
    )
    assert stopper.best == 0.25
