"""Files: save/load round-trips training, errors say what happened, writes never clash."""

from __future__ import annotations

import io
import os
import stat
import threading
import time

import numpy as np
import pytest
import torch
from conftest import make_model

import torcheras
from torcheras import checkpoint


def _continue(model, x, y, epochs=2):
    model.fit(x, y, epochs=epochs, batch_size=40, shuffle=False, verbose=0)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("compiled", [True, False])
def test_save_and_load_continue_training_identically(tmp_path, blobs, compiled):
    """Fit 2 epochs, save; a fresh model that loads it and fits 2 more epochs ends with the
    weights of the original fitted 2 more epochs (Adam's moments and the schedule came back)."""
    x, y = blobs
    model = make_model(metrics=["accuracy"])
    if compiled:  # a scheduler kept on the model travels too (the fresh one needs its own)
        model.scheduler = torch.optim.lr_scheduler.StepLR(model.optimizer, 1, gamma=0.5)
    model.fit(x, y, epochs=2, batch_size=40, shuffle=False, verbose=0)
    if compiled:
        model.scheduler.step()
        model.scheduler.step()
    model.save(tmp_path / "model.pt")
    moments = {k: v["exp_avg"].clone() for k, v in model.optimizer.state_dict()["state"].items()}
    expected = _continue(model, x, y)

    fresh = torcheras.Model(make_model().module)  # same network, other weights
    if compiled:
        fresh.compile("adam", "sparse_categorical_crossentropy", ["accuracy"], device="cpu")
        fresh.scheduler = torch.optim.lr_scheduler.StepLR(fresh.optimizer, 1, gamma=0.5)
    fresh.load(tmp_path / "model.pt")
    assert fresh.metrics_names == ["loss", "accuracy"]
    assert type(fresh.optimizer) is torch.optim.Adam
    loaded = fresh.optimizer.state_dict()["state"]  # Adam's moments came back
    assert loaded.keys() == moments.keys() and len(moments) == 4
    for key, moment in moments.items():
        assert torch.equal(loaded[key]["exp_avg"], moment)
    if compiled:
        assert fresh.scheduler.last_epoch == 2
        assert fresh.learning_rate == pytest.approx(0.02 * 0.25)
    else:
        assert fresh.learning_rate == pytest.approx(0.02)
    got = _continue(fresh, x, y)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-7)


def test_load_weights_stays_weights_only_and_load_refuses_weights_files(tmp_path, blobs):
    x, y = blobs
    model = make_model()
    model.fit(x, y, epochs=1, verbose=0)
    model.save_weights(tmp_path / "w.pt")
    model.save(tmp_path / "m.pt")
    other = make_model()
    other.load_weights(tmp_path / "m.pt")  # weights from a full save
    np.testing.assert_allclose(other.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
    assert not other.optimizer.state_dict()["state"]  # weights only: no Adam moments
    with pytest.raises(ValueError, match="load it with load_weights"):
        other.load(tmp_path / "w.pt")


def test_loading_a_model_compiled_with_objects_needs_the_same_compile(tmp_path):
    model = make_model(loss=torch.nn.CrossEntropyLoss())
    model.save(tmp_path / "m.pt")
    with pytest.raises(ValueError, match="compile this model the same way"):
        torcheras.Model(make_model().module).load(tmp_path / "m.pt")


def test_a_missing_file_is_file_not_found(tmp_path):
    model = make_model()
    for load in (model.load_weights, model.load, checkpoint.load):
        with pytest.raises(FileNotFoundError, match="No checkpoint at"):
            load(tmp_path / "nope.pt")


@pytest.mark.parametrize(
    "content",
    [os.urandom(2000), b"epoch,loss\n0,1.0\n1,0.5\n", b"", b"\0" * 100, "truncated"],
    ids=["random", "csv", "empty", "zeros", "truncated"],
)
def test_garbage_given_to_load_weights_says_not_a_checkpoint_or_corrupt(tmp_path, content):
    path = tmp_path / "w.pt"
    if content == "truncated":
        make_model().save(path)
        content = path.read_bytes()[: len(path.read_bytes()) // 2]
    path.write_bytes(content)
    with pytest.raises(checkpoint.CheckpointError) as info:
        make_model().load_weights(path)
    message = str(info.value)
    assert "not a torcheras/torch checkpoint or corrupt" in message and str(path) in message
    assert "run code" not in message and "weights_only=False" not in message


def test_a_parent_that_is_a_file_is_named(tmp_path):
    parent = tmp_path / "ckpt"
    parent.write_text("I am a file")
    with pytest.raises(checkpoint.CheckpointError, match=r"ckpt' is a file, not a folder"):
        make_model().save(parent / "best.pt")
    assert parent.read_text() == "I am a file"


def test_saved_files_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        make_model().save(tmp_path / "m.pt")
        make_model().save_weights(tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    for name in ("m.pt", "w.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644


def test_two_concurrent_saves_to_one_target_both_succeed(tmp_path):
    target = tmp_path / "state.pt"
    barrier = threading.Barrier(2)
    errors = []

    def slow_write(tag):
        def write(handle):
            barrier.wait(timeout=10)  # both temp files exist now
            time.sleep(0.05)
            handle.write(tag)

        try:
            checkpoint.atomic_write(target, write)
        except Exception as exc:  # pragma: no cover - what the test guards against
            errors.append(exc)

    threads = [threading.Thread(target=slow_write, args=(t,)) for t in (b"first", b"second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert target.read_bytes() in (b"first", b"second")
    assert os.listdir(tmp_path) == ["state.pt"]


def test_save_streams_into_the_temp_file(tmp_path, monkeypatch):
    destinations = []
    real_save = torch.save

    def recording_save(obj, f, *args, **kwargs):
        destinations.append(type(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", recording_save)
    make_model().save(tmp_path / "m.pt")
    assert destinations and all(d is not io.BytesIO for d in destinations)
    assert checkpoint.load(tmp_path / "m.pt")["kind"] == "model"
