"""Running means kept on the device, and a lazy view of them for batch logs.

The training loop adds each step's returned values here without reading them back to the
host. Values are turned into Python floats only when somebody reads them: once per epoch
for the epoch logs, and for batch logs only when a callback actually looks at a key. That is
how ``fit`` avoids a device synchronisation per batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from functools import partial
from operator import truediv
from typing import Any

import torch

from torcheras.metrics import _LAST_RESULTS, result_of
from torcheras.tensors import map_tensors, to_cpu

__all__ = ["BatchLogs", "LogCollector", "LossWatch", "RunningMeans", "to_float_logs"]

_RESULT_IDS = _LAST_RESULTS.data  # ids of the tensors metrics' ``result`` returned last


class RunningMeans:
    """Weighted running means of named values, accumulated on the values' own device.

    >>> means = RunningMeans()
    >>> means.add({"loss": torch.tensor(2.0)}, weight=4)
    >>> means.add({"loss": torch.tensor(1.0)}, weight=4)
    >>> means.result()
    {'loss': 1.5}
    """

    def __init__(self) -> None:
        self._totals: dict[str, torch.Tensor | float] = {}
        self._weights: dict[str, float] = {}
        # keys whose total tensor no snapshot holds: added to in place (no new tensor a batch)
        self._unshared: set[str] = set()

    def add(self, values: Mapping[str, Any], weight: float = 1.0) -> None:
        """Add one step's values (tensors or numbers), each counted ``weight`` times.

        A total a snapshot holds is replaced, not changed in place, so the snapshot keeps its
        values without a copy; one no snapshot holds is added to in place."""
        totals, weights, unshared = self._totals, self._weights, self._unshared
        if not weight:  # an empty batch (a rank's empty part of a short last batch): its
            values = dict.fromkeys(values, 0.0)  # mean of nothing is nan, and counts nothing
        for key, value in values.items():
            total = totals.get(key)
            if type(value) is torch.Tensor:
                value = value.detach()
                if value.ndim:
                    value = value.float().mean()
                if key in unshared and total.dtype is value.dtype:  # type: ignore[union-attr]
                    total.add_(value, alpha=weight)  # type: ignore[union-attr]
                elif type(total) is torch.Tensor:
                    totals[key] = torch.add(total, value, alpha=weight)
                    unshared.add(key)
                else:
                    totals[key] = value.float() * weight + (total or 0.0)
                    unshared.add(key)
            else:
                totals[key] = (total if total is not None else 0.0) + float(value) * weight
            weights[key] = weights.get(key, 0.0) + weight

    def keys(self) -> list[str]:
        return list(self._totals)

    def keep(self, key: str) -> None:
        """Leave ``key``'s current total tensor as it is: the next add makes a new one."""
        self._unshared.discard(key)

    def entry(self, key: str) -> tuple[torch.Tensor | float, float] | None:
        """``key``'s running total and weight as they are now (None if never added)."""
        total = self._totals.get(key)
        return None if total is None else (total, self._weights[key])

    def result(self) -> dict[str, float]:
        """The means as Python floats; one device-to-host copy for all tensor values."""
        return dict(zip(self._totals, _as_floats(self.result_tensors())))

    def result_tensors(self) -> list[torch.Tensor | float]:
        return [total / self._weights[key] for key, total in self._totals.items()]

    def snapshot(self) -> dict[str, Any]:
        """The current means, each computed only when read (no device work now)."""
        self._unshared.clear()  # the snapshot holds every total: the next add replaces it
        weights = self._weights
        return {key: partial(truediv, total, weights[key]) for key, total in self._totals.items()}

    def reset(self) -> None:
        self._totals.clear()
        self._weights.clear()
        self._unshared.clear()

    def all_reduce(self, reduce_sum: Any) -> None:
        """Replace the sums and counts by their sums over every rank (``reduce_sum``: a list
        of values -> the list of their sums)."""
        keys = list(self._totals)
        sums = reduce_sum([self._totals[k] for k in keys] + [self._weights[k] for k in keys])
        # the dicts kept, their contents replaced (LogCollector.loss_in_place hands them out)
        self._totals.clear()
        self._totals.update(zip(keys, sums[: len(keys)]))
        self._weights.clear()
        self._weights.update((k, float(w)) for k, w in zip(keys, sums[len(keys) :]))
        self._unshared.clear()  # the reduced tensors may be the ones given

    def state_dict(self) -> dict[str, Any]:
        """Exact state (CPU tensors): a resumed epoch logs what an unbroken one would."""
        return {"totals": to_cpu(self._totals, clone=True), "weights": dict(self._weights)}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device | None = None) -> None:
        totals = {
            k: (v.to(device) if isinstance(v, torch.Tensor) and device is not None else v)
            for k, v in state["totals"].items()
        }
        weights = dict(state["weights"])
        self._totals.clear()  # the dicts kept (see all_reduce)
        self._totals.update(totals)
        self._weights.clear()
        self._weights.update(weights)
        self._unshared.clear()  # the state's tensors are the caller's


def _as_floats(values: list[torch.Tensor | float]) -> list[float]:
    """Convert a list of scalars to floats with as few device reads as possible (one per
    device). A tensor of several values (a metric with one value per class or threshold)
    becomes a list of floats: Keras keeps such a value as an array."""
    out: list[Any] = [None] * len(values)
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(i)
        else:
            out[i] = float(v)
    for device, indices in by_device.items():
        # float64: a float32 value reads the same, and a float64 count (a metric's number of
        # true positives past 2**24) stays exact; MPS has no float64
        wide = torch.float32 if device.type == "mps" else torch.float64
        parts = [values[i].detach().reshape(-1).to(wide) for i in indices]  # type: ignore[union-attr]
        flat = torch.cat(parts).tolist()
        start = 0
        for i in indices:
            n = values[i].numel()  # type: ignore[union-attr]
            out[i] = flat[start] if n == 1 else flat[start : start + n]
            start += n
    return out


def to_float_logs(logs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Keras's ``pythonify_logs``: a new dict whose scalar tensors/arrays are Python floats."""
    if type(logs) is BatchLogs:  # lazy batch logs pass through untouched (the hot path)
        return logs  # type: ignore[return-value]
    if not logs:
        return {}
    out: dict[str, Any] = {}
    scalars: list[str] = []
    for key, value in logs.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            scalars.append(key)
            out[key] = value
        elif hasattr(value, "dtype") and getattr(value, "size", 0) == 1 and hasattr(value, "item"):
            out[key] = float(value.item())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
        else:
            out[key] = value
    if scalars:
        for key, f in zip(scalars, _as_floats([out[k] for k in scalars])):
            out[key] = f
    return out


def _resolve(value: Any) -> Any:
    """A snapshot value: a tensor or number, or a deferred metric result (a callable)."""
    return value() if callable(value) else value


class BatchLogs(MutableMapping[str, Any]):
    """The logs of one batch: a snapshot of its values, read from the device on first read.

    Behaves like the ``dict`` of floats Keras passes: ``logs["loss"]``, ``logs.get("acc")``,
    ``dict(logs)``, ``logs.copy()`` and ``json.dumps(dict(logs))`` all work, and a callback that
    keeps the logs of batch 3 still sees batch 3's values later. Building one costs no device
    synchronisation; the first value read converts every value of the batch at once.
    """

    __slots__ = ("_snapshot", "_values", "_extra", "_deleted", "_sorted")

    def __init__(self, snapshot: dict[str, Any]) -> None:
        self._snapshot = snapshot  # tensors (or deferred results) that nothing changes later
        self._values: dict[str, Any] | None = None
        # keys set / deleted by callbacks: made on the first edit (most batch logs get none)
        self._extra: dict[str, Any] | None = None
        self._deleted: set[str] | None = None
        self._sorted = False

    def _materialize(self) -> dict[str, Any]:
        if self._values is None:
            values = [_resolve(v) for v in self._snapshot.values()]
            self._values = dict(zip(self._snapshot, _as_floats(values)))
        return self._values

    def _keys(self) -> dict[str, Any]:
        if not self._sorted:  # sorted when first iterated, not per batch
            self._snapshot = dict(sorted(self._snapshot.items()))
            self._sorted = True
        return self._snapshot

    def _has(self, key: object) -> bool:
        return key in self._snapshot and (self._deleted is None or key not in self._deleted)

    def _shown(self) -> Iterator[str]:
        """The snapshot's keys neither deleted nor replaced by a callback's own value."""
        deleted, extra = self._deleted or (), self._extra or {}
        return (k for k in self._keys() if k not in deleted and k not in extra)

    def __getitem__(self, key: str) -> Any:
        extra = self._extra
        if extra is not None and key in extra:
            return extra[key]
        if not self._has(key):
            raise KeyError(key)
        return self._materialize()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if self._extra is None:
            self._extra = {}
        self._extra[key] = value

    def __delitem__(self, key: str) -> None:
        if self._extra is not None and key in self._extra:
            del self._extra[key]
        elif self._has(key):
            if self._deleted is None:
                self._deleted = set()
            self._deleted.add(key)
        else:
            raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        yield from self._shown()
        yield from self._extra or ()

    def __len__(self) -> int:
        return sum(1 for _ in self._shown()) + len(self._extra or ())

    def __bool__(self) -> bool:  # ``logs or {}`` per batch: no count, no sort
        if self._extra:
            return True
        deleted = self._deleted or ()
        return any(k not in deleted for k in self._snapshot)

    def __contains__(self, key: object) -> bool:
        return (self._extra is not None and key in self._extra) or self._has(key)

    def __repr__(self) -> str:
        return f"BatchLogs({dict(self)!r})"

    def copy(self) -> dict[str, Any]:
        """A plain ``dict`` of floats, as ``dict.copy`` gives for Keras's logs."""
        return dict(self)

    def raw(self, key: str) -> Any:
        """The value of ``key`` as it is on the device (a tensor), without synchronising."""
        if self._extra is not None and key in self._extra:
            return self._extra[key]
        if not self._has(key):
            raise KeyError(key)
        return _resolve(self._snapshot[key])

    @property
    def edited(self) -> bool:
        """Whether a callback set or deleted a key (the values are then not all the loop's)."""
        return self._extra is not None or self._deleted is not None

    @property
    def materialized(self) -> bool:
        """Whether a value has been read (and so the device was synchronised)."""
        return self._values is not None


class LogCollector:
    """What one pass (a training epoch, an evaluation) logs: running means of the values the
    steps return, and the results of the metrics.

    ``metrics`` are the compiled metrics (their results are logged under their names);
    ``tracked`` are metric objects kept on the model (Keras's tracked metrics). A step that
    returns a metric's result (``{"loss": self.total_loss_tracker.result()}``, whatever the
    key), or a key naming a tracked metric, logs that metric's result as Keras does, not a
    running mean of the running results it returned.
    """

    def __init__(self, metrics: list[Any], tracked: Mapping[str, Any] | None = None) -> None:
        self.means = RunningMeans()
        self.metrics = metrics
        self.tracked = dict(tracked or {})
        self.returned: dict[str, Any] = {}  # keys the steps returned a metric's result for
        self.batch_size = 1  # the running batch's size: Model.log's default weight
        self.watch: LossWatch | None = None  # a value checked now and then (TerminateOnNaN)

    def reset(self) -> None:
        self.means.reset()
        self.returned.clear()
        if self.watch is not None:
            self.watch.reset()
        for metric in self.metrics:
            metric.reset()
        for metric in self.tracked.values():
            metric.reset()

    def add(self, logs: Mapping[str, Any], weight: float) -> None:
        """Add one step's returned values, counted ``weight`` times (the batch size)."""
        rest = None
        tracked = self.tracked
        for key, value in logs.items():
            metric = tracked.get(key) if tracked else None
            if metric is None and type(value) is torch.Tensor and id(value) in _RESULT_IDS:
                metric = result_of(value)
            if metric is not None:
                self.returned[key] = metric
                if rest is None:
                    rest = dict(logs)
                del rest[key]
        self.means.add(logs if rest is None else rest, weight)

    def add_loss(self, loss: torch.Tensor, weight: float) -> None:
        """``add({"loss": loss}, weight)``, the default step's logs, without the dict: the
        running total is added to in place once no snapshot holds it, else replaced by a new
        one, as ``RunningMeans.add`` does. A loss watch is told the value added."""
        means = self.means
        if weight and not loss.ndim and "loss" not in self.tracked:
            totals = means._totals
            total = totals.get("loss")
            if type(total) is torch.Tensor:  # RunningMeans.add's two tensor cases
                value = loss.detach()
                watch = self.watch
                if watch is not None and watch.key == "loss":
                    watch.note(total, means._weights["loss"], value, weight)
                if "loss" in means._unshared and total.dtype is value.dtype:
                    total.add_(value, alpha=weight)
                else:  # a snapshot holds this total: a new one
                    totals["loss"] = torch.add(total, value, alpha=weight)
                    means._unshared.add("loss")
                means._weights["loss"] += weight
                return
        self.add({"loss": loss}, weight)

    def loss_in_place(
        self,
    ) -> (
        tuple[dict[str, Any], torch.Tensor, dict[str, float], set[str]]
        | tuple[None, None, None, None]
    ):
        """For a loop that adds the batches' losses itself (fit's plain loop), right after an
        :meth:`add_loss`: ``(totals, total, weights, unshared)``, the running totals, the
        loss's, the weights and the keys no snapshot holds, where :meth:`add_loss` of a
        float32 scalar ``loss`` with a nonzero ``weight`` would do no more than
        ``total.add_(loss.detach(), alpha=weight)`` and ``weights["loss"] += weight``, after
        telling a watch of ``"loss"`` of it (``LossWatch.note``). That stays so while
        ``totals.get("loss") is total`` (a value of another dtype logged as ``"loss"``
        replaces it) and ``"loss" in unshared`` (a snapshot, a reload, an all-reduce or a
        loss watch keeping the batch's total whole ends it; the dicts and the set are kept,
        their contents changed). All None
        where :meth:`add_loss` does more: a tracked ``"loss"``, a total that is not float32
        or that a snapshot holds."""
        means = self.means
        total = means._totals.get("loss")
        if (
            "loss" in self.tracked
            or type(total) is not torch.Tensor
            or total.dtype is not torch.float32
            or "loss" not in means._unshared
        ):
            return None, None, None, None
        return means._totals, total, means._weights, means._unshared

    def log(self, name: str, value: Any, weight: float | None = None) -> None:
        """A value logged from inside a step or a batch hook (``Model.log``), counted
        ``weight`` times (default: the running batch's size)."""
        if name in self.tracked or any(m.name == name for m in self.metrics):
            raise ValueError(
                f"log({name!r}, ...): {name!r} is already a compiled or tracked metric's name; "
                "log the value under another name."
            )
        self.means.add({name: value}, self.batch_size if weight is None else weight)
        if self.watch is not None and name == self.watch.key:
            self.watch.logged()

    def values(self) -> dict[str, Any]:
        """The current values, as device tensors or floats (no synchronisation)."""
        out: dict[str, Any] = dict(zip(self.means.keys(), self.means.result_tensors()))
        for metric in self.metrics:
            out[metric.name] = metric.result()
        for key, metric in self.returned.items():
            out[key] = metric.result()
        return out

    def result(self) -> dict[str, float]:
        """The values as Python floats, sorted by key, with one device read."""
        values = self.values()
        return dict(sorted(zip(values, _as_floats(list(values.values())))))

    def snapshot(self) -> BatchLogs:
        """The batch logs as of now, nothing computed now: each value is resolved when read
        (a running mean, or a metric that can snapshot its state; once per batch when a
        callback reads batch logs)."""
        out = self.means.snapshot()
        for metric in self.metrics:
            snap = getattr(metric, "snapshot", None)
            out[metric.name] = metric.result() if snap is None else snap()
        for key, metric in self.returned.items():
            snap = getattr(metric, "snapshot", None)
            out[key] = metric.result() if snap is None else snap()
        return BatchLogs(out)

    def all_reduce(self, reduce_sum: Any) -> None:
        """Replace this rank's sums and counts by their sums over every rank (``reduce_sum``:
        a list of values -> the list of their sums), so that ``result`` gives global means, not
        means of means. Metrics with their own sync (torchmetrics) sync in ``compute``."""
        self.means.all_reduce(reduce_sum)
        reduced: set[int] = set()  # a metric returned by the step may be tracked as well
        for metric in [*self.metrics, *self.tracked.values(), *self.returned.values()]:
            if id(metric) not in reduced and hasattr(metric, "all_reduce"):
                reduced.add(id(metric))
                metric.all_reduce(reduce_sum)

    def state_dict(self) -> dict[str, Any]:
        return {
            "means": self.means.state_dict(),
            "metrics": [m.state_dict() for m in self.metrics],
            "tracked": {k: m.state_dict() for k, m in self.tracked.items()},
            # key -> the tracked metric's name (a metric not kept on the model is not saved)
            "returned": {
                key: name
                for key, metric in self.returned.items()
                for name, kept in self.tracked.items()
                if kept is metric
            },
        }

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device | None = None) -> None:
        def to_device(obj: Any) -> Any:
            return map_tensors(lambda t: t.to(device) if device is not None else t, obj)

        self.means.load_state_dict(state["means"], device)
        for metric, saved in zip(self.metrics, state["metrics"]):
            metric.load_state_dict(to_device(saved))
        for key, saved in state.get("tracked", {}).items():
            if key in self.tracked:
                self.tracked[key].load_state_dict(to_device(saved))
        returned = state.get("returned", {})
        if isinstance(returned, list):  # format 1: the keys named tracked metrics
            returned = {key: key for key in returned}
        self.returned = {
            key: self.tracked[name] for key, name in returned.items() if name in self.tracked
        }


class LossWatch:
    """Finds the first batch whose logged value of ``key`` (the running mean its batch logs
    would show, or a tracked metric's result) is NaN or infinite, without building batch
    logs: it reads the device once per :meth:`check`, the newest value, and only when that
    one is bad does it look back over the batches since the last check, to call
    ``on_bad(batch, value)`` with the first bad one.

    TerminateOnNaN's check inside ``fit`` when no other callback has a batch-end hook. The
    loop calls :meth:`end_batch` where it would build batch logs, and :meth:`check` after an
    epoch's last batch. A loss added by ``LogCollector.add_loss`` (or in place by fit's
    plain loop, which notes it the same way) stays added to in place:
    the watch keeps the value each batch added (:meth:`note`, the detached loss, copied only
    where it was written in place) and the total before the first of them, and rebuilds the
    running totals from those with the same float32 additions only when the newest is bad.
    A value added otherwise (a step's logs, ``Model.log`` of ``key``) keeps that batch's
    total, which the next add then replaces.
    """

    def __init__(
        self,
        collector: LogCollector,
        loop: Any,
        key: str,
        every: int,
        on_bad: Callable[[int, float], None],
    ) -> None:
        self.collector, self.loop, self.key = collector, loop, key
        self.every = every  # check after this many batches
        self.on_bad = on_bad
        self.batches = 0  # batches since the last check
        # since the last check, in order: (batch, running total, its weight) kept whole, a
        # tracked metric's result (deferred) with weight None, or (batch, ADDED, (value,
        # weight)) for a value added in place
        self.pending: list[tuple[int, Any, Any]] = []
        self.base: tuple[torch.Tensor, float] | None = None  # the total before the first
        self._noted = False  # this batch's value was added in place
        self._logged = False  # Model.log added to ``key`` since the last batch's end

    def note(
        self, total: torch.Tensor, total_weight: float, value: torch.Tensor, weight: float
    ) -> None:
        """``LogCollector.add_loss`` (or fit's plain loop, where it adds the loss itself:
        ``LogCollector.loss_in_place``) is about to add ``value`` x ``weight`` to ``total``.
        The value is kept as it is (a loss the step made fresh), or copied where it was
        written in place before (a loss kept in one tensor reused every batch)."""
        if self.base is None:  # the first since the last check: a copy of the total it
            self.base = (total.clone(), total_weight)  # starts from
        if value._version:  # written in place since it was made: it may be again
            value = value.clone()
        self.pending.append((self.loop.batch, _ADDED, (value, weight)))
        self._noted = True

    def logged(self) -> None:
        """``Model.log`` added to ``key``'s total: this batch's total is kept whole (a noted
        value alone would not rebuild it)."""
        self._logged = True

    def end_batch(self) -> None:
        """At a training batch's end, where batch logs would be built: keep what rebuilds
        the value they would show (if the logs hold ``key``), and check every ``every``
        batches."""
        if self._logged:  # Model.log added to the total too: the batch's total is kept
            if self._noted:  # (it stands for this batch's note, which it includes)
                self.pending.pop()
            self._noted = self._logged = False
            self._keep()
        elif self._noted:  # added in place: note() kept the value
            self._noted = False
        else:
            self._keep()
        self.batches += 1
        if self.batches >= self.every:
            self.check()

    def _keep(self) -> None:
        key, collector = self.key, self.collector
        metric = collector.returned.get(key) if collector.returned else None
        if metric is not None:  # the logs show the metric's result, not a running mean
            snap = getattr(metric, "snapshot", None)
            self.pending.append(
                (self.loop.batch, metric.result() if snap is None else snap(), None)
            )
        else:
            means = collector.means
            entry = means.entry(key)
            if entry is not None and entry[1]:  # (an empty batch so far counts nothing)
                means.keep(key)  # the next add makes a new total: this one stays as it is
                self.pending.append((self.loop.batch, *entry))

    def reset(self) -> None:
        self.pending.clear()
        self.base, self._noted, self._logged = None, False, False
        self.batches = 0

    def check(self) -> None:
        """Read the newest value; if it is bad, find the first bad batch and report it."""
        pending, base = self.pending, self.base
        self.pending, self.base, self.batches = [], None, 0
        if not pending:
            return
        _, total, weight = pending[-1]
        # a running mean stays bad once it is: the newest fine means every one was
        if total is _ADDED:  # the collector's total, as of now (its weight is above zero)
            total, weight = self.collector.means.entry(self.key)  # type: ignore[misc]
            if math.isfinite(float(total)):
                return
        elif math.isfinite(_as_floats([_value(total, weight)])[0]):
            return
        values = _as_floats(_rebuilt(pending, base))
        for (batch, _, _), value in zip(pending, values):
            if not math.isfinite(value):
                self.on_bad(batch, value)
                return
        # the rebuilt values missed it (a total changed some way not noted): never silent
        self.on_bad(pending[-1][0], _as_floats([_value(total, weight)])[0])


_ADDED = object()  # a LossWatch entry for a value added in place


def _rebuilt(
    pending: list[tuple[int, Any, Any]], base: tuple[torch.Tensor, float] | None
) -> list[Any]:
    """Each pending batch's value as its batch logs would show it: a kept total or result
    as it is; a value added in place, from the total before it, by the same addition."""
    out: list[Any] = []
    total, weight = base if base is not None else (None, 0.0)
    for _, kept, kept_weight in pending:
        if kept is _ADDED:
            value, w = kept_weight
            total = torch.add(total, value, alpha=w)  # add_loss's addition, out of place
            weight += w
            out.append(total / weight)
            continue
        out.append(_value(kept, kept_weight))
        if kept_weight is not None:
            total, weight = kept, kept_weight
    return out


def _value(total: Any, weight: float | None) -> Any:
    """A kept value as batch logs show it: a running mean, or a metric's result."""
    return _resolve(total) if weight is None else total / weight
