"""The documented seams a callback has into the loop (the guide's "Writing a callback")."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from conftest import make_model

import torcheras
from torcheras.callbacks import Callback, CallbackList, PredictionLogger


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[tuple] = []


def test_unused_hooks_are_never_called(blobs):
    x, y = blobs

    class Idle(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.unused_hooks = ("on_train_batch_end",)

        def on_train_batch_end(self, batch, logs=None):
            self.events.append(batch)

    idle = Idle()
    assert not CallbackList([idle]).needs("on_train_batch_end")
    make_model().fit(x, y, epochs=1, verbose=0, callbacks=[idle])
    assert idle.events == []


class PlainTestStep(torcheras.Model):
    """A custom test_step that calls the model itself, not super() or call_on."""

    def test_step(self, batch):
        x, y = batch[0], batch[1]
        out = self(x)
        return {"loss": torch.nn.functional.cross_entropy(out, y)}


def test_test_batch_outputs_come_from_the_pass_itself_with_a_custom_test_step(blobs):
    x, y = blobs
    seen = []

    class Outputs(Callback):
        def on_test_batch_outputs(self, batch, x, y, y_pred):
            seen.append((batch, x, y, y_pred))

    model = PlainTestStep(make_model().module)
    model.compile("adam", "sparse_categorical_crossentropy", device="cpu")
    model.evaluate(x, y, batch_size=100, verbose=0, callbacks=[Outputs()])
    assert [b for b, *_ in seen] == [0, 1, 2]
    np.testing.assert_array_equal(torch.cat([b[1] for b in seen]).numpy(), x)
    np.testing.assert_array_equal(torch.cat([b[2] for b in seen]).numpy(), y)
    expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(torch.cat([b[3] for b in seen]).numpy(), expected, rtol=1e-6)


def test_prediction_logger_works_with_a_custom_test_step(blobs, tmp_path):
    """It used to see nothing (silently) when test_step was overridden."""
    x, y = blobs
    model = PlainTestStep(make_model().module)
    model.compile("adam", "sparse_categorical_crossentropy", device="cpu")
    logger = PredictionLogger(tmp_path / "p", num_samples=4, num_worst=2)
    model.fit(x, y, epochs=1, validation_split=0.25, verbose=0, callbacks=[logger])
    with open(tmp_path / "p" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    samples = [r for r in rows if r["kind"] == "sample"]
    assert [int(r["index"]) for r in samples] == [0, 1, 2, 3]
    assert [int(r["target"]) for r in samples] == list(y[180:184])


def test_at_step_boundary_waits_for_the_end_of_the_accumulation_group(blobs):
    x, y = blobs
    model = make_model(gradient_accumulation_steps=3)
    ran = []

    class Ask(Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 0:
                loop = self.model.loop
                loop.at_step_boundary(lambda: ran.append(("batch", loop.batch, loop.accumulating)))

        def on_epoch_end(self, epoch, logs=None):
            self.model.loop.at_step_boundary(lambda: ran.append(("epoch", epoch, events[:])))

    events = []

    class After(Callback):
        def on_epoch_end(self, epoch, logs=None):
            events.append(epoch)

    model.fit(x, y, batch_size=40, epochs=1, verbose=0, callbacks=[Ask(), After()])
    assert ran == [("batch", 2, False), ("epoch", 0, [0])]  # after every on_epoch_end


def test_a_requested_interrupt_reaches_the_handler_between_optimizer_steps(blobs):
    x, y = blobs
    model = make_model(gradient_accumulation_steps=2)
    handled = []

    class Interrupts(Callback):
        def on_train_begin(self, logs=None):
            self.model.loop.interrupt_handler = self.handle

        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                self.model.loop.request_interrupt(7)

        def handle(self, code):
            loop = self.model.loop
            handled.append((code, loop.batch, loop.optimizer_steps))
            self.stop_training("interrupted")

    history = model.fit(x, y, batch_size=40, epochs=2, verbose=0, callbacks=[Interrupts()])
    assert handled == [(7, 3, 2)]  # batch 2 opened a group; batch 3 closed it
    assert history.epoch == [0] and history.stop_reason == "Interrupts: interrupted"


def test_no_handler_means_a_request_does_nothing(blobs):
    x, y = blobs

    class Asks(Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.model.loop.request_interrupt(7)

    history = make_model().fit(x, y, epochs=2, verbose=0, callbacks=[Asks()])
    assert history.epoch == [0, 1]


def test_train_batches_end_comes_after_the_last_batch_and_before_validation(blobs):
    x, y = blobs
    order = []

    class Order(Callback):
        def on_train_batch_end(self, batch, logs=None):
            order.append(("batch", batch, self.model.loop.optimizer_steps))

        def on_train_batches_end(self, epoch):
            order.append(("batches_end", epoch, self.model.loop.optimizer_steps))

        def on_test_begin(self, logs=None):
            order.append(("test",))

    model = make_model(gradient_accumulation_steps=4)
    model.fit(x, y, batch_size=60, epochs=1, validation_split=0.25, verbose=0,
              callbacks=[Order()])  # fmt: skip
    # 180 samples: 3 batches, one short group, stepped before the hook
    assert order == [("batch", 0, 0), ("batch", 1, 0), ("batch", 2, 1),
                     ("batches_end", 0, 1), ("test",)]  # fmt: skip


@pytest.mark.parametrize("hook", ["at_step_boundary", "training_state", "interrupt_handler"])
def test_loop_requests_outside_fit_say_so(hook):
    loop = make_model().loop
    with pytest.raises(RuntimeError, match="inside Model.fit"):
        if hook == "interrupt_handler":
            loop.interrupt_handler = print
        elif hook == "training_state":
            loop.training_state()
        else:
            loop.at_step_boundary(print)
