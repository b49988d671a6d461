"""ModelCheckpoint: file names, best-only, formats, batch frequency, atomic files."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from conftest import drive, make_model

import torcheras
from torcheras import checkpoint
from torcheras.callbacks import Callback, CallbackList, LambdaCallback, ModelCheckpoint


def test_every_epoch_with_formatted_names(tmp_path, blobs):
    x, y = blobs
    model = make_model()
    path = str(tmp_path / "ckpt" / "{epoch:02d}-{val_loss:.2f}.pt")
    model.fit(x, y, epochs=3, validation_split=0.2, verbose=0, callbacks=[ModelCheckpoint(path)])
    names = sorted(os.listdir(tmp_path / "ckpt"))
    assert [n[:3] for n in names] == ["01-", "02-", "03-"]
    state = torch.load(tmp_path / "ckpt" / names[-1], weights_only=True)
    assert state["epoch"] == 2 and set(state) >= {"model", "optimizers", "logs"}
    assert state["kind"] == "model"  # a saved model: Model.load continues training from it
    assert state["logs"]["val_loss"] == pytest.approx(model.history.history["val_loss"][-1])
    fresh = make_model()
    fresh.load_weights(tmp_path / "ckpt" / names[-1])
    np.testing.assert_allclose(fresh.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)


def test_save_best_only_keeps_the_best_epoch(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    ckpt = ModelCheckpoint(str(path), save_best_only=True)
    saved_at = []
    original = torcheras.state.save_model

    def spy(model, filepath, **kwargs):
        saved_at.append(kwargs["epoch"])
        return original(model, filepath, **kwargs)

    monkeypatch.setattr(torcheras.state, "save_model", spy)
    drive(ckpt, [0.5, 0.6, 0.4, 0.4, 0.45])
    assert saved_at == [0, 2] and ckpt.best == 0.4
    assert torch.load(path, weights_only=True)["epoch"] == 2


def test_best_only_verbose_messages(tmp_path, capsys):
    ckpt = ModelCheckpoint(str(tmp_path / "m.pt"), save_best_only=True, verbose=1)
    drive(ckpt, [0.5, 0.6])
    out = capsys.readouterr().out
    assert (
        f"Epoch 1: val_loss improved from None to 0.50000, saving model to {tmp_path}/m.pt" in out
    )
    assert "Epoch 2: val_loss did not improve from 0.50000" in out


def test_best_kept_across_fits_and_initial_value_threshold(tmp_path):
    ckpt = ModelCheckpoint(str(tmp_path / "m.pt"), save_best_only=True)
    drive(ckpt, [0.5])
    drive(ckpt, [0.6])
    assert ckpt.best == 0.5
    ckpt = ModelCheckpoint(str(tmp_path / "t.pt"), save_best_only=True, initial_value_threshold=0.3)
    drive(ckpt, [0.5, 0.4])
    assert not (tmp_path / "t.pt").exists()


def test_max_mode_for_accuracy(tmp_path):
    ckpt = ModelCheckpoint(str(tmp_path / "m.pt"), monitor="val_accuracy", save_best_only=True)
    drive(ckpt, [0.5, 0.7, 0.6], monitor="val_accuracy")
    assert ckpt.best == 0.7


def test_missing_monitor_warns_and_does_not_save(tmp_path):
    ckpt = ModelCheckpoint(str(tmp_path / "m.pt"), monitor="val_acc", save_best_only=True)
    with pytest.warns(UserWarning, match="did not save.*`val_acc` which is not available"):
        drive(ckpt, [0.5], monitor="val_accuracy")
    assert not (tmp_path / "m.pt").exists()


def test_weights_only_and_safetensors(tmp_path, blobs):
    x, y = blobs
    model = make_model()
    model.fit(
        x,
        y,
        epochs=1,
        verbose=0,
        callbacks=[
            ModelCheckpoint(str(tmp_path / "w.pt"), save_weights_only=True),
            ModelCheckpoint(str(tmp_path / "w.safetensors"), save_weights_only=True),
        ],
    )
    state = torch.load(tmp_path / "w.pt", weights_only=True)
    assert "optimizer" not in state and state["epoch"] == 0
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "w.safetensors"))
    for weights in (state["model"], tensors):  # the network's own keys: plain PyTorch reads them
        assert set(weights) == set(model.module.state_dict())
        make_model().module.load_state_dict(weights)
    for name in ("w.pt", "w.safetensors"):
        other = make_model()
        other.load_weights(tmp_path / name)
        assert torch.equal(other.module[0].weight, model.module[0].weight)


def test_save_freq_counts_batches_across_epochs(tmp_path, blobs):
    x, y = blobs  # 240 samples, batch 50 -> 5 batches per epoch
    path = str(tmp_path / "e{epoch}-b{batch}.pt")
    make_model().fit(
        x,
        y,
        epochs=2,
        batch_size=50,
        verbose=0,
        callbacks=[ModelCheckpoint(path, save_freq=3, monitor="loss")],
    )
    # global batches 3, 6, 9 -> epoch 1 batch 3, epoch 2 batch 1, epoch 2 batch 4
    assert sorted(os.listdir(tmp_path)) == ["e1-b3.pt", "e2-b1.pt", "e2-b4.pt"]


def test_unknown_placeholder_names_the_key(tmp_path):
    ckpt = ModelCheckpoint(str(tmp_path / "{val_acc:.2f}.pt"))
    with pytest.raises(
        KeyError,
        match=r'Failed to format this callback filepath: ".*"\. '
        r"Reason: .*val_acc.*Available keys: epoch, loss",
    ):
        drive(ckpt, [0.5])


def test_directory_as_filepath_is_an_error_and_nothing_is_lost(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "keep.txt").write_text("x")
    ckpt = ModelCheckpoint(str(tmp_path / "dir"))
    with pytest.raises(OSError, match="is an existing directory"):
        drive(ckpt, [0.5])
    assert (tmp_path / "dir" / "keep.txt").read_text() == "x"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"save_freq": "batch"}, "Unrecognized save_freq: 'batch'"),
        ({"save_freq": 0}, "Unrecognized save_freq"),
        ({"filepath": "m.safetensors"}, "holds weights only; pass save_weights_only=True"),
        ({"filepath": ""}, "`filepath` is empty"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelCheckpoint(**{"filepath": "m.pt", **kwargs})


def test_hand_written_loop_with_early_stopping_and_checkpoint(tmp_path):
    """A plain nn.Module and optimizer, driven by CallbackList."""
    from torcheras.callbacks import EarlyStopping

    net = torch.nn.Linear(3, 1)
    net.optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    ckpt = ModelCheckpoint(str(tmp_path / "best.pt"), save_best_only=True)
    stop = EarlyStopping(patience=1, restore_best_weights=True)
    cbs = CallbackList([stop, ckpt], model=net, epochs=20)
    net.stop_training = False
    val = [1.0, 0.8, 0.6, 0.7, 0.9, 0.5]
    cbs.on_train_begin()
    for epoch in range(20):
        cbs.on_epoch_begin(epoch)
        with torch.no_grad():
            net.weight.fill_(float(epoch))
        cbs.on_epoch_end(epoch, {"val_loss": val[epoch]})
        if net.stop_training:
            break
    cbs.on_train_end()
    assert stop.stopped_epoch == 3
    assert net.weight[0, 0].item() == 2.0  # restored to the best epoch
    saved = torch.load(tmp_path / "best.pt", weights_only=True)
    assert saved["epoch"] == 2 and float(saved["model"]["weight"][0, 0]) == 2.0
    assert "optimizer" in saved["optimizers"]


def test_batch_saves_use_batch_logs(tmp_path, blobs):
    x, y = blobs
    seen = []
    probe = LambdaCallback(on_train_batch_end=lambda b, logs: seen.append(b))
    make_model().fit(
        x,
        y,
        epochs=1,
        batch_size=120,
        verbose=0,
        callbacks=[probe, ModelCheckpoint(str(tmp_path / "{batch}-{loss:.3f}.pt"), save_freq=1)],
    )
    assert len(os.listdir(tmp_path)) == 2 and seen == [0, 1]


# ---- background writes -------------------------------------------------------------------------


def test_a_background_save_holds_the_weights_of_its_epoch_not_later_ones(tmp_path, blobs):
    """The state is copied before training goes on: the file written while the next epoch
    trains holds the epoch's weights."""
    x, y = blobs
    model = make_model()
    at_epoch_end = {}

    class Remember(Callback):
        def on_epoch_end(self, epoch, logs=None):
            at_epoch_end[epoch] = model.get_weights()

    path = tmp_path / "ep{epoch}.pt"
    model.fit(x, y, epochs=3, verbose=0, callbacks=[ModelCheckpoint(str(path)), Remember()])
    for epoch in range(3):
        saved = checkpoint.load(tmp_path / f"ep{epoch + 1}.pt")["model"]
        for key, value in at_epoch_end[epoch].items():
            assert torch.equal(saved[key], value), (epoch, key)


def test_saves_run_one_at_a_time_and_fit_returns_after_the_last(tmp_path, blobs, monkeypatch):
    x, y = blobs
    real_write, spans = checkpoint.atomic_write, []

    def slow_write(path, write):
        start = time.perf_counter()
        time.sleep(0.05)
        result = real_write(path, write)
        spans.append((start, time.perf_counter()))
        return result

    monkeypatch.setattr(checkpoint, "atomic_write", slow_write)
    make_model().fit(
        x, y, epochs=3, verbose=0, callbacks=[ModelCheckpoint(str(tmp_path / "e{epoch}.pt"))]
    )
    returned = time.perf_counter()
    assert len(spans) == 3  # every write landed before fit returned
    assert all(end <= returned for _, end in spans)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))


def test_a_failed_background_save_fails_fit_loudly(tmp_path, blobs):
    x, y = blobs
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(checkpoint.CheckpointError, match="file"):
        make_model().fit(
            x,
            y,
            epochs=2,
            verbose=0,
            callbacks=[ModelCheckpoint(str(tmp_path / "file" / "best.pt"))],
        )
