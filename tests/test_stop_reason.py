"""Why did training stop? History.stop_reason and a verbose fit's last line."""

from __future__ import annotations

import numpy as np
import torch
from conftest import make_model

from torcheras import callbacks as cb


def test_early_stopping_names_the_metric_the_best_epoch_and_the_restore(blobs, capsys):
    x, y = blobs
    model = make_model()
    stop = cb.EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    model.compile(torch.optim.SGD(model.parameters(), lr=0.0), "sparse_categorical_crossentropy")
    history = model.fit(x, y, epochs=10, validation_split=0.25, callbacks=[stop], verbose=2)
    best = min(history.history["val_loss"])  # lr 0: val_loss is flat, so epoch 1 is the best
    assert history.epoch == [0, 1, 2]
    assert history.stop_reason == (
        f"EarlyStopping: val_loss did not improve for 2 epochs; best {best:.4g} at epoch 1; "
        "weights restored from epoch 1"
    )
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == f"Stopped: {history.stop_reason}"


def test_terminate_on_nan_names_the_epoch_and_the_batch(blobs):
    x, y = blobs
    x = x.copy()
    x[32 * 4 + 5] = np.nan  # batch 4 of the second epoch's unshuffled order
    model = make_model()
    history = model.fit(
        x, y, epochs=3, batch_size=32, shuffle=False, callbacks=[cb.TerminateOnNaN()], verbose=0
    )
    assert history.stop_reason == "TerminateOnNaN: loss was nan at epoch 1, batch 4"


def test_all_epochs_run_gives_no_reason_and_no_line(blobs, capsys):
    x, y = blobs
    history = make_model().fit(x, y, epochs=2, verbose=2)
    assert history.stop_reason is None
    assert "Stopped" not in capsys.readouterr().out


def test_a_keras_style_stop_without_a_reason_says_where(blobs):
    x, y = blobs
    model = make_model()

    def stop(batch, logs):
        if model.loop.epoch == 1 and batch == 2:
            model.stop_training = True

    history = model.fit(
        x, y, epochs=5, batch_size=32, callbacks=[cb.LambdaCallback(on_train_batch_end=stop)],
        verbose=0,
    )  # fmt: skip
    assert history.stop_reason == "stop_training was set at epoch 2, batch 2"


def test_a_custom_callback_gives_its_reason_and_a_new_fit_starts_without_one(blobs):
    x, y = blobs

    class StopAtAccuracy(cb.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if logs["accuracy"] > 0.5:
                self.stop_training(f"accuracy {logs['accuracy']:.2f} > 0.5")

    model = make_model()
    history = model.fit(x, y, epochs=20, callbacks=[StopAtAccuracy()], verbose=0)
    assert history.stop_reason.startswith("StopAtAccuracy: accuracy ")
    assert model.fit(x, y, epochs=1, verbose=0).stop_reason is None


def test_data_that_runs_out_is_the_reason(blobs):
    x, y = blobs
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = make_model().fit(x, y, epochs=4, batch_size=40, steps_per_epoch=8, verbose=0)
    assert history.stop_reason.startswith("the training data ran out in epoch 1")
