"""History: a new one per fit, Keras's accumulation rules."""

from __future__ import annotations

from conftest import make_model

from torcheras.callbacks import History


def test_new_history_per_fit(blobs):
    x, y = blobs
    model = make_model()
    h1 = model.fit(x, y, epochs=2, verbose=0)
    h2 = model.fit(x, y, epochs=1, verbose=0)
    assert h1 is not h2 and h1.epoch == [0, 1] and h2.epoch == [0]
    assert model.history is h2 and len(h1.history["loss"]) == 2


def test_user_history_accumulates_across_fits(blobs):
    x, y = blobs
    model = make_model()
    history = History()
    model.fit(x, y, epochs=2, verbose=0, callbacks=[history])
    returned = model.fit(x, y, epochs=1, verbose=0, callbacks=[history])
    assert returned is history and model.history is history
    assert history.epoch == [0] and len(history.history["loss"]) == 3


def test_recompiling_with_other_metrics_changes_keys(blobs):
    x, y = blobs
    model = make_model(metrics=["sparse_top_k_categorical_accuracy"])
    assert sorted(model.fit(x, y, epochs=1, verbose=0).history) == [
        "learning_rate",
        "loss",
        "sparse_top_k_categorical_accuracy",
    ]
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    assert sorted(model.fit(x, y, epochs=1, verbose=0).history) == [
        "accuracy",
        "learning_rate",
        "loss",
    ]


def test_history_drives_a_plain_module_in_a_hand_written_loop(tmp_path):
    import json

    import torch

    from torcheras.callbacks import CallbackList, History

    net = torch.nn.Linear(3, 1)
    net.optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    history = History()
    callbacks = CallbackList([history], model=net, epochs=2, steps=1, verbose=0)
    callbacks.on_train_begin()
    for epoch in range(2):
        callbacks.on_epoch_begin(epoch)
        callbacks.on_epoch_end(epoch, {"loss": 1.0 / (epoch + 1)})
    callbacks.on_train_end()
    saved = json.loads(history.save(tmp_path / "h.json").read_text())
    assert saved["history"] == {"loss": [1.0, 0.5]} and saved["stop_reason"] is None
    assert saved["hyperparameters"]["optimizer"] == "SGD"
    assert saved["hyperparameters"]["lr"] == 0.5 and saved["hyperparameters"]["parameters"] == 4
