"""LambdaCallback: functions as hooks, extra keywords become hooks too."""

from __future__ import annotations

from conftest import make_model

from torcheras.callbacks import LambdaCallback


def test_lambda_hooks_receive_keras_arguments(blobs):
    x, y = blobs
    calls = []
    cb = LambdaCallback(
        on_train_begin=lambda logs: calls.append(("train_begin", logs)),
        on_epoch_end=lambda epoch, logs: calls.append(("epoch_end", epoch, round(logs["loss"], 9))),
        on_train_batch_end=lambda batch, logs: calls.append(("batch_end", batch)),
        on_test_begin=lambda logs: calls.append(("test_begin",)),
    )
    history = make_model().fit(
        x, y, epochs=2, batch_size=120, validation_data=(x, y), verbose=0, callbacks=[cb]
    )
    assert calls[0] == ("train_begin", {})
    assert [c for c in calls if c[0] == "batch_end"] == [("batch_end", 0), ("batch_end", 1)] * 2
    assert [c for c in calls if c[0] == "test_begin"] == [("test_begin",)] * 2
    assert [c[2] for c in calls if c[0] == "epoch_end"] == [
        round(v, 9) for v in history.history["loss"]
    ]


def test_lambda_on_batch_end_alias_fires_for_training_batches_only(blobs):
    x, y = blobs
    batches = []
    cb = LambdaCallback(on_batch_end=lambda batch, logs: batches.append(batch))
    model = make_model()
    model.fit(x, y, epochs=1, batch_size=120, validation_data=(x, y), verbose=0, callbacks=[cb])
    model.evaluate(x, y, verbose=0, callbacks=[cb])
    assert batches == [0, 1]
