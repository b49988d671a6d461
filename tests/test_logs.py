"""Logs as Keras users expect: batch logs are values, the logged learning rate was really
used, and a custom train_step's metric results are logged as results."""

from __future__ import annotations

import copy
import io
import json
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_model
from torch import nn

import torcheras
from torcheras import metrics
from torcheras.callbacks import Callback, LambdaCallback, LearningRateScheduler, TensorBoard
from torcheras.logs import RunningMeans


class KeepLogs(Callback):
    def __init__(self):
        self.kept = []

    def on_train_batch_end(self, batch, logs=None):
        self.kept.append(logs)  # kept, not read


def test_kept_batch_logs_still_hold_their_own_batch_values(blobs):
    x, y = blobs
    keep, read = KeepLogs(), []
    probe = LambdaCallback(on_train_batch_end=lambda b, logs: read.append(dict(logs)))
    make_model().fit(x, y, epochs=1, batch_size=30, verbose=0, callbacks=[keep, probe])
    assert len(keep.kept) == 8
    # read later: every kept object shows the values read at its own batch end
    assert [dict(logs) for logs in keep.kept] == read
    assert len({logs["loss"] for logs in keep.kept}) == 8


def test_batch_logs_copy_dict_and_json_work(blobs):
    x, y = blobs
    copies = []

    def at_batch_end(batch, logs):
        copies.append((logs.copy(), dict(logs), json.dumps(dict(logs))))

    make_model().fit(
        x,
        y,
        epochs=1,
        batch_size=120,
        verbose=0,
        callbacks=[LambdaCallback(on_train_batch_end=at_batch_end)],
    )
    copied, as_dict, as_json = copies[0]
    assert type(copied) is dict and copied == as_dict == json.loads(as_json)
    assert sorted(copied) == ["accuracy", "loss"] and all(type(v) is float for v in copied.values())


def test_a_callback_editing_one_batchs_logs_leaves_the_other_batches_alone(blobs):
    """Keys set or deleted on batch 0's logs show in batch 0's logs only (later callbacks
    see the edit, as in Keras); batch 1 is as the loop made it."""
    x, y = blobs
    seen = []

    def edit(batch, logs):
        if batch == 0:
            logs["note"] = 1.0
            del logs["accuracy"]

    make_model().fit(
        x,
        y,
        epochs=1,
        batch_size=120,
        verbose=0,
        callbacks=[
            LambdaCallback(on_train_batch_end=edit),
            LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(dict(logs))),
        ],
    )
    assert sorted(seen[0]) == ["loss", "note"] and seen[0]["note"] == 1.0
    assert sorted(seen[1]) == ["accuracy", "loss"]


def test_kept_batch_logs_copied_or_pickled_edit_independently(blobs):
    """A callback that keeps batch logs and deep-copies or pickles them (to save them) gets
    copies that each take their own edits: del, pop, setdefault, clear, set."""
    x, y = blobs
    kept = []
    make_model().fit(
        x, y, epochs=1, batch_size=120, verbose=0,
        callbacks=[LambdaCallback(on_train_batch_end=lambda batch, logs: kept.append(logs))],
    )  # fmt: skip
    for first, second in (copy.deepcopy(kept), pickle.loads(pickle.dumps(kept))):
        del first["accuracy"]
        assert first.pop("loss") == kept[0]["loss"]
        first.setdefault("note", 2.0)
        assert dict(first) == {"note": 2.0}
        assert sorted(second) == ["accuracy", "loss"] and second == dict(kept[1])
        second.clear()
        assert dict(second) == {} and sorted(kept[1]) == ["accuracy", "loss"]


def test_kept_batch_logs_of_state_and_torchmetrics_metrics_pickle_with_their_values(blobs):
    """Batch logs of a metric kept as a state (MeanIoU) and of a torchmetrics metric pickle
    (a callback sending them to another process) and read back the values of their batch."""
    torchmetrics = pytest.importorskip("torchmetrics")
    x, y = blobs
    keep, read = KeepLogs(), []
    probe = LambdaCallback(on_train_batch_end=lambda b, logs: read.append(dict(logs)))
    accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro")
    model = make_model(
        metrics=[metrics.MeanIoU(num_classes=3, name="iou", sparse_y_pred=False), accuracy]
    )
    model.fit(x, y, epochs=1, batch_size=60, verbose=0, callbacks=[keep, probe])
    restored = pickle.loads(pickle.dumps(keep.kept))
    assert [dict(logs) for logs in restored] == read
    assert sorted(read[0]) == ["iou", "loss", "multiclass_accuracy"]
    assert len({logs["iou"] for logs in read}) > 1  # each batch's own value, not the last


def test_batch_logs_are_read_from_the_device_once_and_only_when_read(blobs):
    x, y = blobs
    keep = KeepLogs()
    make_model().fit(x, y, epochs=1, batch_size=60, verbose=0, callbacks=[keep])
    assert not any(logs.materialized for logs in keep.kept)  # building them read nothing
    first = keep.kept[0]
    value = first["loss"]
    assert first.materialized and first["accuracy"] is not None and first["loss"] == value


def test_epoch_loss_is_the_sample_weighted_mean_of_the_batch_losses(blobs):
    """Not the last batch's loss: batches of 100, 100 and 40 samples weigh 100, 100, 40."""
    x, y = blobs
    per_batch = []
    probe = LambdaCallback(
        on_train_batch_end=lambda b, logs: per_batch.append(
            float(probe.model.train_step_losses[-1])
        )
    )

    class Recording(torcheras.Model):
        train_step_losses: list = []

        def train_step(self, batch):
            logs = super().train_step(batch)
            self.train_step_losses.append(logs["loss"].detach())
            return logs

    torch.manual_seed(0)
    model = Recording(make_model().module)
    model.compile(torch.optim.SGD(model.parameters(), lr=0.1), "sparse_categorical_crossentropy")
    history = model.fit(x, y, epochs=1, batch_size=100, shuffle=False, verbose=0, callbacks=[probe])
    expected = (100 * per_batch[0] + 100 * per_batch[1] + 40 * per_batch[2]) / 240
    assert per_batch[0] != pytest.approx(per_batch[2])
    assert history.history["loss"][0] == pytest.approx(expected, rel=1e-5)


def test_logged_learning_rate_is_the_last_batch_rate_with_a_per_batch_schedule(tmp_path, blobs):
    x, y = blobs  # 8 batches of 30 per epoch
    rates = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6] * 10
    used = []
    schedule = LearningRateScheduler(lambda step, lr: rates[step], interval="batch")
    probe = LambdaCallback(
        on_train_batch_end=lambda b, logs: used.append(probe.model.optimizer.param_groups[0]["lr"])
    )
    history = make_model().fit(
        x,
        y,
        epochs=2,
        batch_size=30,
        verbose=0,
        callbacks=[schedule, probe, TensorBoard(tmp_path, write_graph=False)],
    )
    assert history.history["learning_rate"] == pytest.approx([used[7], used[15]])
    assert history.history["learning_rate"] == pytest.approx([0.2, 0.4])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "train"), size_guidance={"scalars": 0})
    acc.Reload()
    batch_rates = acc.Scalars("batch_learning_rate")
    assert [e.step for e in batch_rates] == list(range(1, 17))
    assert [e.value for e in batch_rates] == pytest.approx(used)


def test_a_torch_scheduler_stepped_per_batch_logs_the_rate_it_used(blobs):
    x, y = blobs
    model = make_model(optimizer="sgd")
    scheduler = torch.optim.lr_scheduler.StepLR(model.optimizer, step_size=1, gamma=0.5)
    used = []
    probe = LambdaCallback(
        on_train_batch_begin=lambda b, logs: used.append(model.optimizer.param_groups[0]["lr"])
    )
    history = model.fit(
        x,
        y,
        epochs=1,
        batch_size=60,
        verbose=0,
        callbacks=[probe, LearningRateScheduler(scheduler, interval="batch")],
    )
    assert used == pytest.approx([0.02, 0.01, 0.005, 0.0025])
    assert history.history["learning_rate"] == pytest.approx([0.0025])  # not 0.00125


def _mse_step(model, x, y):
    """One plain optimisation step of a custom train_step; returns the loss."""
    loss = nn.functional.mse_loss(model(x), y)
    model.optimizer.zero_grad()
    model.backward(loss)
    model.optimizer.step()
    return loss


class TrackedLoss(torcheras.Model):
    """Keras's idiom: a Mean tracker on the model, its result returned by train_step."""

    def __init__(self):
        super().__init__(nn.Linear(2, 1))
        self.loss_tracker = metrics.Mean(name="loss")
        self.seen = []

    def train_step(self, batch):
        x, y = batch
        loss = _mse_step(self, x, y)
        self.loss_tracker.update_state(loss.detach(), sample_weight=len(x))
        self.seen.append((float(loss), len(x)))
        return {"loss": self.loss_tracker.result(), "lr_x10": torch.tensor(10.0)}


def test_a_train_step_returning_tracker_results_logs_the_trackers_result():
    x, y = torch.randn(50, 2), torch.randn(50, 1)
    model = TrackedLoss()
    model.compile(torch.optim.SGD(model.parameters(), lr=0.5), device="cpu")
    assert model.loss_tracker in model.metrics
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    per_epoch = [model.seen[:7], model.seen[7:]]
    for logged, batches in zip(history.history["loss"], per_epoch):  # reset each epoch
        true_mean = sum(v * n for v, n in batches) / sum(n for _, n in batches)
        assert logged == pytest.approx(true_mean, rel=1e-5)
    assert history.history["lr_x10"] == pytest.approx([10.0, 10.0])  # others: running mean


class CountingTracker(torcheras.Model):
    """Keras's VAE pattern: trackers named otherwise than the keys their results go under."""

    def __init__(self, keep_on_model=True):
        super().__init__(nn.Linear(1, 1))
        total, part = metrics.Mean(name="total_loss"), metrics.Mean(name="part_loss")
        if keep_on_model == "attributes":
            self.total_loss_tracker, self.part_tracker = total, part
        elif keep_on_model == "tuple":  # tracked inside a tuple too, as Keras tracks them
            self.trackers = (total, part)
        else:  # metric objects the model does not hold: Keras logs their results all the same
            self.holder = types.SimpleNamespace(trackers=(total, part))
        self._pair = lambda: (total, part)
        self.fed = 0.0

    def train_step(self, batch):
        total, part = self._pair()
        total.update_state(torch.tensor(self.fed))
        part.update_state(torch.tensor(self.fed / 2))
        self.fed += 1
        return {"loss": total.result(), "half": part.result()}

    test_step = train_step


@pytest.mark.parametrize("keep_on_model", ["attributes", "tuple", "nowhere"])
def test_a_metrics_result_logs_as_keras_logs_it_whatever_the_key(keep_on_model):
    """A tracker fed 0, 1, 2, ... and returned as {"loss": tracker.result()}: Keras 3 logs
    [1.5, 5.5] (the tracker's result at each epoch's end), not the mean of running means."""
    model = CountingTracker(keep_on_model)
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(torch.zeros(8, 1), torch.zeros(8, 1), batch_size=2, epochs=2, verbose=0)
    keep_on_model = keep_on_model != "nowhere"
    if keep_on_model:  # reset at each epoch's start, as Keras resets model.metrics
        assert history.history["loss"] == pytest.approx([1.5, 5.5])
        assert history.history["half"] == pytest.approx([0.75, 2.75])
    else:  # never reset by the loop: the result over everything fed
        assert history.history["loss"] == pytest.approx([1.5, 3.5])
    assert "total_loss" not in history.history  # only what the step returned is logged
    logs = model.evaluate(torch.zeros(4, 1), torch.zeros(4, 1), batch_size=2, return_dict=True)
    assert logs["loss"] == pytest.approx(8.5 if keep_on_model else 4.5)  # fed 8 and 9 (or 0..9)


def test_a_metrics_result_stays_a_plain_tensor():
    """The result is recognised without marking the tensor: it pickles as any tensor."""
    tracker = metrics.Mean(name="total_loss")
    tracker.update_state(torch.tensor([1.0, 2.0]))
    value = tracker.result()
    assert metrics.result_of(value) is tracker
    assert metrics.result_of(value.clone()) is None
    buffer = io.BytesIO()
    torch.save(value, buffer)
    assert float(torch.load(io.BytesIO(buffer.getvalue()))) == 1.5


def test_torchmetrics_assigned_to_the_model_are_tracked_and_reset_each_epoch(blobs):
    torchmetrics = pytest.importorskip("torchmetrics")
    x, y = blobs

    class WithAccuracy(torcheras.Model):
        def __init__(self):
            super().__init__(make_model().module)
            self.acc = torchmetrics.classification.MulticlassAccuracy(
                num_classes=3, average="micro"
            )
            self.counts = []

        def train_step(self, batch):
            logs = super().train_step(batch)
            outputs = self(batch[0]).detach()
            self.acc.update(outputs, batch[1])
            self.counts.append((int((outputs.argmax(1) == batch[1]).sum()), len(batch[1])))
            return {**logs, "acc": self.acc.compute()}

    model = WithAccuracy()
    model.compile("adam", "sparse_categorical_crossentropy", device="cpu", learning_rate=0.05)
    history = model.fit(x, y, epochs=2, batch_size=40, verbose=0)
    for epoch, logged in enumerate(history.history["acc"]):
        batches = model.counts[6 * epoch : 6 * epoch + 6]  # this epoch's batches only
        assert logged == pytest.approx(sum(c for c, _ in batches) / 240, rel=1e-6)
    assert int(model.acc.update_count) == 6  # reset at the second epoch's start


def test_metrics_assigned_before_compile_are_listed_once(blobs):
    model = TrackedLoss()
    model.compile("sgd", device="cpu")
    assert [m.name for m in model.metrics] == ["loss"]
    np.testing.assert_equal(len(model.metrics), 1)


class ReturnsOddValues(torcheras.Model):
    """A train_step returning a Python float and a per-sample vector besides the loss."""

    def __init__(self):
        super().__init__(nn.Linear(2, 1))

    def train_step(self, batch):
        x, y = batch
        _mse_step(self, x, y)
        return {"size": float(len(x)), "first_feature": x[:, 0]}


def test_returned_python_floats_and_vectors_are_averaged_over_samples():
    x = torch.arange(10, dtype=torch.float32).reshape(5, 2)  # batches of 2, 2 and 1 samples
    model = ReturnsOddValues()
    model.compile("sgd", device="cpu")
    history = model.fit(x, torch.zeros(5, 1), batch_size=2, shuffle=False, verbose=0)
    # sizes 2, 2, 1 weighted by the batch sizes: (2*2 + 2*2 + 1*1) / 5
    assert history.history["size"] == [pytest.approx(9 / 5)]
    # a vector is reduced to its mean first: batch means 1, 5, 8, weighted 2, 2, 1
    assert history.history["first_feature"] == [pytest.approx((2 * 1 + 2 * 5 + 8) / 5)]


def test_tensor_to_python_conversions_do_not_grow_with_the_number_of_batches(blobs, monkeypatch):
    """Every way torcheras's code turns a tensor into a Python number is counted (torch's
    own optimizer reads its step counter, as in a raw loop): fit reads the device once per
    epoch, whatever the number of batches, when no callback reads the batch logs."""
    x, y = blobs
    counts = []
    source = str(Path(torcheras.__file__).parent)
    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(source):
                counts.append(1)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def conversions(batch_size):
        counts.clear()
        make_model().fit(x, y, epochs=2, batch_size=batch_size, verbose=0)
        return len(counts)

    few, many = conversions(120), conversions(10)  # 2 batches per epoch, then 24
    assert few == many and few <= 6


def test_a_torchmetrics_result_in_batch_logs_is_computed_only_when_read(blobs):
    """An expensive compute (AUROC...) must not run every batch because a progress bar or
    another callback takes the batch logs; a kept snapshot still shows its own batch."""
    torchmetrics = pytest.importorskip("torchmetrics")
    x, y = blobs
    computes = []

    class CountingAccuracy(torchmetrics.classification.MulticlassAccuracy):
        def compute(self):
            computes.append(1)
            return super().compute()

    accuracy = CountingAccuracy(num_classes=3, average="micro")
    model = make_model(metrics=[accuracy])
    keep, read = KeepLogs(), {}
    probe = LambdaCallback(
        on_train_batch_end=lambda b, logs: (
            read.__setitem__(b, logs["counting_accuracy"]) if b == 2 else None
        )
    )
    model.fit(x, y, epochs=1, batch_size=30, verbose=0, callbacks=[keep, probe])
    assert len(computes) == 2  # batch 2's read, and the epoch's result; not 8 times
    assert keep.kept[2]["counting_accuracy"] == read[2]  # read again later: same value
    assert keep.kept[5]["counting_accuracy"] != pytest.approx(0.0)


class _RecordsLosses(torcheras.Model):
    """Records each batch's loss and hits (read on the host: a test's reference) and logs a
    parameter the optimizer changes in place."""

    def __init__(self, module):
        super().__init__(module)
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.seen = []

    def train_step(self, batch):
        x, y = batch
        self.optimizer.zero_grad(set_to_none=True)
        out = self.module(x) * self.scale
        loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        self.optimizer.step()
        self.update_metrics(out, y)
        hits = int((out.argmax(1) == y).sum())
        self.seen.append((loss.item(), hits, len(x), self.scale.item()))
        return {"loss": loss, "scale": self.scale.detach()}  # shares the parameter's storage


def test_running_means_over_many_batches_match_the_batches(blobs):
    """Over many batches (601, a short last one), kept batch logs and the epoch's logs
    equal the running means of the batches' own values (totals are added to in place while
    no snapshot holds them), and a logged tensor that shares a parameter's storage, which the
    optimizer changes in place, counts the value it had at each batch."""
    x, y = blobs  # 240 samples
    x, y = np.tile(x, (6, 1))[:1201], np.tile(y, 6)[:1201]  # 601 batches of 2, the last of 1
    torch.manual_seed(0)
    model = _RecordsLosses(nn.Sequential(nn.Linear(x.shape[1], 3)))
    model.compile(torch.optim.SGD(model.parameters(), lr=0.05), "cross_entropy", ["accuracy"])
    keep = KeepLogs()
    history = model.fit(x, y, epochs=1, batch_size=2, verbose=0, callbacks=[keep])
    seen = np.array(model.seen, dtype=np.float64)
    loss, hits, sizes, scale = seen.T
    assert len(keep.kept) == 601 and sizes[-1] == 1 and scale[0] != scale[-1]
    seen_so_far = np.cumsum(sizes)
    for k in (0, 254, 255, 256, 300, 511, 512, 600):
        logs = keep.kept[k]
        assert logs["loss"] == pytest.approx(np.cumsum(loss * sizes)[k] / seen_so_far[k], rel=1e-5)
        assert logs["accuracy"] == pytest.approx(np.cumsum(hits)[k] / seen_so_far[k], rel=1e-6)
        assert logs["scale"] == pytest.approx(
            np.cumsum(scale * sizes)[k] / seen_so_far[k], rel=1e-6
        )
    assert history.history["loss"][0] == pytest.approx(np.average(loss, weights=sizes), rel=1e-5)
    assert history.history["scale"][0] == pytest.approx(np.average(scale, weights=sizes), rel=1e-6)
    assert history.history["accuracy"][0] == pytest.approx(hits.sum() / sizes.sum(), rel=1e-6)


def test_a_held_result_or_snapshot_keeps_its_value_when_the_metric_updates_in_place():
    """Metric totals are added to in place (no new tensor per batch) only while nobody holds
    them: a result or snapshot taken earlier keeps the value it had."""
    total = metrics.Sum()
    mean = metrics.Mean()
    for metric in (total, mean):
        for values in ([1.0, 2.0], [3.0], [4.0, 5.0]):  # 3 updates: the third is in place
            metric.update_state(torch.tensor(values))
    held_sum, held_mean = total.result(), mean.snapshot()
    for metric in (total, mean):
        metric.update_state(torch.tensor([10.0, 20.0]))
        metric.update_state(torch.tensor([30.0]))
    assert float(held_sum) == 15.0 and float(held_mean()) == 3.0
    assert float(total.result()) == 75.0 and float(mean.result()) == pytest.approx(75.0 / 8)


def test_running_means_of_float64_values_sum_in_float64():
    """A float64 loss (``torch.set_default_dtype(torch.float64)``) keeps its precision in the
    running mean: the in-place sum never narrows it to float32."""
    means = RunningMeans()
    means.add({"x": torch.tensor(1.0, dtype=torch.float64)}, 1)
    for _ in range(2000):
        means.add({"x": torch.tensor(1e-9, dtype=torch.float64)}, 1)
    exact = (1 + 1e-9 * 2000) / 2001
    assert means.result()["x"] == pytest.approx(exact, rel=1e-12)


def test_adding_the_loss_in_place_sums_as_add_loss_does_across_logs_reloads_and_snapshots():
    """``LogCollector.loss_in_place`` used as fit's plain loop uses it (float32 losses added
    to the total it gave while ``totals.get("loss") is total`` and ``"loss" in unshared``;
    fetched again after each ``add_loss``) against ``add_loss`` on the same losses, with
    what can come between two batches: a reload of the state, a snapshot, a total kept
    whole (as a loss watch keeps one), a float32 and a float64 value logged as the loss, an
    empty batch. The totals and weights agree exactly, and the kept tensors are unchanged."""
    from torcheras.logs import LogCollector

    g = torch.Generator().manual_seed(0)
    losses = [torch.rand((), generator=g) for _ in range(16)]
    events = {
        3: "reload",
        5: "snapshot",
        7: "keep",
        9: "log32",
        10: "reload, log32",  # the dicts given before the reload must not take the add
        11: "empty",
        13: "log64",
    }
    results, in_place_adds = [], 0
    for in_place in (False, True):
        collector = LogCollector([])
        totals = total = weights = unshared = None
        held = []  # (tensor, its value then): what a snapshot or a keep holds
        for i, loss in enumerate(losses):
            event = events.get(i)
            if event in ("reload", "reload, log32"):
                collector.load_state_dict(collector.state_dict())
            elif event == "snapshot":
                collector.snapshot()
                kept = collector.means.entry("loss")[0]
                held.append((kept, kept.clone()))
            elif event == "keep":
                kept = collector.means.entry("loss")[0]
                collector.means.keep("loss")
                held.append((kept, kept.clone()))
            if event in ("log32", "log64", "reload, log32"):
                collector.log("loss", loss.to(torch.float64 if event == "log64" else None) * 2)
            weight = 0 if event == "empty" else 8
            if (
                in_place
                and total is not None
                and weight
                and totals.get("loss") is total
                and "loss" in unshared
            ):
                total.add_(loss, alpha=weight)
                weights["loss"] += weight
                in_place_adds += 1
            else:
                collector.add_loss(loss, weight)
                if in_place:
                    totals, total, weights, unshared = collector.loss_in_place()
        results.append(collector.means.state_dict())
        for tensor, value in held:
            assert torch.equal(tensor, value)
    reference, fast = results
    assert fast["weights"] == reference["weights"]
    assert fast["totals"].keys() == reference["totals"].keys()
    for key, total in reference["totals"].items():
        assert fast["totals"][key].dtype == total.dtype == torch.float64  # the log64 promoted
        torch.testing.assert_close(fast["totals"][key], total, rtol=0, atol=0)
    # all but the first, the two reloads', the snapshot's, the keep's, the empty batch's
    # and those from the float64 log on (a float64 total)
    assert in_place_adds == 16 - 9


def test_no_loss_total_is_given_to_add_to_where_add_loss_does_more():
    """``loss_in_place`` is all None where ``add_loss`` does more than one
    in-place addition: no total yet, a tracked ``"loss"``, a float64 total, a total a
    snapshot holds; not for a loss watch (TerminateOnNaN's), which the loop tells itself."""
    from torcheras.logs import LogCollector, LossWatch
    from torcheras.metrics import Mean

    def collector_with(loss, **kwargs):
        collector = LogCollector([], **kwargs)
        if loss is not None:
            collector.add_loss(loss, 4)
        return collector

    assert collector_with(torch.tensor(1.0)).loss_in_place()[1] is not None
    assert collector_with(None).loss_in_place() == (None, None, None, None)
    promoted = collector_with(torch.tensor(1.0))
    promoted.log("loss", torch.tensor(1.0, dtype=torch.float64))  # a float64 total now
    assert promoted.loss_in_place()[1] is None
    snapshotted = collector_with(torch.tensor(1.0))
    snapshotted.snapshot()
    assert snapshotted.loss_in_place()[1] is None
    tracked = collector_with(None, tracked={"loss": Mean(name="loss")})
    tracked.means.add({"loss": torch.tensor(1.0)}, 4)  # a float32 total, unshared, of "loss"
    tracked.add_loss(torch.tensor(1.0), 4)
    assert tracked.means.entry("loss") is not None and "loss" in tracked.means._unshared
    assert tracked.loss_in_place()[1] is None
    watched = collector_with(None)  # a watch is told by the loop itself (LossWatch.note)
    watched.watch = LossWatch(watched, types.SimpleNamespace(batch=0), "loss", 8, print)
    watched.add_loss(torch.tensor(1.0), 4)
    assert watched.loss_in_place()[1] is watched.means.entry("loss")[0]
