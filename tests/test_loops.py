"""The loops: no per-batch reads from the device, accumulation, clipping, precision, jit, hooks."""

from __future__ import annotations

import collections
import copy
import os
import warnings

import numpy as np
import pytest
import torch
from conftest import make_model
from torch import nn
from torch.overrides import TorchFunctionMode

import torcheras
from torcheras import checkpoint, loops, stepping
from torcheras.callbacks import (
    BackupAndRestore,
    Callback,
    CSVLogger,
    EarlyStopping,
    LambdaCallback,
    LearningRateScheduler,
    ModelCheckpoint,
    ReduceLROnPlateau,
    TerminateOnNaN,
)

SRC = os.path.join(os.path.dirname(torcheras.__file__), "")
TO_PYTHON = {"__float__", "item", "tolist", "__bool__", "__int__", "__index__", "numpy"}


class CountConversions(TorchFunctionMode):
    """Counts tensor-to-Python conversions made by torcheras's own code (the optimizer's
    internal ``.item()`` on its CPU step counter is torch's, and a raw loop pays it too)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in TO_PYTHON:
            import sys

            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(SRC):
                self.count += 1
        return func(*args, **(kwargs or {}))


def typical(folder) -> list[Callback]:
    return [
        EarlyStopping(patience=5),
        ModelCheckpoint(str(folder / "best.pt"), save_best_only=True),
        ReduceLROnPlateau(patience=2),
        CSVLogger(folder / "log.csv"),
        TerminateOnNaN(),
    ]


def test_typical_callbacks_read_nothing_from_tensors_per_batch(tmp_path, blobs, monkeypatch):
    """The same number of conversions whether an epoch has 6 batches or 45: none per batch.
    TerminateOnNaN checks as on an accelerator (on the CPU, where a read waits for nothing,
    it reads one value every 32 batches)."""
    from torcheras.callbacks import terminate_on_nan

    monkeypatch.setattr(terminate_on_nan, "CPU_UNREAD", terminate_on_nan.MAX_UNREAD)
    x, y = blobs
    counts = []
    for batch_size in (32, 4):
        (tmp_path / str(batch_size)).mkdir()
        model = make_model()
        with CountConversions() as counter:
            model.fit(
                x,
                y,
                batch_size=batch_size,
                epochs=2,
                verbose=0,
                validation_split=0.25,
                callbacks=typical(tmp_path / str(batch_size)),
            )
        counts.append(counter.count)
    assert counts[0] == counts[1], f"conversions grow with the number of batches: {counts}"
    assert counts[0] <= 10  # a few per epoch: the epoch logs, validation, the first-batch check


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counting CUDA syncs needs CUDA")
def test_no_sync_per_batch_on_cuda_with_data_on_the_gpu(tmp_path, blobs):
    x, y = (torch.as_tensor(a, device="cuda") for a in blobs)
    counts = []
    for batch_size in (32, 4):
        (tmp_path / str(batch_size)).mkdir()
        model = make_model(device="cuda")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model.fit(
                    x,
                    y,
                    batch_size=batch_size,
                    epochs=2,
                    verbose=0,
                    validation_data=(x[:64], y[:64]),
                    callbacks=typical(tmp_path / str(batch_size)),
                )
        finally:
            torch.cuda.set_sync_debug_mode(0)
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert counts[0] == counts[1], f"syncs grow with the number of batches: {counts}"


# ---- gradient accumulation -----------------------------------------------------------------


def _sgd_model(seed=0):
    torch.manual_seed(seed)
    model = torcheras.Model(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)))
    return model


def _raw_sgd(x, y, batch_sizes, lr=0.1):
    """A raw loop: one SGD step per group of samples, on the mean loss of the group."""
    net = _sgd_model().module
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    start = 0
    for size in batch_sizes:
        xb, yb = torch.as_tensor(x[start : start + size]), torch.as_tensor(y[start : start + size])
        loss = torch.nn.functional.mse_loss(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        start += size
    return net


def test_accumulation_equals_training_on_the_groups_and_averages_a_short_last_group():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)).astype("float32")
    y = rng.normal(size=(40, 1)).astype("float32")
    model = _sgd_model()
    model.compile(torch.optim.SGD(model.parameters(), lr=0.1), "mse", device="cpu",
                  gradient_accumulation_steps=4)  # fmt: skip
    seen = []
    counter = LambdaCallback(
        on_train_batch_end=lambda b, logs: seen.append((b, model.loop.optimizer_steps))
    )
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[counter])
    # batch hooks per micro-batch; the optimizer steps after batch 3, and after batch 4 (the
    # epoch's last, which closes a group of one)
    assert seen == [(0, 0), (1, 0), (2, 0), (3, 1), (4, 2)]
    expected = _raw_sgd(x, y, [32, 8])
    for a, b in zip(model.module.parameters(), expected.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_accumulation_over_a_generator_steps_with_the_partial_group_at_the_epoch_end():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 4)).astype("float32")
    y = rng.normal(size=(40, 1)).astype("float32")

    def batches():
        for i in range(0, 40, 8):
            yield torch.as_tensor(x[i : i + 8]), torch.as_tensor(y[i : i + 8])

    model = _sgd_model()
    model.compile(torch.optim.SGD(model.parameters(), lr=0.1), "mse", device="cpu",
                  gradient_accumulation_steps=3)  # fmt: skip
    model.fit(batches(), epochs=1, verbose=0)
    assert (model.loop.global_step, model.loop.optimizer_steps) == (5, 2)
    expected = _raw_sgd(x, y, [24, 16])
    for a, b in zip(model.module.parameters(), expected.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_schedules_and_backups_count_optimizer_steps(tmp_path, blobs):
    x, y = blobs
    model = make_model(gradient_accumulation_steps=3)
    calls = []
    schedule = LearningRateScheduler(lambda step, lr: calls.append(step) or 0.01, interval="batch")
    model.fit(
        x[:96],
        y[:96],
        batch_size=8,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[
            schedule,
            BackupAndRestore(tmp_path / "b", save_freq=2, delete_checkpoint=False),
        ],
    )
    assert calls == [0, 1, 2, 3]  # 12 batches, 4 optimizer steps
    state = checkpoint.load(tmp_path / "b" / "latest.pt")
    assert (state["global_step"], state["optimizer_steps"]) == (12, 4)


def test_accumulation_steps_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        make_model(gradient_accumulation_steps=0)


# ---- clipping --------------------------------------------------------------------------------


def _one_sgd_step(**clip):
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    model = torcheras.Model(net)
    model.compile(torch.optim.SGD(net.parameters(), lr=1.0), "mse", device="cpu", **clip)
    before = [p.detach().clone() for p in net.parameters()]
    x = torch.randn(16, 3) * 10
    y = torch.randn(16, 2) * 10
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    applied = [b - p.detach() for b, p in zip(before, net.parameters())]  # lr 1: the gradient
    torch.manual_seed(0)
    ref = nn.Linear(3, 2)
    torch.nn.functional.mse_loss(ref(x), y).backward()
    return applied, ref


def test_clipnorm_clips_each_gradient_tensor_as_keras():
    applied, ref = _one_sgd_step(clipnorm=0.5)
    grads = [p.grad for p in ref.parameters()]
    for got, g in zip(applied, grads):
        expected = g * 0.5 / max(float(g.norm()), 0.5)  # Keras's clip_by_norm
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert float(got.norm()) == pytest.approx(min(float(g.norm()), 0.5), rel=1e-5)


def test_global_clipnorm_clips_all_gradients_together_as_torch():
    applied, ref = _one_sgd_step(global_clipnorm=0.5)
    assert float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)) > 1  # it did clip
    for got, want in zip(applied, [p.grad for p in ref.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert float(torch.cat([a.flatten() for a in applied]).norm()) == pytest.approx(0.5, rel=1e-4)


def test_clipvalue_clamps_each_element():
    applied, ref = _one_sgd_step(clipvalue=0.1)
    for got, g in zip(applied, [p.grad for p in ref.parameters()]):
        torch.testing.assert_close(got, g.clamp(-0.1, 0.1), rtol=1e-5, atol=1e-6)


def test_clipping_arguments_are_checked():
    with pytest.raises(ValueError, match="Set one of clipnorm, global_clipnorm and clipvalue"):
        make_model(clipnorm=1.0, global_clipnorm=1.0)
    with pytest.raises(ValueError, match="`clipvalue` must be a positive number"):
        make_model(clipvalue=-1)


# ---- precision --------------------------------------------------------------------------------


def test_unknown_precision_names_the_choices():
    with pytest.raises(ValueError, match="'32', 'bf16-mixed', '16-mixed'"):
        make_model(precision="fp8")


def test_bf16_mixed_trains_close_to_float32_and_predicts_float32(blobs, device):
    x, y = blobs
    results = {}
    for precision in ("32", "bf16-mixed"):
        torch.manual_seed(0)
        model = make_model(precision=precision, device=device)
        history = model.fit(x, y, epochs=3, verbose=0, shuffle=False)
        results[precision] = (history.history["loss"], model.predict(x))
    (loss32, pred32), (loss16, pred16) = results["32"], results["bf16-mixed"]
    assert pred16.dtype == pred32.dtype == np.float32
    np.testing.assert_allclose(loss16, loss32, rtol=0.05)  # bfloat16 keeps ~3 digits
    assert (pred16.argmax(1) == y).mean() > 0.9


class GradNorms(Callback):
    def __init__(self):
        self.norms = []

    def on_after_backward(self, batch):
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        self.norms.append(float(torch.cat([g.flatten() for g in grads]).norm()))


def test_float16_scales_the_loss_and_hooks_see_unscaled_gradients(blobs):
    x, y = blobs
    norms = {}
    for precision in ("32", "16-mixed"):
        torch.manual_seed(0)
        model = make_model(precision=precision)
        watch = GradNorms()
        model.fit(x, y, epochs=1, verbose=0, shuffle=False, callbacks=[watch])
        norms[precision] = watch.norms
    assert model.scaler is not None and model.scaler.get_scale() > 1  # the loss was scaled
    np.testing.assert_allclose(norms["16-mixed"][:3], norms["32"][:3], rtol=0.05)


def test_the_grad_scaler_state_is_saved_with_the_model_and_in_backups(tmp_path, blobs):
    x, y = blobs
    model = make_model(precision="16-mixed")
    model.fit(
        x,
        y,
        epochs=1,
        verbose=0,
        callbacks=[BackupAndRestore(tmp_path / "b", delete_checkpoint=False)],
    )
    state = model.scaler.state_dict()
    assert state["_growth_tracker"] == 8  # 8 steps without an overflow since the last growth
    model.save(tmp_path / "m.pt")
    other = make_model(precision="16-mixed")
    assert other.scaler.state_dict() != state
    other.load(tmp_path / "m.pt")
    assert other.scaler.state_dict() == state
    assert checkpoint.load(tmp_path / "b" / "latest.pt")["scaler"] == state


# ---- hooks, predict ------------------------------------------------------------------------


def test_an_error_in_validation_reaches_on_exception_once(blobs):
    x, y = blobs
    seen = []

    class Boom(Callback):
        def on_test_batch_end(self, batch, logs=None):
            raise RuntimeError("boom")

        def on_exception(self, exception):
            seen.append(type(exception).__name__)

    with pytest.raises(RuntimeError, match="boom"):
        make_model().fit(x, y, epochs=1, verbose=0, validation_split=0.25, callbacks=[Boom()])
    assert seen == ["RuntimeError"]


@pytest.mark.parametrize("chunks", ["as on an accelerator", "as on the cpu"])
def test_predict_moves_outputs_in_chunks_and_gives_the_same_result(monkeypatch, blobs, chunks):
    """On an accelerator the outputs come to the host in chunks; on the CPU they are there
    already and are joined once. Either way: the outputs of the whole input at once."""
    x, _ = blobs
    model = make_model()
    whole = model.predict(x, batch_size=16, verbose=0)
    joins = []
    concat = loops.tensors.concat_batches
    monkeypatch.setattr(loops.tensors, "concat_batches", lambda parts: joins.append(len(parts))
                        or concat(parts))  # fmt: skip
    monkeypatch.setattr(loops, "PREDICT_CHUNK_BYTES", 16 * 3 * 4 * 2)  # two batches a chunk
    if chunks == "as on an accelerator":  # the path a GPU's outputs take, run on the CPU
        monkeypatch.setattr(loops, "_outputs_move_in_chunks", lambda model, ranks: True)
    chunked = model.predict(x, batch_size=16, verbose=0)
    np.testing.assert_array_equal(whole, chunked)
    # 15 batches: 7 chunks of two and the last batch, then the 8 chunks joined; or one join
    assert joins == ([2] * 7 + [1, 8] if chunks == "as on an accelerator" else [15])
    with torch.no_grad():
        np.testing.assert_allclose(whole, model(torch.as_tensor(x)).numpy(), rtol=1e-5, atol=1e-6)


def test_loop_counters_are_readable_from_callbacks(blobs):
    x, y = blobs
    model = make_model()
    seen = collections.Counter()
    watch = LambdaCallback(
        on_train_batch_end=lambda b, logs: seen.update(
            [(model.loop.epoch, model.loop.batch == b, model.loop.micro_step)]
        )
    )
    model.fit(x, y, batch_size=60, epochs=2, verbose=0, callbacks=[watch])
    assert seen == {(0, True, 0): 4, (1, True, 0): 4}
    assert (model.loop.global_step, model.loop.optimizer_steps) == (8, 8)


# ---- fit leaves nothing behind -----------------------------------------------------------------


def _worker_processes() -> list:
    import multiprocessing

    # joblib's reusable loky pool (a GridSearchCV(n_jobs=2) test run earlier in this worker)
    # stays alive on purpose and is not a DataLoader's
    return [
        p for p in multiprocessing.active_children()
        if p.is_alive() and not type(p).__name__.startswith("Loky")
    ]  # fmt: skip


@pytest.mark.parametrize("steps_per_epoch", [None, 3])
def test_fit_lets_go_of_data_workers_callbacks_and_the_last_batch(blobs, steps_per_epoch):
    """Stopped early mid-epoch, over a DataLoader with 2 workers (kept between epochs with
    steps_per_epoch): when fit returns, the workers are gone, and the model holds neither the
    callbacks nor the last batch; model.loop still tells where training stopped."""
    import gc
    import weakref

    x, y = blobs
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, num_workers=2)
    model = make_model()
    seen = {}

    class StopAtBatch2(torcheras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen["batch"] = weakref.ref(self.model.loop.current_batch[0])
            if self.model.loop.global_step == 5:
                self.stop_training("enough")

    stopper = StopAtBatch2()
    assert not _worker_processes()
    model.fit(loader, epochs=3, steps_per_epoch=steps_per_epoch, verbose=0, callbacks=[stopper])
    assert not _worker_processes()
    assert (model.loop.global_step, model.loop.batch, model.loop.running) == (
        5,
        4 - 3 * (steps_per_epoch is not None),
        False,
    )
    assert model.loop.current_batch is None
    callback = weakref.ref(stopper)
    del stopper
    gc.collect()
    assert callback() is None and seen["batch"]() is None
    with pytest.raises(RuntimeError, match="inside Model.fit"):
        model.loop.training_state()
    model.summary()  # the shapes are still known from two kept samples


def test_fit_that_raises_lets_go_too(blobs):
    import gc
    import weakref

    x, y = blobs
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, num_workers=2)
    model = make_model()

    def boom(batch, logs):
        if batch == 2:
            raise RuntimeError("boom")

    raiser = torcheras.callbacks.LambdaCallback(on_train_batch_end=boom)
    with pytest.raises(RuntimeError, match="boom"):
        model.fit(loader, epochs=2, steps_per_epoch=4, verbose=0, callbacks=[raiser])
    assert not _worker_processes() and not model.loop.running
    callback = weakref.ref(raiser)
    del raiser
    gc.collect()
    assert callback() is None


def test_fit_leaves_the_users_own_loader_and_iterator_usable(blobs):
    """A DataLoader with persistent workers, and an iterator of a loader the user made, are
    the user's: fit lets go of them without shutting their workers down."""
    x, y = blobs
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    persistent = torch.utils.data.DataLoader(
        dataset, batch_size=40, num_workers=2, persistent_workers=True
    )
    model = make_model()
    model.fit(persistent, epochs=1, steps_per_epoch=3, validation_data=persistent, verbose=0)
    assert len(list(persistent)) == 6  # still usable
    model.evaluate(persistent, verbose=0)
    stream = iter(torch.utils.data.DataLoader(dataset, batch_size=40, num_workers=2))
    for _ in range(3):  # one stream, 2 batches per fit
        history = model.fit(stream, steps_per_epoch=2, verbose=0)
        assert history.stop_reason is None
    assert model.loop.global_step == 2
    del persistent, stream


def test_micro_step_is_the_batchs_place_in_its_group_in_every_batch_hook(blobs):
    x, y = blobs
    seen = []
    record = torcheras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda b, logs: seen.append(("begin", model.loop.micro_step)),
        on_train_batch_end=lambda b, logs: seen.append(
            ("end", model.loop.micro_step, model.loop.accumulating)
        ),
    )
    model = make_model(gradient_accumulation_steps=3)
    model.fit(x, y, batch_size=60, epochs=1, verbose=0, callbacks=[record])  # 4 batches
    assert seen == [
        ("begin", 0), ("end", 0, True), ("begin", 1), ("end", 1, True),
        ("begin", 2), ("end", 2, False), ("begin", 0), ("end", 0, False),
    ]  # fmt: skip


def test_a_batch_with_a_0_d_tensor_trains_and_fit_returns():
    class Scaled(torcheras.Model):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(5, 3)

        def forward(self, x, temperature):
            return self.layer(x) / temperature

    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    batches = [({"x": x[i : i + 8], "temperature": torch.tensor(2.0)}, y[i : i + 8])
               for i in range(0, 32, 8)]  # fmt: skip
    model = Scaled()
    model.compile("sgd", "sparse_categorical_crossentropy", device="cpu")
    history = model.fit(batches, epochs=1, verbose=0)
    assert len(history.history["loss"]) == 1


class _StageCounter(Callback):
    """Sends every step through the staged path (unscale, ``on_after_backward``, clipping,
    the average) and counts the complete gradients it sees."""

    def __init__(self) -> None:
        self.calls = 0

    def on_after_backward(self, batch: int) -> None:
        self.calls += 1


def test_a_plain_step_trains_as_the_staged_step_and_a_torch_loop(blobs):
    """Without accumulation, loss scaling, clipping, an average or ``on_after_backward``, a
    step is torch's own ``loss.backward()`` and ``optimizer.step()``; the same fit through
    every stage (an ``on_after_backward`` callback) and a hand-written loop give the same
    weights."""
    x, y = blobs
    torch.manual_seed(0)
    plain = make_model(optimizer="sgd", metrics=None)
    staged = make_model(optimizer="sgd", metrics=None)
    staged.set_weights(plain.get_weights())
    net = copy.deepcopy(plain.module)
    counter = _StageCounter()
    paths = []
    record = LambdaCallback(on_train_batch_begin=lambda b, logs: paths.append(
        (plain._stepping.plain, staged._stepping.plain)))  # fmt: skip
    plain.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0, callbacks=[record])
    staged.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0, callbacks=[counter, record])
    assert counter.calls == 2 * 8  # 240 samples, batches of 32: 8 steps an epoch
    assert paths[:16] == [(True, False)] * 16 and paths[16:] == [(False, False)] * 16
    opt = torch.optim.SGD(net.parameters(), lr=0.02)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    for _ in range(2):
        for i in range(0, 240, 32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[i : i + 32]), yt[i : i + 32]).backward()
            opt.step()
    for name, value in plain.get_weights().items():
        torch.testing.assert_close(value, staged.get_weights()[name], rtol=0, atol=0)
        torch.testing.assert_close(value, net.state_dict()[name.removeprefix("module.")],
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


def _count_train_step_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the batches that go through ``Model.train_step`` itself (seen from the one call
    only it makes, ``Stepping.zero_grad``: patching a seam would change the path)."""
    calls = []
    default = stepping.Stepping.zero_grad

    def counted(self):
        calls.append(self.loop.batch)
        return default(self)

    monkeypatch.setattr(stepping.Stepping, "zero_grad", counted)
    return calls


def test_the_inlined_step_trains_and_logs_exactly_as_train_step(blobs, monkeypatch):
    """On the plain path the default step runs with its seams inlined: the same weights and
    History, bit for bit, as a model whose overridden seam keeps every batch on train_step;
    only a fit's first batch (its one-time checks) goes through train_step itself."""
    x, y = blobs
    calls = _count_train_step_calls(monkeypatch)

    class OwnForwardCall(torcheras.Model):
        def call_on(self, x):  # a seam overridden (as it was): never inlined
            return super().call_on(x)

    torch.manual_seed(0)
    inlined = make_model()
    seams = OwnForwardCall(copy.deepcopy(inlined.module))
    seams.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], learning_rate=0.02, device="cpu")  # fmt: skip
    kwargs = dict(batch_size=32, epochs=2, shuffle=False, verbose=0, validation_split=0.25)
    history = inlined.fit(x, y, **kwargs).history
    assert calls == [0]  # 180 samples: 6 batches an epoch, the first one checked
    calls.clear()
    reference = seams.fit(x, y, **kwargs).history
    assert calls == list(range(6)) * 2
    assert history == reference and sorted(history) == [
        "accuracy", "learning_rate", "loss", "val_accuracy", "val_loss",
    ]  # fmt: skip
    for name, value in inlined.get_weights().items():
        torch.testing.assert_close(value, seams.get_weights()[name], rtol=0, atol=0)


def test_a_forward_hook_or_a_seam_set_on_the_model_is_honoured_by_every_batch(blobs, monkeypatch):
    """A forward hook registered in the middle of an epoch runs from the next batch on, and a
    seam replaced on the instance (not the class) runs every batch: those batches take
    train_step itself."""
    x, y = blobs
    calls = _count_train_step_calls(monkeypatch)
    model = make_model()
    seen = []

    def hook_at_batch_2(batch, logs):
        if batch == 2 and model.loop.epoch == 0:
            model.register_forward_hook(lambda module, inputs, output: seen.append(len(output)))

    model.fit(x, y, batch_size=60, epochs=2, shuffle=False, verbose=0,
              callbacks=[LambdaCallback(on_train_batch_begin=hook_at_batch_2)])  # fmt: skip
    assert calls == [0, 2, 3, 0, 1, 2, 3]  # 4 batches an epoch; the hook from batch 2 on
    assert seen == [60] * 6
    calls.clear()
    losses = []

    def compute_loss(x, y, y_pred, sample_weight=None):
        loss = torcheras.Model.compute_loss(model, x, y, y_pred, sample_weight)
        losses.append(float(loss.detach()))
        return loss

    model.compute_loss = compute_loss
    model.fit(x, y, batch_size=60, epochs=1, shuffle=False, verbose=0)
    assert calls == [0, 1, 2, 3] and len(losses) == 4


def test_a_seam_patched_on_model_itself_is_called_every_batch(blobs, monkeypatch):
    """A spy patched onto ``Model.compute_loss`` (as ``mock.patch.object`` does) sees every
    batch: patching a seam on the base class turns the inlined step off too."""
    x, y = blobs
    seen = []
    default = torcheras.Model.compute_loss

    def spy(self, *args, **kwargs):
        seen.append(self.loop.batch if self.training else "eval")
        return default(self, *args, **kwargs)

    monkeypatch.setattr(torcheras.Model, "compute_loss", spy)
    make_model().fit(x, y, batch_size=60, epochs=2, shuffle=False, verbose=0)
    assert seen == [0, 1, 2, 3] * 2
