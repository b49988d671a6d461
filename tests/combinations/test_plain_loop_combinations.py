"""fit's plain batch loop (``FitLoop._run_plain_batches``: one process, no batch hook, no
validation inside the epoch, no interrupt handler, no accumulation) against the general one.

Each test trains a model with the callbacks it needs and a twin that also has a batch-end
hook doing nothing (which takes the general loop), from the same weights, data and seeds, and
asserts what a user reads afterwards: the History, the weights, the loop's counters and the
per-batch learning rates. The same torch ops run in the same order on both sides, so the
numbers agree bit for bit (rtol=0, atol=0)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import torcheras
from torcheras import callbacks as cb
from torcheras import loops
from torcheras.data import PyDataset


class BatchEndHook(cb.Callback):
    """A batch-end hook that does nothing: the general loop runs."""

    def on_train_batch_end(self, batch, logs=None):
        pass


@pytest.fixture
def plain_epochs(monkeypatch):
    """How many epochs took the plain loop."""
    count = [0]
    real = loops.FitLoop._run_plain_batches

    def counted(self, *args):
        count[0] += 1
        return real(self, *args)

    monkeypatch.setattr(loops.FitLoop, "_run_plain_batches", counted)
    return count


@pytest.fixture
def stepped(train_step_calls):
    """The (epoch, batch) of each batch that ran ``Model.train_step`` itself."""
    return train_step_calls


def data(n: int = 100, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def twins(model_class=torcheras.Model, **compile_kwargs):
    out = []
    for _ in range(2):
        torch.manual_seed(0)
        model = model_class(nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)))
        compile_kwargs.setdefault("optimizer", "adam")
        compile_kwargs.setdefault("loss", "sparse_categorical_crossentropy")
        model.compile(device="cpu", **compile_kwargs)
        out.append(model)
    return out


def owning_twins(make_module):
    """Two compiled Models, from the same seed, each around ``make_module(i)``, whose
    ``model`` attribute is set to the Model (not a submodule): a module that reaches the
    loop or ``Model.log`` from inside the step."""
    models = []
    for i in range(2):
        torch.manual_seed(0)
        module = make_module(i)
        model = torcheras.Model(module)
        module.__dict__["model"] = model
        model.compile("adam", "sparse_categorical_crossentropy", device="cpu")
        models.append(model)
    return models


def fit(model, *args, **kwargs):
    torch.manual_seed(1)  # the same shuffles on both sides
    return model.fit(*args, **kwargs)


def assert_same_run(plain, general, plain_history, general_history):
    assert plain_history.history.keys() == general_history.history.keys()
    for key, values in general_history.history.items():
        got = plain_history.history[key]
        assert len(got) == len(values), key
        for a, b in zip(got, values):
            assert (math.isnan(a) and math.isnan(b)) or a == b, key
    plain_state, general_state = plain.state_dict(), general.state_dict()
    assert plain_state.keys() == general_state.keys()
    for name, a in plain_state.items():
        torch.testing.assert_close(a, general_state[name], rtol=0, atol=0, equal_nan=True)
    assert (plain.loop.global_step, plain.loop.optimizer_steps, plain.loop.batch) == (
        general.loop.global_step,
        general.loop.optimizer_steps,
        general.loop.batch,
    )


def test_metrics_validation_schedule_and_checkpoint_match_the_general_loop(tmp_path, plain_epochs):
    """Accuracy, validation each epoch, a learning-rate schedule, EarlyStopping, a checkpoint
    and CSVLogger (epoch hooks only), a short last batch: the plain loop runs, and the History,
    weights, counters and each batch's rate are those of the general loop."""
    x, y = data(100)
    xv, yv = data(40, seed=1)
    rates = {}

    class Rates(cb.Callback):
        def on_epoch_end(self, epoch, logs=None):
            rates.setdefault(id(self), []).append(list(self.model.loop.batch_learning_rates))

    def callbacks(extra):
        return [
            cb.LearningRateScheduler(lambda epoch, lr: lr * 0.5),
            cb.EarlyStopping(patience=5),
            cb.ModelCheckpoint(str(tmp_path / f"best{len(extra)}.pt"), save_best_only=True),
            cb.CSVLogger(str(tmp_path / f"log{len(extra)}.csv")),
            Rates(),
            *extra,
        ]

    plain, general = twins(metrics=["accuracy"])
    kwargs = dict(batch_size=16, epochs=3, validation_data=(xv, yv), verbose=0)
    plain_callbacks, general_callbacks = callbacks([]), callbacks([BatchEndHook()])
    h1 = fit(plain, x, y, callbacks=plain_callbacks, **kwargs)
    assert plain_epochs[0] == 3
    h2 = fit(general, x, y, callbacks=general_callbacks, **kwargs)
    assert plain_epochs[0] == 3  # the twin took the general loop
    assert_same_run(plain, general, h1, h2)
    assert rates[id(plain_callbacks[4])] == rates[id(general_callbacks[4])]
    assert [len(r) for r in rates[id(plain_callbacks[4])]] == [7, 7, 7]
    assert (tmp_path / "log0.csv").read_text() == (tmp_path / "log1.csv").read_text()


def test_terminate_on_nan_stops_at_the_same_batch_as_the_general_loop(plain_epochs):
    """TerminateOnNaN's loss watch in the plain loop: the same batch is named, training stops
    after the same batch (the watch reads the loss at the epoch's end here), and the epoch's
    logs hold the same NaN."""
    x, y = data(96)
    x[50] = float("nan")  # batch 3 of 16-sample batches
    plain, general = twins()
    kwargs = dict(batch_size=16, epochs=2, verbose=0, shuffle=False)
    h1 = fit(plain, x, y, callbacks=[cb.TerminateOnNaN()], **kwargs)
    assert plain_epochs[0] == 1
    h2 = fit(general, x, y, callbacks=[cb.TerminateOnNaN(), BatchEndHook()], **kwargs)
    assert plain_epochs[0] == 1  # the twin took the general loop
    assert_same_run(plain, general, h1, h2)
    assert len(h1.history["loss"]) == 1 and math.isnan(h1.history["loss"][0])
    assert h1.stop_reason == h2.stop_reason and "batch 3" in h1.stop_reason.lower()


class LogsLossToo(torcheras.Model):
    """A custom step that returns the loss alone and also logs a value under ``"loss"`` at
    some batches, of ``log_dtype``: float32 adds to the running total in place, float64
    replaces it (by a float64 total) after several batches the plain loop added in place."""

    log_dtype = torch.float32
    log_at = (2, 4, 9)  # global steps

    def train_step(self, batch):
        x, y = batch
        self.optimizer.zero_grad()
        loss = self.compute_loss(x, y, self(x))
        loss.backward()
        self.optimizer.step()
        if self.loop.global_step in self.log_at:
            self.log("loss", loss.detach().to(self.log_dtype) * 2)
        return loss


@pytest.mark.parametrize("log_dtype", [torch.float32, torch.float64])
def test_a_custom_step_logging_the_loss_itself_matches_the_general_loop(plain_epochs, log_dtype):
    """The plain loop's in-place loss addition carries on past a value ``Model.log`` added
    to the same total, and notices the total a float64 value replaced: the epoch's loss is
    the general loop's."""
    x, y = data(80)

    class Model(LogsLossToo):
        pass

    Model.log_dtype = log_dtype
    plain, general = twins(Model)
    h1 = fit(plain, x, y, batch_size=16, epochs=2, verbose=0)
    assert plain_epochs[0] == 2
    h2 = fit(general, x, y, batch_size=16, epochs=2, verbose=0, callbacks=[BatchEndHook()])
    assert plain_epochs[0] == 2  # the twin took the general loop
    assert_same_run(plain, general, h1, h2)


def test_work_asked_for_between_batches_runs_at_the_next_step_boundary(plain_epochs, stepped):
    """``loop.at_step_boundary`` asked from inside a step (by the wrapped module here, as a
    signal handler might, with no callback running between batches) runs after that batch,
    as in the general loop; the default step's inlined body runs on after it."""
    x, y = data(64)
    seen: dict[str, list[int]] = {"plain": [], "general": []}

    class Asks(nn.Module):
        def __init__(self, key):
            super().__init__()
            self.key = key
            self.net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
            self.model = None  # set below (not a submodule)

        def forward(self, inputs):
            loop = self.__dict__["model"].loop
            if loop.global_step == 2 and self.training:
                loop.at_step_boundary(lambda: seen[self.key].append(loop.global_step))
            return self.net(inputs)

    plain, general = owning_twins(lambda i: Asks(("plain", "general")[i]))
    h1 = fit(plain, x, y, batch_size=16, epochs=1, verbose=0)
    assert plain_epochs[0] == 1
    assert stepped == [(0, 0)]  # train_step itself for the first batch alone
    h2 = fit(general, x, y, batch_size=16, epochs=1, verbose=0, callbacks=[BatchEndHook()])
    assert plain_epochs[0] == 1  # the twin took the general loop
    assert_same_run(plain, general, h1, h2)
    assert seen == {"plain": [3], "general": [3]}  # after batch 2, counted


class LogsFromForward(nn.Module):
    """Logs ``2 x`` its first output's mean under ``"loss"`` (``Model.log``, of ``dtype``) at
    some training batches: from inside the default step, whose body the plain loop runs."""

    def __init__(self, dtype, at=(2, 4, 9)):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
        self.dtype, self.at = dtype, at
        self.model = None  # set below (not a submodule)

    def forward(self, inputs):
        out = self.net(inputs)
        model = self.__dict__["model"]
        if self.training and model.loop.global_step in self.at:
            model.log("loss", out.detach().mean().to(self.dtype) * 2)
        return out


@pytest.mark.parametrize("log_dtype", [torch.float32, torch.float64])
def test_the_loss_logged_from_inside_the_inlined_step_is_counted_as_the_general_loop_does(
    plain_epochs, stepped, log_dtype
):
    """The default step's body run by the plain loop adds each loss to the running total in
    place; a value the wrapped module logs under ``"loss"`` meanwhile is added to the same
    total (float32) or replaces it by a float64 one, which the loop notices: the History is
    the general loop's, to the bit, and only the first batch ran ``train_step`` itself."""
    x, y = data(80)
    plain, general = owning_twins(lambda i: LogsFromForward(log_dtype))
    h1 = fit(plain, x, y, batch_size=16, epochs=2, verbose=0)
    assert plain_epochs[0] == 2 and stepped == [(0, 0)]
    h2 = fit(general, x, y, batch_size=16, epochs=2, verbose=0, callbacks=[BatchEndHook()])
    assert plain_epochs[0] == 2  # the twin took the general loop
    assert_same_run(plain, general, h1, h2)
    losses = torch.tensor(h1.history["loss"], dtype=torch.float64)
    assert torch.isfinite(losses).all()


@pytest.mark.parametrize("loop", ["plain", "general"])
def test_an_optimizer_replaced_by_work_between_batches_steps_the_rest_of_the_epoch(
    plain_epochs, stepped, loop
):
    """Work run at a step boundary (asked for from inside a step, as a signal handler might)
    that replaces the optimizer with one of another learning rate: the plain loop's inlined
    body (and the general loop, with a batch-end hook) steps with the new one from the next
    batch, records its rate for those batches and logs it as the epoch's. Checked against a
    hand-written loop of the same calls: the weights and the epoch's loss agree."""
    x, y = data(64)
    new_rate = 0.05

    class Swaps(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
            self.model = None

        def forward(self, inputs):
            model = self.__dict__["model"]
            if self.training and model.loop.global_step == 1:
                swapped = torch.optim.SGD(self.parameters(), new_rate)
                model.loop.at_step_boundary(lambda: setattr(model, "optimizer", swapped))
            return self.net(inputs)

    torch.manual_seed(0)
    module = Swaps()
    model = torcheras.Model(module)
    module.__dict__["model"] = model
    model.compile(torch.optim.SGD(module.parameters(), lr=0.01), "cross_entropy", device="cpu")
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    reference.load_state_dict(module.net.state_dict())
    rates = []
    record = cb.LambdaCallback(
        on_epoch_end=lambda epoch, logs: rates.extend(model.loop.batch_learning_rates)
    )
    callbacks = [record] if loop == "plain" else [record, BatchEndHook()]
    history = model.fit(
        x, y, batch_size=16, epochs=1, verbose=0, shuffle=False, callbacks=callbacks
    )
    assert plain_epochs[0] == (1 if loop == "plain" else 0)
    if loop == "plain":
        assert stepped == [(0, 0)]  # the inlined body for the rest, the new optimizer's too
    assert rates == [0.01, 0.01, new_rate, new_rate]  # each batch's rate, the new one's after
    assert history.history["learning_rate"] == [new_rate]
    total = 0.0
    for batch, start in enumerate(range(0, 64, 16)):
        rate = 0.01 if batch < 2 else new_rate  # the swap comes after batch 1
        xb, yb = x[start : start + 16], y[start : start + 16]
        loss = torch.nn.functional.cross_entropy(reference(xb), yb)
        reference.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in reference.parameters():
                p -= rate * p.grad
        total += float(loss.detach()) * 16
    assert model.optimizer.param_groups[0]["lr"] == new_rate
    for got, want in zip(module.net.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert history.history["loss"][0] == pytest.approx(total / 64, rel=1e-6)


class Watched(nn.Module):
    """``forward(a, b=None)``: a tensor, or a dict of two inputs (``forward(**x)``). At
    ``nan_at`` (epoch, batch) of training its outputs are NaN (and so is every later loss);
    at each (epoch, batch) of ``log_at`` it logs ``2 x`` its outputs' mean under ``"loss"``
    (``Model.log``, of ``log_dtype``) from inside the default step."""

    def __init__(self, nan_at=None, log_at=(), log_dtype=torch.float32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
        self.nan_at, self.log_at, self.log_dtype = nan_at, log_at, log_dtype
        self.model = None  # set below (not a submodule)

    def forward(self, a, b=None):
        out = self.net(a if b is None else a + b)
        if self.training:
            model = self.__dict__["model"]
            where = (model.loop.epoch, model.loop.batch)
            if where == self.nan_at:
                out = out * float("nan")
            if where in self.log_at:
                model.log("loss", out.detach().mean().to(self.log_dtype) * 2)
        return out


def watched_twins(**module_kwargs):
    return owning_twins(lambda i: Watched(**module_kwargs))


def nan_reason(epoch, batch):
    return f"TerminateOnNaN: loss was nan at epoch {epoch + 1}, batch {batch}"


@pytest.mark.parametrize(
    "nan_at, log_at, log_dtype",
    [
        ((1, 3), (), torch.float32),
        ((0, 3), ((0, 2),), torch.float32),
        ((0, 3), ((0, 2),), torch.float64),
        ((1, 4), ((1, 1),), torch.float32),
    ],
    ids=["second_epoch", "after_a_float32_log", "after_a_float64_log", "second_epoch_log"],
)
def test_terminate_on_nan_names_the_bad_batch_after_a_total_the_watch_kept(
    plain_epochs, stepped, nan_at, log_at, log_dtype
):
    """TerminateOnNaN's loss watch keeps a batch's running total whole where that batch's
    loss was not added in place (an epoch's first batch, a batch whose module also logged
    ``"loss"``); the plain loop's later in-place additions must not change that kept total.
    NaN outputs at ``nan_at``: the plain loop (the default step inlined, the watch) names the
    batch the general loop (batch logs) names, stops at the same point, with the same
    History and weights."""
    x, y = data(96)  # 6 batches of 16
    plain, general = watched_twins(nan_at=nan_at, log_at=log_at, log_dtype=log_dtype)
    kwargs = dict(batch_size=16, epochs=3, verbose=0, shuffle=False)
    h1 = fit(plain, x, y, callbacks=[cb.TerminateOnNaN()], **kwargs)
    assert plain_epochs[0] == nan_at[0] + 1
    assert stepped == [(0, 0)]  # the inlined body for every batch but the fit's first
    h2 = fit(general, x, y, callbacks=[cb.TerminateOnNaN(), BatchEndHook()], **kwargs)
    assert plain_epochs[0] == nan_at[0] + 1  # the twin took the general loop
    assert h2.stop_reason == nan_reason(*nan_at)
    assert h1.stop_reason == h2.stop_reason
    assert_same_run(plain, general, h1, h2)


class MixedBatches(PyDataset):
    """Eight batches of eight samples: ``(x, y)`` pairs (the plain loop's inlined body), ``(x,
    y, sample_weight)`` triples at 2 and 7 and a dict of inputs at 3 (``train_step`` itself),
    and, ``empty``, an empty pair at 5."""

    def __init__(self, x, y, empty):
        super().__init__()
        self.x, self.y, self.empty = x, y, empty

    def __len__(self):
        return 8

    def __getitem__(self, i):
        x, y = self.x[i * 8 : (i + 1) * 8], self.y[i * 8 : (i + 1) * 8]
        if i in (2, 7):
            return x, y, torch.linspace(0.5, 1.5, 8)
        if i == 3:
            return {"a": x, "b": x * 0.5}, y
        if i == 5 and self.empty:
            return x[:0], y[:0]
        return x, y


@pytest.mark.parametrize(
    "empty, nan_at",
    [(False, None), (True, None), (True, (0, 6))],
    ids=["pairs_triples_and_dict_inputs", "an_empty_batch", "nan_after_an_empty_batch"],
)
def test_batches_of_other_structures_between_pairs_match_the_general_loop(
    plain_epochs, stepped, empty, nan_at
):
    """Batches the plain loop cannot run inlined (a triple with sample weights, a dict of
    inputs) between ones it can, an empty batch (its loss counted with weight 0), and
    TerminateOnNaN's watch throughout: the same History, weights, counters and stop as the
    general loop, and ``train_step`` itself ran exactly for the batches that are not
    ``(tensor, y)`` pairs (and the fit's first)."""
    x, y = data(64)
    plain, general = watched_twins(nan_at=nan_at)
    epochs = 1 if nan_at else 2
    kwargs = dict(epochs=2, verbose=0, shuffle=False)
    h1 = fit(plain, MixedBatches(x, y, empty), callbacks=[cb.TerminateOnNaN()], **kwargs)
    assert plain_epochs[0] == epochs
    assert stepped == [(0, 0)] + [(e, b) for e in range(epochs) for b in (2, 3, 7)]
    batches = MixedBatches(x, y, empty)
    h2 = fit(general, batches, callbacks=[cb.TerminateOnNaN(), BatchEndHook()], **kwargs)
    assert plain_epochs[0] == epochs  # the twin took the general loop
    assert h2.stop_reason == (None if nan_at is None else nan_reason(*nan_at))
    assert h1.stop_reason == h2.stop_reason
    assert_same_run(plain, general, h1, h2)
    assert all(math.isfinite(v) for v in h1.history["loss"]) == (nan_at is None)
