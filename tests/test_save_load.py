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
    assert type(fresh.optimizer) is torcheras.optimizers.KerasAdam  # "adam" by name
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


@pytest.mark.parametrize("name", ["w.pt", "w.safetensors"])
def test_save_weights_writes_a_plain_state_dict_that_pytorch_reads(tmp_path, blobs, name):
    """PyTorch's own `net.load_state_dict(torch.load(path))` reads save_weights' file: the
    wrapped network's keys, no `module.` prefix, no wrapper dict."""
    x, y = blobs
    model = make_model()
    model.fit(x, y, epochs=1, verbose=0)
    model.save_weights(tmp_path / name)
    if name.endswith(".pt"):
        from collections import OrderedDict

        saved = torch.load(tmp_path / name, weights_only=True)
        assert list(saved) == list(model.module.state_dict())  # torch's order too
        assert isinstance(saved, (dict, OrderedDict))
    else:
        from safetensors.torch import load_file

        saved = load_file(str(tmp_path / name))
    net = make_model().module
    net.load_state_dict(saved)
    for mine, theirs in zip(net.parameters(), model.module.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    other = make_model()
    other.load_weights(tmp_path / name)  # and torcheras reads it back
    np.testing.assert_allclose(other.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)


def test_load_weights_reads_both_key_forms(tmp_path, blobs):
    """Files of either form load: the network's own keys, and the Model's (`module.` first)
    that earlier releases wrote, into a Model or into a Model subclass without `module`."""
    x, _ = blobs
    model = make_model()
    torch.save(model.state_dict(), tmp_path / "prefixed.pt")  # module.0.weight, ...
    torch.save(model.module.state_dict(), tmp_path / "plain.pt")  # 0.weight, ...
    for name in ("prefixed.pt", "plain.pt"):
        other = make_model()
        other.load_weights(tmp_path / name)
        np.testing.assert_allclose(
            other.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6
        )


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


# ---- one family of files: saved models, full ModelCheckpoint files and backups ---------------

DATA = os.path.join(os.path.dirname(__file__), "data")
FORMAT_V1 = os.path.join(DATA, "format_v1")


def _fit_with_everything(model, x, y, epochs, callbacks=()):
    return model.fit(x, y, epochs=epochs, batch_size=48, shuffle=False, verbose=0,
                     callbacks=list(callbacks))  # fmt: skip


def _everything_model(seed=0, **compile_kwargs):
    """More than weights: the compiled Adam, a second optimizer kept on the model, a
    scheduler (and the weight average, when asked)."""
    torch.manual_seed(seed)
    model = make_model(**compile_kwargs)
    model.scheduler = torch.optim.lr_scheduler.StepLR(model.optimizer, 1, gamma=0.5)
    model.extra_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    model.extra_optimizer.param_groups[0]["params"][0].grad = torch.ones(2)
    model.extra_optimizer.step()
    model.scheduler.step()
    return model


def test_model_load_continues_training_from_a_full_model_checkpoint_file(tmp_path, blobs):
    """A full ModelCheckpoint file is a saved model: Model.load gives back the weights, every
    optimizer and the scheduler, and training continues as if unbroken."""
    x, y = blobs
    model = _everything_model()
    path = tmp_path / "ckpt" / "epoch{epoch}.pt"
    _fit_with_everything(model, x, y, 2, [torcheras.callbacks.ModelCheckpoint(str(path))])
    saved = checkpoint.load(tmp_path / "ckpt" / "epoch2.pt")
    assert saved["kind"] == "model" and saved["epoch"] == 1
    assert set(saved["optimizers"]) == {"optimizer", "extra_optimizer"}
    expected = _continue(model, x, y)

    fresh = _everything_model(seed=1)  # other weights and moments
    fresh.extra_optimizer.step()
    fresh.load(tmp_path / "ckpt" / "epoch2.pt")
    assert fresh.extra_optimizer.state_dict() == model.extra_optimizer.state_dict()
    assert fresh.scheduler.last_epoch == 1 and fresh.learning_rate == pytest.approx(0.01)
    got = _continue(fresh, x, y)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-7)


def test_a_model_checkpoint_file_brings_back_the_weight_average(tmp_path, blobs):
    x, y = blobs
    model = make_model(ema_momentum=0.9)
    _fit_with_everything(model, x, y, 1, [torcheras.callbacks.ModelCheckpoint(tmp_path / "c.pt")])
    fresh = make_model(ema_momentum=0.9)
    fresh.load(tmp_path / "c.pt")
    assert fresh.ema.updates == model.ema.updates == 5
    for mine, theirs in zip(fresh.ema.average, model.ema.average):
        assert torch.equal(mine, theirs)


def test_an_uncompiled_model_loads_a_model_checkpoint_file_and_compiles_from_it(tmp_path, blobs):
    x, y = blobs
    model = make_model(metrics=["accuracy"])
    _fit_with_everything(model, x, y, 1, [torcheras.callbacks.ModelCheckpoint(tmp_path / "c.pt")])
    fresh = torcheras.Model(make_model().module)
    fresh.load(tmp_path / "c.pt")
    assert type(fresh.optimizer) is torcheras.optimizers.KerasAdam and fresh.metrics_names == [
        "loss",
        "accuracy",
    ]
    np.testing.assert_allclose(fresh.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)


def test_weights_only_checkpoints_stay_weights_only(tmp_path, blobs):
    x, y = blobs
    model = make_model()
    callback = torcheras.callbacks.ModelCheckpoint(tmp_path / "w.pt", save_weights_only=True)
    _fit_with_everything(model, x, y, 1, [callback])
    saved = checkpoint.load(tmp_path / "w.pt")
    assert saved["kind"] == "weights" and "optimizers" not in saved
    with pytest.raises(ValueError, match="load it with load_weights"):
        make_model().load(tmp_path / "w.pt")


def test_model_load_reads_a_backup(tmp_path, blobs):
    """A backup holds the model's whole state too: Model.load takes the weights and Adam's
    moments from it (the loop's position stays BackupAndRestore's business)."""
    x, y = blobs
    model = make_model()
    backup = torcheras.callbacks.BackupAndRestore(tmp_path / "b", delete_checkpoint=False)
    _fit_with_everything(model, x, y, 1, [backup])
    fresh = make_model()
    fresh.load(tmp_path / "b" / "latest.pt")
    np.testing.assert_allclose(fresh.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
    moments = fresh.optimizer.state_dict()["state"]
    assert moments.keys() == model.optimizer.state_dict()["state"].keys()


def _v1_model():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    model = torcheras.Model(net)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"], device="cpu",
                  ema_momentum=0.9)  # fmt: skip
    return model


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("name", ["model.pt", "checkpoint.pt", "backup.pt"])
def test_files_of_every_format_still_load(name, version):
    """Files written by earlier releases (tests/data/make_files.py): a saved model,
    a full ModelCheckpoint file (format 1: 'checkpoint', one 'optimizer'), a backup."""
    folder = os.path.join(DATA, f"format_v{version}")
    path = os.path.join(folder, name)
    raw = torch.load(path, weights_only=True)
    assert raw["version"] == version
    model = _v1_model() if version == 1 or name != "checkpoint.pt" else None
    if model is None:  # format 2 records the compile settings: a bare model loads it
        model = torcheras.Model(torch.nn.Sequential(torch.nn.Linear(4, 3)))
    model.load(path)
    for key, value in raw["model"].items():
        assert torch.equal(model.state_dict()[key], value), key
    opt = raw["optimizers"]["optimizer"] if "optimizers" in raw else raw["optimizer"]
    state = model.optimizer.state_dict()["state"]
    for index, moments in opt["state"].items():
        assert torch.equal(state[index]["exp_avg"], moments["exp_avg"])
    if "ema" in raw:  # format 1's ModelCheckpoint kept no weight average
        assert model.ema.updates == raw["ema"]["updates"]
    other = _v1_model()
    other.load_weights(os.path.join(folder, "weights.pt"))
    assert other.state_dict().keys() == raw["model"].keys()


def test_a_format_1_checkpoint_needs_a_compiled_model_and_says_so():
    with pytest.raises(ValueError, match="compile this model first"):
        torcheras.Model(torch.nn.Sequential(torch.nn.Linear(4, 3))).load(
            os.path.join(FORMAT_V1, "checkpoint.pt")
        )


@pytest.mark.parametrize("name", ["model.pt", "checkpoint.pt", "backup.pt"])
def test_inspect_shows_every_optimizer_of_every_kind_of_file(name, tmp_path, blobs):
    info = checkpoint.describe(os.path.join(FORMAT_V1, name))
    assert info["optimizers"]["optimizer"]["lr"] == [pytest.approx(0.001)]
    assert info["optimizers"]["optimizer"]["steps"] >= 3
    x, y = blobs
    model = _everything_model(ema_momentum=0.9)
    model.fit(x, y, epochs=1, batch_size=48, verbose=0, callbacks=[
        torcheras.callbacks.ModelCheckpoint(tmp_path / "c.pt"),
        torcheras.callbacks.BackupAndRestore(tmp_path / "b", delete_checkpoint=False),
    ])  # fmt: skip
    model.save(tmp_path / "m.pt")
    for path in (tmp_path / "c.pt", tmp_path / "b" / "latest.pt", tmp_path / "m.pt"):
        info = checkpoint.describe(path)
        assert set(info["optimizers"]) == {"optimizer", "extra_optimizer"}, path
        assert info["optimizers"]["optimizer"]["class"] == "KerasAdam"
        assert info["optimizers"]["optimizer"]["steps"] == 5
        assert info["optimizers"]["extra_optimizer"]["lr"] == [0.1]
        assert info["ema"]["average"] == "<4 tensors>"  # not printed tensor by tensor


def test_a_file_saved_on_the_weight_average_continues_training_on_the_weights(tmp_path, blobs):
    """SwapEMAWeights(swap_on_epoch=True) saves the average in the model: Model.load then
    fit trains on the weights again (it raised: EMA swapped during a training step)."""
    x, y = blobs
    model = make_model(ema_momentum=0.9)
    model.fit(x, y, epochs=1, batch_size=48, verbose=0, callbacks=[
        torcheras.callbacks.SwapEMAWeights(swap_on_epoch=True),
        torcheras.callbacks.ModelCheckpoint(tmp_path / "c.pt"),
    ])  # fmt: skip
    saved = checkpoint.load(tmp_path / "c.pt")
    assert saved["ema"]["swapped"]
    fresh = make_model(ema_momentum=0.9)
    fresh.load(tmp_path / "c.pt")
    fresh.fit(x, y, epochs=1, batch_size=48, verbose=0)
    assert fresh.ema.updates == 10 and not fresh.ema.swapped
