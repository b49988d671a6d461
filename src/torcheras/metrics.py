"""Metric names to stateful metric objects, each with a known direction.

A metric accumulates on the device (no host read per batch) and is read once when the logs
are. ``direction`` is ``"max"`` for accuracy-like metrics and ``"min"`` for error-like ones;
``mode="auto"`` in the monitoring callbacks uses it.

Keras's metric classes are here under their names, with Keras's arguments and defaults:
means of a per-sample function (``MeanSquaredError``, ``CategoricalAccuracy``, ...) and
``R2Score`` below, the confusion-matrix metrics (``Precision``, ``Recall``, ``AUC``, the
counts, the F-scores, the IoUs...) in :mod:`torcheras.confusion`. Their update also takes
Keras's spelling, ``update_state(y_true, y_pred, sample_weight)``.
"""

from __future__ import annotations

import functools
import sys
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from torcheras import losses
from torcheras.registry import lookup
from torcheras.tensors import to_cpu

__all__ = [
    "AUC",
    "Accuracy",
    "BinaryAccuracy",
    "BinaryCrossentropy",
    "BinaryIoU",
    "CategoricalAccuracy",
    "CategoricalCrossentropy",
    "CategoricalHinge",
    "ConcordanceCorrelation",
    "CosineSimilarity",
    "F1Score",
    "FBetaScore",
    "FalseNegatives",
    "FalsePositives",
    "Hinge",
    "IoU",
    "KLDivergence",
    "LogCoshError",
    "Mean",
    "MeanAbsoluteError",
    "MeanAbsolutePercentageError",
    "MeanIoU",
    "MeanMetric",
    "MeanMetricWrapper",
    "MeanSquaredError",
    "MeanSquaredLogarithmicError",
    "Metric",
    "OneHotIoU",
    "OneHotMeanIoU",
    "OutputMetric",
    "PearsonCorrelation",
    "Poisson",
    "Precision",
    "PrecisionAtRecall",
    "R2Score",
    "Recall",
    "RecallAtPrecision",
    "RootMeanSquaredError",
    "SensitivityAtSpecificity",
    "SparseCategoricalAccuracy",
    "SparseCategoricalCrossentropy",
    "SparseTopKCategoricalAccuracy",
    "SpecificityAtSensitivity",
    "SquaredHinge",
    "StateMetric",
    "Sum",
    "TopKCategoricalAccuracy",
    "TrueNegatives",
    "TruePositives",
    "count_dtype",
    "direction_of",
    "get",
    "per_output",
    "result_of",
    "tracked",
]


class Metric:
    """Base class: ``update(y_pred, y_true, sample_weight)``, ``result()``, ``reset()``.

    Subclass it for a custom stateful metric; set ``direction`` to ``"max"`` or ``"min"``.
    """

    name: str = "metric"
    direction: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "result" in cls.__dict__:
            cls.result = _marking_its_result(cls.__dict__["result"])  # type: ignore[method-assign]

    def update(self, y_pred: Any, y_true: Any, sample_weight: Tensor | None = None) -> None:
        raise NotImplementedError

    def result(self) -> Tensor | float:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        """Keras's spelling and argument order (``y_true`` first): ``update(y_pred, y_true)``."""
        y_true, y_pred = torch.as_tensor(y_true), torch.as_tensor(y_pred)
        if sample_weight is not None:
            sample_weight = torch.as_tensor(sample_weight, device=y_pred.device)
        self.update(y_pred, y_true.to(y_pred.device), sample_weight)

    def reset_state(self) -> None:
        """Keras's spelling of :meth:`reset`."""
        self.reset()


# The tensor each metric's ``result`` last returned, by id (checked by identity when read):
# a step that returns it under any key (``{"loss": self.total_loss_tracker.result()}``) logs
# the metric's result, as Keras does, not a running mean of running results. The tensor itself
# is left unmarked, so it pickles and copies as any other.
_LAST_RESULTS: weakref.WeakValueDictionary[int, Metric] = weakref.WeakValueDictionary()


def result_of(value: Any) -> Metric | None:
    """The metric whose ``result()`` returned ``value`` last, if any."""
    ref = _LAST_RESULTS.data.get(id(value))  # the dict itself: one C lookup per call
    metric = ref() if ref is not None else None
    return metric if metric is not None and metric._last_result is value else None


def _marking_its_result(result: Callable[[Any], Any]) -> Callable[[Any], Any]:
    @functools.wraps(result)
    def marked(self: Metric) -> Any:
        value = result(self)
        if isinstance(value, Tensor):
            last = self.__dict__.get("_last_result")
            if last is not None:
                _LAST_RESULTS.pop(id(last), None)
            self._last_result = value
            _LAST_RESULTS[id(value)] = self
        return value

    return marked


# The snapshot of a metric that has seen nothing: 0.0 when read (one shared, picklable object).
_NOTHING_YET = functools.partial(float, 0.0)


class StateMetric(Metric):
    """A metric whose state is a few tensors, each a sum over batches: counts per threshold,
    a confusion matrix, sums of values and squares.

    A subclass says what one batch adds (``_sums``) and how the result follows from the
    state (``_compute``). The sums stay on the device and are added out of place, so a batch
    snapshot keeps the state it saw without a copy and no value is read from the device per
    batch; under torchrun every tensor is summed over the ranks at the end of an epoch (the
    global counts, not a mean of per-rank results); ``state_dict`` saves them for a resume.
    """

    def __init__(self, name: str, direction: str | None) -> None:
        self.name = name
        self.direction = direction
        self._state: dict[str, Tensor] | None = None

    def _sums(self, y_pred: Tensor, y_true: Tensor, weights: Tensor | None) -> dict[str, Tensor]:
        """What one batch adds to the state (``y_pred`` detached, in float32 or wider)."""
        raise NotImplementedError

    def _compute(self, state: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def _empty(self) -> dict[str, Tensor] | None:
        """The state before any batch, where its shape does not depend on the data."""
        return None

    def update(self, y_pred: Any, y_true: Any, sample_weight: Tensor | None = None) -> None:
        with torch.no_grad():
            y_pred = y_pred.detach()
            if y_pred.dtype in losses._HALF or not y_pred.is_floating_point():
                y_pred = y_pred.float()  # Keras's metrics compute in float32 too
            sums = self._sums(y_pred, y_true, sample_weight)
        if self._state is not None:
            sums = {k: self._state[k].to(v.device) + v for k, v in sums.items()}
        self._state = sums

    def result(self) -> Tensor | float:
        state = self._state if self._state is not None else self._empty()
        return 0.0 if state is None else self._compute(state)

    def snapshot(self) -> Callable[[], Tensor | float]:
        """The result as of now, computed only when called (the state is never changed in
        place, so nothing is copied)."""
        state = self._state
        return _NOTHING_YET if state is None else functools.partial(self._compute, state)

    def all_reduce(self, reduce_sum: Callable[[list[Any]], list[Any]]) -> None:
        """Sum the state over every rank (distributed training)."""
        state = self._state if self._state is not None else self._empty()
        if state is not None:
            self._state = dict(zip(state, reduce_sum(list(state.values()))))

    def reset(self) -> None:
        self._state = None

    def state_dict(self) -> dict[str, Any]:
        return {} if self._state is None else to_cpu(self._state, clone=True)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = dict(state) or None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def count_dtype(device: torch.device) -> torch.dtype:
    """Counts and sums are kept in float64 (exact to 2**53; float32 stops counting ones at
    2**24), float32 where the device has no float64 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _mean_of(total: Tensor, count: Tensor | float, transform: Any) -> Tensor:
    """A mean metric's result from a held total and count (what its snapshots compute)."""
    mean = total / count
    return transform(mean) if transform is not None else mean


class MeanMetric(Metric):
    """The (weighted) mean of a per-sample function over everything seen since ``reset``.

    >>> m = MeanMetric(lambda p, t: (p - t).abs(), name="mae", direction="min")
    >>> m.update(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
    >>> float(m.result())
    1.5
    """

    def __init__(
        self,
        fn: Callable[[Any, Any], Tensor],
        name: str,
        direction: str | None = None,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.fn = fn
        self.name = name
        self.direction = direction
        self.transform = transform
        # the shortcuts below compute what ``fn`` and ``_add`` give: not for a subclass's own
        # ``_add``, and each only while ``fn`` is the function it was made for
        plain = type(self)._add is MeanMetric._add
        self._counts_argmax_hits = plain and getattr(fn, "counts_argmax_hits", False)
        self._elementwise = fn if plain and getattr(fn, "sums_elements", False) else None
        # Whether labels may hold -100 (padding): the loops clear it for a pass over arrays
        # that hold none, so that an accuracy counts its labels without a mask per batch.
        self.padded_labels = True
        self._total: Tensor | None = None
        self._count: Tensor | float = 0.0
        self._total_unshared = False  # no snapshot holds ``_total``: added to in place

    # Set where ``fn`` is a sparse accuracy (the argmax over the classes against the labels):
    # its hits for (N, C) outputs and (N,) labels are then counted in one expression.
    _counts_argmax_hits = False
    # ``fn`` where it gives one value per element (absolute or squared errors): for float32
    # outputs and targets of one shape, their sum is added in one expression.
    _elementwise: Callable[[Any, Any], Tensor] | None = None

    def update(self, y_pred: Any, y_true: Any, sample_weight: Tensor | None = None) -> None:
        if (
            self._counts_argmax_hits
            and sample_weight is None
            and not self.padded_labels  # (a label of -100 is never a hit: only the count
            and self._total_unshared  # of labels would need the mask)
            and type(y_pred) is Tensor
            and type(y_true) is Tensor
            and y_pred.ndim == 2
            and y_true.ndim == 1
            and y_pred.shape[1] > 1  # one column: a binary accuracy
        ):  # what the steps below compute, in the raw loop's four device ops (argmax: no grad)
            self._total.add_((y_pred.argmax(1) == y_true).sum())  # type: ignore[union-attr]
            self._count = self._count + y_true.shape[0]
            return
        if (
            self._elementwise is self.fn
            and sample_weight is None
            and self._total_unshared  # (a float32 total, as every float32 value made it)
            and type(y_pred) is Tensor
            and type(y_true) is Tensor
            and y_pred.dtype is torch.float32
            and y_true.dtype is torch.float32
            and not y_true.requires_grad  # (the values keep no graph)
            and y_pred.ndim
            and y_pred.shape == y_true.shape
        ):  # what the steps below compute for these, without their checks
            values = self.fn(y_pred.detach(), y_true)
            self._total.add_(values.sum())  # type: ignore[union-attr]
            self._count = self._count + float(values.numel())
            return
        if type(y_pred) is Tensor:  # the common case: detached, no grad-mode switch per batch
            y_pred = y_pred.detach()
            if y_pred.dtype in losses._HALF:
                y_pred = y_pred.float()  # Keras's metrics compute in float32 too
            self._add(self.fn(y_pred, y_true), y_pred, sample_weight)
        else:
            with torch.no_grad():
                self._add(self.fn(y_pred, y_true), y_pred, sample_weight)

    def _add(self, values: Any, y_pred: Any, sample_weight: Tensor | None) -> None:
        if type(values) is _Kept:  # hits and their labels: -100 (padding) counts for nothing
            hits, labels = values
            if sample_weight is None:  # counts, exact: no cast, no mask on the hits (a
                total = hits.sum()  # label of -100 is never a hit)
                if self.padded_labels:
                    count = (labels != losses.IGNORE_INDEX).sum()
                else:
                    count = float(labels.numel())
            else:
                w = (labels != losses.IGNORE_INDEX) * losses.weights_like(
                    hits.float(), sample_weight
                )
                total, count = (hits * w).sum(), w.sum()
        else:
            if not isinstance(values, Tensor):
                values = torch.as_tensor(values, dtype=torch.float32)
            if values.requires_grad:  # a metric of the parameters too: keep no graph
                values = values.detach()
            if values.dtype is not torch.float32 and values.dtype is not torch.bool:
                values = values.float()  # a bool (a hit) is summed as a count, exactly
            if values.dim() == 0:
                n = (
                    len(y_pred)
                    if hasattr(y_pred, "__len__") and not isinstance(y_pred, dict)
                    else 1
                )
                total, count = values * n, float(n)
            elif sample_weight is not None:  # Keras: sum(value * weight) / sum(weight)
                w = losses.weights_like(values.float(), sample_weight)
                total = (values * w).sum()
                count = w.sum() * (values.numel() // w.numel())
            else:
                total, count = values.sum(), float(values.numel())
        current = self._total
        if current is None:
            self._total, self._total_unshared = total, False  # (total may be the caller's)
        elif self._total_unshared and current.dtype is total.dtype:
            current.add_(total)  # no new tensor a batch
        else:
            self._total, self._total_unshared = current + total, True
        self._count = self._count + count

    def result(self) -> Tensor | float:
        if self._total is None:
            return 0.0
        mean = self._total / self._count
        return self.transform(mean) if self.transform is not None else mean

    def snapshot(self) -> Callable[[], Tensor | float]:
        """The result as of now, computed only when called. Nothing is copied: the total it
        holds is replaced, not changed in place, by the updates after it."""
        total = self._total
        if total is None:
            return _NOTHING_YET
        self._total_unshared = False  # held from now on: the next update replaces it
        return functools.partial(_mean_of, total, self._count, self.transform)

    def all_reduce(self, reduce_sum: Callable[[list[Any]], list[Any]]) -> None:
        """Sum the state over every rank (distributed training): the global mean."""
        total = self._total if self._total is not None else 0.0
        self._total, self._count = reduce_sum([total, self._count])
        self._total_unshared = False

    def reset(self) -> None:
        self._total = None
        self._count = 0.0
        self._total_unshared = False

    def state_dict(self) -> dict[str, Any]:
        return to_cpu({"total": self._total, "count": self._count}, clone=True)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._total, self._count = state["total"], state["count"]
        self._total_unshared = False

    def __repr__(self) -> str:
        return f"MeanMetric(name={self.name!r}, direction={self.direction!r})"


class Mean(MeanMetric):
    """Keras's ``metrics.Mean``: the (weighted) mean of the values given to ``update_state``.

    Assigned to a model (``self.loss_tracker = Mean(name="loss")``), it is tracked: listed in
    ``model.metrics`` and reset at the start of each epoch and each evaluation; a
    ``train_step`` that returns ``{"loss": self.loss_tracker.result()}`` logs its result.

    >>> tracker = Mean(name="loss")
    >>> tracker.update_state(torch.tensor([1.0, 3.0]))
    >>> float(tracker.result())
    2.0
    """

    def __init__(self, name: str = "mean", direction: str | None = None) -> None:
        super().__init__(lambda values, _: values, name=name, direction=direction)

    def update_state(self, values: Any, sample_weight: Any = None) -> None:
        if not isinstance(values, Tensor):
            values = torch.as_tensor(values, dtype=torch.float32)
        values = values.detach().float()
        if values.dim() == 0:
            values = values.reshape(1)
        if sample_weight is not None:  # Keras: one weight for all, per row, or per value
            sample_weight = torch.as_tensor(sample_weight, dtype=torch.float32)
            sample_weight = sample_weight.to(values.device)
            if sample_weight.numel() == 1:
                sample_weight = sample_weight.reshape(1).expand(values.shape[0])
        self.update(values, None, sample_weight)

    def reset_state(self) -> None:
        self.reset()


class BinaryAccuracy(MeanMetric):
    """How often ``y_pred > threshold`` matches binary ``y_true``; 0.0 suits logits.

    Example:
        ```python
        model.compile(loss=torch.nn.BCEWithLogitsLoss(), metrics=[BinaryAccuracy(threshold=0.0)])
        ```
    """

    def __init__(self, threshold: float = 0.5, name: str = "binary_accuracy") -> None:
        super().__init__(_binary_accuracy(float(threshold)), name=name, direction="max")
        self.threshold = float(threshold)


class TorchMetric(Metric):
    """Adapter for a ``torchmetrics.Metric``; direction from its ``higher_is_better``."""

    def __init__(self, metric: Any, name: str | None = None) -> None:
        self.metric = metric
        self.name = name or losses._snake(type(metric).__name__, acronyms=False)
        hib = getattr(metric, "higher_is_better", None)
        self.direction = None if hib is None else ("max" if hib else "min")

    def update(self, y_pred: Any, y_true: Any, sample_weight: Tensor | None = None) -> None:
        if y_pred.shape[0] == 0:  # a rank's empty part of a short batch: nothing to count
            return
        if self.metric.device != y_pred.device:
            self.metric.to(y_pred.device)
        self.metric.update(y_pred.detach(), y_true)

    def result(self) -> Tensor | float:
        return self.metric.compute()

    def snapshot(self) -> Callable[[], Any]:
        """The result as of now, computed only if read: the state is copied (device copies,
        no read), so a per-batch snapshot never runs an expensive ``compute`` (AUROC...)."""
        metric = self.metric
        state = {
            k: v.clone() if isinstance(v, Tensor) else list(v)
            for k in metric._defaults
            for v in [getattr(metric, k)]
        }
        return functools.partial(_torchmetric_result, metric, state, metric._update_count)

    def reset(self) -> None:
        self.metric.reset()

    def state_dict(self) -> dict[str, Any]:
        # torchmetrics keeps its accumulators as (non-persistent) states; save them explicitly.
        return to_cpu({k: getattr(self.metric, k) for k in self.metric._defaults}, clone=True)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self.metric, k, v)
        self.metric._update_count = 1


def _torchmetric_result(metric: Any, state: dict[str, Any], updates: int) -> Any:
    """``metric``'s result for a copied ``state`` of ``updates`` updates (a batch snapshot),
    its own state left as it was (it may have been reset since: no "compute before update"
    warning then). A batch value is this rank's (read by one rank, such as the progress
    bar's): torchmetrics' sync is a collective that only the epoch's result may make."""
    current = {k: getattr(metric, k) for k in state}
    cached, to_sync, count = metric._computed, metric._to_sync, metric._update_count
    try:
        for k, v in state.items():
            setattr(metric, k, v)
        metric._computed = None
        metric._to_sync = False
        metric._update_count = updates
        return metric.compute()
    finally:
        for k, v in current.items():
            setattr(metric, k, v)
        metric._computed, metric._to_sync, metric._update_count = cached, to_sync, count


# ---- accuracy-like functions (per sample, 1.0 = correct) --------------------------------------


class _Kept(tuple):  # type: ignore[type-arg]
    """``(hits, labels)``: the hits of an accuracy (booleans; or values, 0 where padded) and
    the labels they were scored against: positions labelled -100 (torch's ``ignore_index``,
    padding) count for nothing, as the loss names leave them out. Built as
    ``_Kept((hits, labels))``: tuple's own constructor, no Python frame per batch (a
    NamedTuple's ``__new__`` is one)."""

    __slots__ = ()

    @property
    def hits(self) -> Tensor:
        return self[0]  # a plain property: torch.compile traces it (not operator.itemgetter)

    @property
    def labels(self) -> Tensor:
        return self[1]


def sparse_categorical_accuracy(y_pred: Tensor, y_true: Tensor, axis: int = -1) -> _Kept:
    """True where the argmax over the class ``axis`` is the label."""
    if axis == -1 and y_true.dim() == y_pred.dim() and y_true.shape[-1] == 1:
        y_true = y_true.squeeze(-1)
    return _Kept((y_pred.argmax(dim=axis) == y_true, y_true))


sparse_categorical_accuracy.counts_argmax_hits = True  # type: ignore[attr-defined]


def _sparse_accuracy(axis: int) -> Callable[[Tensor, Tensor], _Kept]:
    fn = functools.partial(sparse_categorical_accuracy, axis=axis)
    fn.counts_argmax_hits = True  # type: ignore[attr-defined]
    return fn


def categorical_accuracy(y_pred: Tensor, y_true: Tensor, axis: int = -1) -> Tensor:
    return y_pred.argmax(dim=axis) == y_true.argmax(dim=axis)


def _binary_accuracy(threshold: float) -> Callable[[Tensor, Tensor], Tensor]:
    def binary_accuracy(y_pred: Tensor, y_true: Tensor) -> Tensor:
        y_true = losses._match_shape(y_pred, y_true)
        return (y_pred > threshold).to(y_true.dtype) == y_true

    return binary_accuracy


def _top_k(k: int, sparse: bool, axis: int = -1) -> Callable[[Tensor, Tensor], Tensor | _Kept]:
    def top_k(y_pred: Tensor, y_true: Tensor) -> Tensor | _Kept:
        if not sparse:
            target = y_true.argmax(dim=axis)
        elif axis == -1 and y_true.dim() == y_pred.dim():  # (N, 1) labels
            target = y_true.squeeze(-1)
        else:  # one label per position: (N,), or (N, T) for (N, T, C) / (N, C, T) outputs
            target = y_true
        top = y_pred.topk(min(k, y_pred.shape[axis]), dim=axis).indices
        hits = (top == target.unsqueeze(axis).long()).any(dim=axis)
        return _Kept((hits, target)) if sparse else hits

    return top_k


def _class_axis(loss: losses.CompiledLoss | None) -> int:
    """Where the classes lie in the outputs, as the compiled loss reads them (torch's
    cross-entropies: axis 1 of ``(N, C, T)``); the last axis otherwise, as in Keras."""
    return -1 if loss is None else loss.class_axis


def threshold_for(loss: losses.CompiledLoss | None) -> float | None:
    """The threshold of binary accuracy for the outputs ``loss`` describes: 0 for logits,
    0.5 for probabilities or plain values (Keras's default), None when the loss cannot tell."""
    kind = None if loss is None else loss.output_kind
    if kind == losses.LOGITS:
        return 0.0
    if kind in (losses.PROBABILITIES, losses.VALUES):
        return 0.5
    return None


def _auto_accuracy(loss: losses.CompiledLoss | None) -> Callable[[Tensor, Tensor], Tensor]:
    """``"accuracy"``, resolved as Keras does from the loss, then from the shapes.

    The rule: a categorical loss gives categorical accuracy, a sparse one sparse accuracy
    (both an argmax: logits or probabilities alike). Outputs with one value per sample are
    binary: the threshold is 0 when the loss takes logits (our ``"binary_crossentropy"``,
    ``nn.BCEWithLogitsLoss``, ``from_logits=True``), 0.5 when it takes probabilities or is a
    regression loss; a loss that cannot say (a custom callable without ``from_logits``) is
    an error that names the fix.
    """
    target = None if loss is None else loss.target
    threshold = threshold_for(loss)
    binary = None if threshold is None else _binary_accuracy(threshold)

    axis = _class_axis(loss)

    def accuracy(y_pred: Tensor, y_true: Tensor) -> Tensor | _Kept:
        if target == "categorical":
            return categorical_accuracy(y_pred, y_true)
        multi = y_pred.dim() >= 2 and y_pred.shape[axis] > 1
        if multi and target != "binary":
            if y_true.shape == y_pred.shape and y_true.is_floating_point():
                return categorical_accuracy(y_pred, y_true, axis)
            return sparse_categorical_accuracy(y_pred, y_true, axis)
        if binary is None:
            name = "no loss" if loss is None else f"the loss {loss.name!r}"
            raise ValueError(
                "The metric 'accuracy' cannot tell whether the model's outputs are logits or "
                f"probabilities: {name} does not say. Pass metrics=[torcheras.metrics."
                "BinaryAccuracy(threshold=0.0)] for logits (0.5 for probabilities), or give "
                "the loss function a `from_logits` attribute."
            )
        return binary(y_pred, y_true)

    accuracy.counts_argmax_hits = target not in ("categorical", "binary")  # type: ignore[attr-defined]
    return accuracy


def _auto_binary_accuracy(loss: losses.CompiledLoss | None) -> Callable[[Tensor, Tensor], Tensor]:
    """Keras's ``binary_accuracy`` (threshold 0.5), at 0 when the loss takes logits."""
    threshold = threshold_for(loss)
    return _binary_accuracy(0.5 if threshold is None else threshold)


def _absolute_errors(y_pred: Tensor, y_true: Tensor) -> Tensor:
    return (y_pred - losses._match_shape(y_pred, y_true)).abs()


def _squared_errors(y_pred: Tensor, y_true: Tensor) -> Tensor:
    return (y_pred - losses._match_shape(y_pred, y_true)).square()


_absolute_errors.sums_elements = True  # type: ignore[attr-defined]
_squared_errors.sums_elements = True  # type: ignore[attr-defined]


# Keras's MAE / MSE take the mean over the last axis, then over the samples: the same number
# as the mean over every element, which a metric gets with one op less per batch. Weighted,
# a sample's weight spreads over its last axis (losses.weights_like): Keras's number too.
_ELEMENTWISE: dict[Callable[..., Tensor], Callable[[Tensor, Tensor], Tensor]] = {
    losses.mean_absolute_error: _absolute_errors,
    losses.mean_squared_error: _squared_errors,
}


def _loss_metric(name: str, loss: losses.CompiledLoss | None) -> Callable[[Tensor, Tensor], Tensor]:
    """A loss used as a metric; the compiled loss of the same name when there is one, so that
    ``BinaryCrossentropy(from_logits=False)`` and its metric agree on the outputs."""
    fn = losses.LOSSES[name]
    if loss is not None and loss.module is None and loss.name == fn.__name__:
        fn = loss.fn
    return _ELEMENTWISE.get(fn, fn)


# ---- Keras's metric classes: means of a per-sample function ----------------------------------


def _pearson(axis: int) -> Callable[[Tensor, Tensor], Tensor]:
    def pearson_correlation(y_pred: Tensor, y_true: Tensor) -> Tensor:
        y_true = losses._match_shape(y_pred, y_true)
        t = y_true - y_true.mean(dim=axis, keepdim=True)
        p = y_pred - y_pred.mean(dim=axis, keepdim=True)
        t = t / t.std(dim=axis, keepdim=True, correction=0)
        p = p / p.std(dim=axis, keepdim=True, correction=0)
        return (t * p).mean(dim=axis)

    return pearson_correlation


def _concordance(axis: int) -> Callable[[Tensor, Tensor], Tensor]:
    def concordance_correlation(y_pred: Tensor, y_true: Tensor) -> Tensor:
        y_true = losses._match_shape(y_pred, y_true)
        t_mean = y_true.mean(dim=axis, keepdim=True)
        p_mean = y_pred.mean(dim=axis, keepdim=True)
        t_var = y_true.var(dim=axis, keepdim=True, correction=0)
        p_var = y_pred.var(dim=axis, keepdim=True, correction=0)
        covariance = (y_true - p_mean) * (y_pred - p_mean)  # Keras's; its mean is the covariance
        norm = t_var + p_var + (t_mean - p_mean).square()
        return (2 * covariance / (norm + losses.EPSILON)).mean(dim=axis)

    return concordance_correlation


def _cosine(axis: int) -> Callable[[Tensor, Tensor], Tensor]:
    def cosine_similarity(y_pred: Tensor, y_true: Tensor) -> Tensor:
        y_true = losses._match_shape(y_pred, y_true)
        return (F.normalize(y_true, dim=axis) * F.normalize(y_pred, dim=axis)).sum(dim=axis)

    return cosine_similarity


def _classes_last(fn: Callable[[Tensor, Tensor], Tensor], axis: int, both: bool = False) -> Any:
    """``fn`` on outputs whose classes lie on ``axis`` (and the targets', with ``both``)."""
    if axis == -1:
        return fn
    return lambda p, t: fn(p.movedim(axis, -1), t.movedim(axis, -1) if both else t)


class Accuracy(MeanMetric):
    """Keras's ``Accuracy``: how often ``y_pred`` equals ``y_true`` exactly (class ids against
    class ids). The name ``"accuracy"`` is the argmax or threshold accuracy the loss implies.

    Example:
        ```python
        m = Accuracy()
        m.update_state([1, 2, 3], [1, 2, 4])  # Keras's order: y_true, y_pred
        ```
    """

    def __init__(self, name: str = "accuracy") -> None:
        super().__init__(lambda p, t: p == losses._match_shape(p, t), name, "max")


class CategoricalAccuracy(MeanMetric):
    """Keras's ``CategoricalAccuracy``: how often the argmax of ``y_pred`` is the one-hot
    target's.

    Example:
        ```python
        model.compile(loss="categorical_crossentropy", metrics=[CategoricalAccuracy()])
        ```
    """

    def __init__(self, name: str = "categorical_accuracy") -> None:
        super().__init__(categorical_accuracy, name, "max")


class SparseCategoricalAccuracy(MeanMetric):
    """Keras's ``SparseCategoricalAccuracy``: how often the argmax of ``y_pred`` is the
    class id (labels of -100, padding, count for nothing).

    Example:
        ```python
        model.compile(loss="cross_entropy", metrics=[SparseCategoricalAccuracy(name="acc")])
        ```
    """

    def __init__(self, name: str = "sparse_categorical_accuracy") -> None:
        super().__init__(sparse_categorical_accuracy, name, "max")


class TopKCategoricalAccuracy(MeanMetric):
    """Keras's ``TopKCategoricalAccuracy``: how often the one-hot target is among the ``k``
    highest scores.

    Example:
        ```python
        model.compile(loss="categorical_crossentropy", metrics=[TopKCategoricalAccuracy(k=3)])
        ```
    """

    def __init__(self, k: int = 5, name: str = "top_k_categorical_accuracy") -> None:
        super().__init__(_top_k(k, sparse=False), name, "max")
        self.k = k


class SparseTopKCategoricalAccuracy(MeanMetric):
    """Keras's ``SparseTopKCategoricalAccuracy``: how often the class id is among the ``k``
    highest scores; ``from_sorted_ids=True``: ``y_pred`` holds class ids, best first.

    Example:
        ```python
        model.compile(loss="cross_entropy", metrics=[SparseTopKCategoricalAccuracy(k=3)])
        ```
    """

    def __init__(
        self,
        k: int = 5,
        name: str = "sparse_top_k_categorical_accuracy",
        from_sorted_ids: bool = False,
    ) -> None:
        fn = _top_k(k, sparse=True)
        if from_sorted_ids:

            def fn(y_pred: Tensor, y_true: Tensor) -> _Kept:
                labels = losses.class_labels(y_pred, y_true)
                hits = (y_pred[..., :k] == labels.unsqueeze(-1).to(y_pred.dtype)).any(dim=-1)
                return _Kept((hits, labels))

        super().__init__(fn, name, "max")
        self.k, self.from_sorted_ids = k, from_sorted_ids


class MeanSquaredError(MeanMetric):
    """Keras's ``MeanSquaredError``.

    Example:
        ```python
        model.compile(loss="mae", metrics=[MeanSquaredError()])
        ```
    """

    def __init__(self, name: str = "mean_squared_error") -> None:
        super().__init__(_squared_errors, name, "min")


class RootMeanSquaredError(MeanMetric):
    """Keras's ``RootMeanSquaredError``: the square root of the mean squared error.

    Example:
        ```python
        model.compile(loss="mse", metrics=[RootMeanSquaredError(name="rmse")])
        ```
    """

    def __init__(self, name: str = "root_mean_squared_error") -> None:
        super().__init__(_squared_errors, name, "min", transform=torch.sqrt)


class MeanAbsoluteError(MeanMetric):
    """Keras's ``MeanAbsoluteError``.

    Example:
        ```python
        model.compile(loss="mse", metrics=[MeanAbsoluteError()])
        ```
    """

    def __init__(self, name: str = "mean_absolute_error") -> None:
        super().__init__(_absolute_errors, name, "min")


class MeanAbsolutePercentageError(MeanMetric):
    """Keras's ``MeanAbsolutePercentageError``: ``100 * |y_true - y_pred| / |y_true|``.

    Example:
        ```python
        model.compile(loss="mse", metrics=[MeanAbsolutePercentageError()])
        ```
    """

    def __init__(self, name: str = "mean_absolute_percentage_error") -> None:
        super().__init__(losses.mean_absolute_percentage_error, name, "min")


class MeanSquaredLogarithmicError(MeanMetric):
    """Keras's ``MeanSquaredLogarithmicError``: of ``log(1 + y)``.

    Example:
        ```python
        model.compile(loss="mse", metrics=[MeanSquaredLogarithmicError()])
        ```
    """

    def __init__(self, name: str = "mean_squared_logarithmic_error") -> None:
        super().__init__(losses.mean_squared_logarithmic_error, name, "min")


class LogCoshError(MeanMetric):
    """Keras's ``LogCoshError`` (named ``"logcosh"``, as in Keras).

    Example:
        ```python
        model.compile(loss="mse", metrics=[LogCoshError()])
        ```
    """

    def __init__(self, name: str = "logcosh") -> None:
        super().__init__(losses.log_cosh, name, "min")


class CosineSimilarity(MeanMetric):
    """Keras's ``CosineSimilarity``: the cosine of ``y_pred`` and ``y_true`` along ``axis``
    (1 is the same direction).

    Example:
        ```python
        model.compile(loss="mse", metrics=[CosineSimilarity(axis=-1)])
        ```
    """

    def __init__(self, name: str = "cosine_similarity", axis: int = -1) -> None:
        super().__init__(_cosine(axis), name, "max")
        self.axis = axis


class PearsonCorrelation(MeanMetric):
    """Keras's ``PearsonCorrelation``: the correlation of ``y_pred`` and ``y_true`` along
    ``axis`` (the features of each sample), averaged over the samples. As in Keras, one value
    per sample ``(N, 1)`` has no correlation (NaN): for the correlation over the samples use
    :class:`R2Score` or ``torchmetrics.PearsonCorrCoef``.

    Example:
        ```python
        model.compile(loss="mse", metrics=[PearsonCorrelation()])  # outputs (N, D)
        ```
    """

    def __init__(self, name: str = "pearson_correlation", axis: int = -1) -> None:
        super().__init__(_pearson(axis), name, "max")
        self.axis = axis


class ConcordanceCorrelation(MeanMetric):
    """Keras's ``ConcordanceCorrelation``: Lin's concordance of ``y_pred`` and ``y_true``
    along ``axis``, averaged over the samples (see :class:`PearsonCorrelation`).

    Example:
        ```python
        model.compile(loss="mse", metrics=[ConcordanceCorrelation()])
        ```
    """

    def __init__(self, name: str = "concordance_correlation", axis: int = -1) -> None:
        super().__init__(_concordance(axis), name, "max")
        self.axis = axis


class Hinge(MeanMetric):
    """Keras's ``Hinge``: ``max(1 - y_true * y_pred, 0)``, labels 0/1 read as -1/1.

    Example:
        ```python
        model.compile(loss="hinge", metrics=[Hinge()])
        ```
    """

    def __init__(self, name: str = "hinge") -> None:
        super().__init__(losses.hinge, name, "min")


class SquaredHinge(MeanMetric):
    """Keras's ``SquaredHinge``: the square of :class:`Hinge`'s term.

    Example:
        ```python
        model.compile(loss="squared_hinge", metrics=[SquaredHinge()])
        ```
    """

    def __init__(self, name: str = "squared_hinge") -> None:
        super().__init__(losses.squared_hinge, name, "min")


class CategoricalHinge(MeanMetric):
    """Keras's ``CategoricalHinge``: ``max(1 + max_wrong - true_score, 0)``, one-hot targets.

    Example:
        ```python
        model.compile(loss="categorical_hinge", metrics=[CategoricalHinge()])
        ```
    """

    def __init__(self, name: str = "categorical_hinge") -> None:
        super().__init__(losses.categorical_hinge, name, "min")


class KLDivergence(MeanMetric):
    """Keras's ``KLDivergence`` of two probability distributions.

    Example:
        ```python
        model.compile(loss="kl_divergence", metrics=[KLDivergence()])
        ```
    """

    def __init__(self, name: str = "kl_divergence") -> None:
        super().__init__(losses.kl_divergence, name, "min")


class Poisson(MeanMetric):
    """Keras's ``Poisson``: ``y_pred - y_true * log(y_pred)``.

    Example:
        ```python
        model.compile(loss="poisson", metrics=[Poisson()])
        ```
    """

    def __init__(self, name: str = "poisson") -> None:
        super().__init__(losses.poisson, name, "min")


class BinaryCrossentropy(MeanMetric):
    """Keras's ``BinaryCrossentropy`` metric: probabilities by default (``from_logits``), as
    the class in Keras (the name ``"binary_crossentropy"`` follows the compiled loss).

    Example:
        ```python
        model.compile(loss="binary_crossentropy", metrics=[BinaryCrossentropy(from_logits=True)])
        ```
    """

    def __init__(
        self,
        name: str = "binary_crossentropy",
        from_logits: bool = False,
        label_smoothing: float = 0.0,
    ) -> None:
        loss = losses.BinaryCrossentropy(from_logits, label_smoothing)
        super().__init__(loss.values, name, "min")
        self.from_logits, self.label_smoothing = from_logits, label_smoothing


class CategoricalCrossentropy(MeanMetric):
    """Keras's ``CategoricalCrossentropy`` metric (one-hot targets, classes on ``axis``).

    Example:
        ```python
        model.compile(loss="mse", metrics=[CategoricalCrossentropy(from_logits=True)])
        ```
    """

    def __init__(
        self,
        name: str = "categorical_crossentropy",
        from_logits: bool = False,
        label_smoothing: float = 0.0,
        axis: int = -1,
    ) -> None:
        fn = losses.CategoricalCrossentropy(from_logits, label_smoothing).values
        super().__init__(_classes_last(fn, axis, both=True), name, "min")
        self.from_logits, self.label_smoothing, self.axis = from_logits, label_smoothing, axis


class SparseCategoricalCrossentropy(MeanMetric):
    """Keras's ``SparseCategoricalCrossentropy`` metric (class ids; the classes of ``y_pred``
    on ``axis``). Labels equal to ``ignore_class`` count for nothing: the mean is over the
    labels kept, Keras's weighted number (its unweighted mean counts them as 0).

    Example:
        ```python
        metric = SparseCategoricalCrossentropy(from_logits=True, ignore_class=0)
        model.compile(loss="cross_entropy", metrics=[metric])
        ```
    """

    def __init__(
        self,
        name: str = "sparse_categorical_crossentropy",
        from_logits: bool = False,
        ignore_class: int | None = None,
        axis: int = -1,
    ) -> None:
        loss = losses.SparseCategoricalCrossentropy(from_logits).values

        def fn(y_pred: Tensor, y_true: Tensor) -> Tensor | _Kept:
            if ignore_class is None:
                return loss(y_pred, y_true)
            labels = losses.class_labels(y_pred, y_true)
            kept = labels != ignore_class
            values = loss(y_pred, torch.where(kept, labels, 0)) * kept
            return _Kept((values, torch.where(kept, labels, losses.IGNORE_INDEX)))

        super().__init__(_classes_last(fn, axis), name, "min")
        self.from_logits, self.ignore_class, self.axis = from_logits, ignore_class, axis

    # Its ignored labels become -100 here, whatever the data hold: always counted as padding.
    padded_labels = property(lambda self: True, lambda self, value: None)


class Sum(Mean):
    """Keras's ``Sum``: the (weighted) sum of the values given to ``update_state``.

    >>> total = Sum()
    >>> total.update_state(torch.tensor([1.0, 3.0]))
    >>> float(total.result())
    4.0
    """

    def __init__(self, name: str = "sum", direction: str | None = None) -> None:
        super().__init__(name=name, direction=direction)

    def result(self) -> Tensor | float:
        self._total_unshared = False  # the caller holds it now
        return 0.0 if self._total is None else self._total

    def snapshot(self) -> Callable[[], Tensor | float]:
        total, self._total_unshared = self._total, False
        if total is None:
            return _NOTHING_YET
        return functools.partial(_identity, total)


def _identity(value: Any) -> Any:
    return value


class MeanMetricWrapper(MeanMetric):
    """Keras's ``MeanMetricWrapper``: the mean of ``fn(y_true, y_pred, **kwargs)``, in
    Keras's argument order (``y_true`` first; a callable given to ``compile`` takes
    torch's order, ``(y_pred, y_true)``).

    Example:
        ```python
        def within_one(y_true, y_pred):
            return (y_true - y_pred).abs() < 1
        model.compile(loss="mse", metrics=[MeanMetricWrapper(within_one, direction="max")])
        ```
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        name: str | None = None,
        *,
        direction: str | None = None,
        **kwargs: Any,
    ) -> None:
        name = name or getattr(fn, "__name__", "mean_metric_wrapper")
        super().__init__(lambda p, t: fn(t, p, **kwargs), name, direction or direction_of(name))


class R2Score(StateMetric):
    """Keras's ``R2Score``: the coefficient of determination of ``(N, D)`` outputs (``(N,)``
    is one column), from sums kept per column: ``sklearn.metrics.r2_score``'s number, with
    ``class_aggregation`` ``"uniform_average"`` (the mean of the columns' scores),
    ``"variance_weighted_average"`` or None (one per column); ``num_regressors > 0`` gives
    the adjusted score.

    Example:
        ```python
        model.compile(loss="mse", metrics=[R2Score()])
        ```
    """

    def __init__(
        self,
        class_aggregation: str | None = "uniform_average",
        num_regressors: int = 0,
        name: str = "r2_score",
    ) -> None:
        if class_aggregation not in (None, "uniform_average", "variance_weighted_average"):
            raise ValueError(
                "`class_aggregation` must be None, 'uniform_average' or "
                f"'variance_weighted_average'; got class_aggregation={class_aggregation!r}."
            )
        if num_regressors < 0:
            raise ValueError(f"`num_regressors` must be >= 0; got num_regressors={num_regressors}.")
        super().__init__(name, "max")
        self.class_aggregation, self.num_regressors = class_aggregation, num_regressors

    def _sums(self, y_pred: Tensor, y_true: Tensor, weights: Tensor | None) -> dict[str, Tensor]:
        y_true = losses._match_shape(y_pred, torch.as_tensor(y_true, device=y_pred.device))
        if y_pred.dim() == 1:
            y_pred, y_true = y_pred.unsqueeze(-1), y_true.unsqueeze(-1)
        if y_pred.dim() != 2 or y_true.shape != y_pred.shape:
            raise ValueError(
                f"R2Score takes outputs (N, D) and targets of that shape; got y_pred of shape "
                f"{tuple(y_pred.shape)} and y_true of shape {tuple(y_true.shape)}."
            )
        dtype = count_dtype(y_pred.device)
        y_pred, y_true = y_pred.to(dtype), y_true.to(dtype)
        w = torch.ones_like(y_true) if weights is None else losses.weights_like(y_true, weights)
        w = torch.broadcast_to(w, y_true.shape)
        return {
            "sum": (w * y_true).sum(dim=0),
            "squared_sum": (w * y_true.square()).sum(dim=0),
            "residual": (w * (y_true - y_pred).square()).sum(dim=0),
            "count": w.sum(dim=0),
            # a fill, not a copy from the host (which would wait for the device)
            "num_samples": torch.full((), float(y_true.numel()), dtype=dtype, device=y_true.device),
        }

    def _compute(self, state: dict[str, Tensor]) -> Tensor:
        mean = state["sum"] / state["count"]
        total = state["squared_sum"] - state["sum"] * mean
        scores = 1 - state["residual"] / total
        scores = torch.where(scores.isinf(), 0.0, scores)
        if self.class_aggregation == "uniform_average":
            score = scores.mean()
        elif self.class_aggregation == "variance_weighted_average":
            score = (total * scores).sum() / total.sum()
        else:
            score = scores
        if self.num_regressors:  # adjusted R2 (a read of the sample count: once per result)
            n, p = float(state["num_samples"]), self.num_regressors
            if p >= n - 1:
                warnings.warn(
                    f"R2Score: num_regressors={p} needs more than {p + 1} values for the "
                    "adjusted score; falling back to the standard R2 score.",
                    stacklevel=2,
                )
            else:
                score = 1 - (1 - score) * (n - 1) / (n - p - 1)
        return score


# name -> (factory(compiled loss) -> fn, canonical name, direction, transform)
_MAX = "max"
_MIN = "min"
_BUILTINS: dict[str, tuple[Callable[[str | None], Callable], str, str, Any]] = {
    "accuracy": (_auto_accuracy, "accuracy", _MAX, None),
    "acc": (_auto_accuracy, "acc", _MAX, None),
    "sparse_categorical_accuracy": (
        lambda loss: _sparse_accuracy(_class_axis(loss)),
        "sparse_categorical_accuracy",
        _MAX,
        None,
    ),
    "categorical_accuracy": (
        lambda loss: functools.partial(categorical_accuracy, axis=_class_axis(loss)),
        "categorical_accuracy",
        _MAX,
        None,
    ),
    "binary_accuracy": (_auto_binary_accuracy, "binary_accuracy", _MAX, None),
    "top_k_categorical_accuracy": (
        lambda loss: _top_k(5, sparse=False, axis=_class_axis(loss)),
        "top_k_categorical_accuracy",
        _MAX,
        None,
    ),
    "sparse_top_k_categorical_accuracy": (
        lambda loss: _top_k(5, sparse=True, axis=_class_axis(loss)),
        "sparse_top_k_categorical_accuracy",
        _MAX,
        None,
    ),
    "root_mean_squared_error": (
        lambda _: _squared_errors,
        "root_mean_squared_error",
        _MIN,
        torch.sqrt,
    ),
    "rmse": (lambda _: _squared_errors, "rmse", _MIN, torch.sqrt),
}
for _name in [
    "mean_squared_error",
    "mse",
    "mean_absolute_error",
    "mae",
    "mean_absolute_percentage_error",
    "mape",
    "mean_squared_logarithmic_error",
    "msle",
    "log_cosh",
    "logcosh",
    "binary_crossentropy",
    "categorical_crossentropy",
    "sparse_categorical_crossentropy",
    "kl_divergence",
    "kld",
    "poisson",
    "hinge",
    "squared_hinge",
    "huber",
    "categorical_hinge",
]:
    _BUILTINS[_name] = (lambda loss, n=_name: _loss_metric(n, loss), _name, _MIN, None)
_BUILTINS["cosine_similarity"] = (lambda _: _cosine(-1), "cosine_similarity", _MAX, None)
_BUILTINS["bce"] = (lambda loss: _loss_metric("binary_crossentropy", loss), "bce", _MIN, None)
_BUILTINS["log_cosh_error"] = (lambda _: losses.log_cosh, "log_cosh_error", _MIN, None)
_BUILTINS["pearson_correlation"] = (lambda _: _pearson(-1), "pearson_correlation", _MAX, None)
_BUILTINS["concordance_correlation"] = (
    lambda _: _concordance(-1),
    "concordance_correlation",
    _MAX,
    None,
)


def _reading(cls: type[Metric], loss: losses.CompiledLoss | None) -> Metric:
    """``cls()`` reading the probabilities the compiled loss implies, as ``"accuracy"`` does:
    the sigmoid of binary logits, the softmax of multi-class ones over the loss's class axis.
    Keras's classes take probabilities unless told (``from_logits``)."""
    logits = loss is not None and loss.output_kind == losses.LOGITS
    metric = cls(from_logits=logits)  # type: ignore[call-arg]
    if logits and loss is not None and loss.target != "binary" and hasattr(metric, "_softmax_axis"):
        metric._softmax_axis = loss.class_axis
    return metric


# Keras's metric classes that take no required argument, by Keras's names (and the name of
# FBetaScore's log key).
for _name, _build, _direction in [
    ("precision", lambda loss: _reading(Precision, loss), _MAX),
    ("recall", lambda loss: _reading(Recall, loss), _MAX),
    ("auc", lambda loss: _reading(AUC, loss), _MAX),
    ("true_positives", lambda loss: _reading(TruePositives, loss), _MAX),
    ("true_negatives", lambda loss: _reading(TrueNegatives, loss), _MAX),
    ("false_positives", lambda loss: _reading(FalsePositives, loss), _MIN),
    ("false_negatives", lambda loss: _reading(FalseNegatives, loss), _MIN),
    ("f1_score", lambda loss: _reading(F1Score, loss), _MAX),
    ("f_beta_score", lambda loss: _reading(FBetaScore, loss), _MAX),
    ("fbeta_score", lambda loss: _reading(FBetaScore, loss), _MAX),
    ("binary_io_u", lambda loss: _reading(BinaryIoU, loss), _MAX),
    ("r2_score", lambda _: R2Score(), _MAX),
]:
    _BUILTINS[_name] = (_build, _name, _direction, None)


def _needs(cls: str, arguments: str) -> Callable[[Any], Any]:
    def build(_: Any) -> Any:
        call = ", ".join(f"{a}=..." for a in arguments.split(", "))
        raise ValueError(
            f"The metric {cls} needs {arguments}, which a name cannot give: pass "
            f"metrics=[torcheras.metrics.{cls}({call})]."
        )

    return build


# Keras's names of classes with a required argument: an error that says what to pass.
for _name, _cls, _arguments in [
    ("io_u", "IoU", "num_classes, target_class_ids"),
    ("mean_io_u", "MeanIoU", "num_classes"),
    ("one_hot_io_u", "OneHotIoU", "num_classes, target_class_ids"),
    ("one_hot_mean_io_u", "OneHotMeanIoU", "num_classes"),
    ("precision_at_recall", "PrecisionAtRecall", "recall"),
    ("recall_at_precision", "RecallAtPrecision", "precision"),
    ("sensitivity_at_specificity", "SensitivityAtSpecificity", "specificity"),
    ("specificity_at_sensitivity", "SpecificityAtSensitivity", "sensitivity"),
]:
    _BUILTINS[_name] = (_needs(_cls, _arguments), _name, _MAX, None)

# Directions of names Keras users monitor, for metrics we do not build ourselves.
_MAX_NAMES = {
    "auc",
    "precision",
    "recall",
    "f1_score",
    "fbeta_score",
    "iou",
    "io_u",
    "mean_io_u",
    "r2_score",
    "cosine_similarity",
    "pearson_correlation",
    "concordance_correlation",
    "precision_at_recall",
    "recall_at_precision",
    "sensitivity_at_specificity",
    "specificity_at_sensitivity",
    "binary_io_u",
    "one_hot_io_u",
}


class OutputMetric(Metric):
    """A metric of one output of a model with several outputs: it reads that output and its
    targets, and is logged as ``<output>_<metric>`` (Keras's names)."""

    def __init__(self, metric: Metric, key: Any) -> None:
        self.inner = metric
        self.key = key
        self.name = f"{losses.output_name(key)}_{metric.name}"
        self.direction = metric.direction

    def update(self, y_pred: Any, y_true: Any, sample_weight: Tensor | None = None) -> None:
        key = self.key
        self.inner.update(
            losses.output_of(y_pred, key, "outputs"),
            losses.output_of(y_true, key, "targets"),
            losses.weights_of(sample_weight, key),
        )

    def result(self) -> Tensor | float:
        return self.inner.result()

    def reset(self) -> None:
        self.inner.reset()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:  # snapshot / all_reduce, where the metric has them
        if name in ("snapshot", "all_reduce"):
            return getattr(self.inner, name)
        raise AttributeError(name)


def per_output(
    metrics: Any, loss: losses.MultiOutputLoss, argument: str = "metrics"
) -> list[Metric]:
    """``metrics={"label": ["accuracy"], "box": ["mae"]}`` (or a list of lists in the order of
    the outputs) for a model with several outputs: each metric reads its output, resolved with
    that output's loss (``"accuracy"`` follows it), and is named ``<output>_<metric>``."""
    if isinstance(metrics, Mapping):
        keyed = dict(metrics)
    elif isinstance(metrics, (list, tuple)) and all(
        m is None or isinstance(m, (list, tuple)) for m in metrics
    ):
        keyed = dict(enumerate(metrics))
    else:
        raise ValueError(
            f"The model has several outputs ({', '.join(map(losses.output_name, loss.parts))}):"
            f" give `{argument}` per output, {argument}={{'<output>': ['accuracy'], ...}} (or a "
            "list of lists in the order of the outputs), as Keras does."
        )
    out: list[Metric] = []
    for key, names in keyed.items():
        for metric in [names] if isinstance(names, str) else names or []:
            out.append(OutputMetric(get(metric, loss.parts.get(key)), key))
    return out


def direction_of(name: str) -> str | None:
    """The direction Keras uses for a metric name (``"max"``/``"min"``), or None if unknown."""
    base = name[4:] if name.startswith("val_") else name
    if base == "loss" or base.endswith("_loss"):
        return _MIN
    if base in _BUILTINS:
        return _BUILTINS[base][2]
    if base in _MAX_NAMES or base.endswith("accuracy"):
        return _MAX
    return None


def get(metric: Any, loss: losses.CompiledLoss | None = None) -> Metric:
    """Resolve a metric name, ``torchmetrics.Metric``, :class:`Metric` or callable.

    ``loss`` is the compiled loss: ``"accuracy"`` reads from it whether outputs are logits.

    >>> get("accuracy").direction
    'max'
    """
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        if metric not in _BUILTINS and metric[:1].isupper():  # Keras's class names too
            snake = losses._snake(metric)
            metric = snake if snake in _BUILTINS else metric
        alternatives = "a torchmetrics.Metric or a callable metric(y_pred, y_true)"
        factory, _, direction, transform = lookup(_BUILTINS, metric, "metric", alternatives)
        built = factory(loss)
        if isinstance(built, Metric):  # a Keras class (precision, auc...), logged as named
            built.name = metric
            return built
        return MeanMetric(built, name=metric, direction=direction, transform=transform)
    if _is_torchmetric(metric):
        return TorchMetric(metric)
    if callable(metric):
        name = getattr(metric, "__name__", type(metric).__name__)
        direction = getattr(metric, "direction", None) or direction_of(name)
        return MeanMetric(metric, name=name, direction=direction)
    raise TypeError(
        "Each metric must be a name, a torchmetrics.Metric, a torcheras.metrics.Metric or a "
        f"callable metric(y_pred, y_true); got {type(metric).__name__}."
    )


def _is_torchmetric(obj: Any) -> bool:
    # torchmetrics not imported (or still importing): nothing can be one of its metrics
    metric_class = getattr(sys.modules.get("torchmetrics"), "Metric", None)
    return metric_class is not None and isinstance(obj, metric_class)


def tracked(model: Any) -> dict[str, Metric]:
    """Metric objects assigned to ``model`` as attributes (Keras's tracked metrics), also
    inside lists, tuples and dicts (``self.trackers = [Mean(name="a"), Mean(name="b")]``), by
    name: torcheras metrics by their ``name`` (a repeated name gets ``_1``, ``_2``...),
    torchmetrics objects by the attribute's name."""
    found: dict[str, Metric] = {}
    seen: set[int] = set()

    def add(attr: str, value: Any) -> None:
        if id(value) in seen:
            return
        if isinstance(value, Metric):
            seen.add(id(value))
            name, n = value.name, 0
            while name in found:
                n += 1
                name = f"{value.name}_{n}"
            found[name] = value
        elif _is_torchmetric(value):
            seen.add(id(value))
            found.setdefault(attr, TorchMetric(value, name=attr))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                add(f"{attr}_{i}", item)
        elif isinstance(value, dict):
            for key, item in value.items():
                add(str(key), item)

    for attr, value in list(vars(model).items()) + list(getattr(model, "_modules", {}).items()):
        if not attr.startswith("__") and attr not in _MODULE_INTERNALS:
            add(attr, value)
    return found


# What nn.Module keeps for itself (parameters, buffers, hooks): never a user's metric.
_MODULE_INTERNALS = frozenset(vars(torch.nn.Module())) - {"_modules"}


# The confusion-matrix metrics live in their own module, which builds on StateMetric above.
from torcheras.confusion import (  # noqa: E402
    AUC,
    BinaryIoU,
    F1Score,
    FalseNegatives,
    FalsePositives,
    FBetaScore,
    IoU,
    MeanIoU,
    OneHotIoU,
    OneHotMeanIoU,
    Precision,
    PrecisionAtRecall,
    Recall,
    RecallAtPrecision,
    SensitivityAtSpecificity,
    SpecificityAtSensitivity,
    TrueNegatives,
    TruePositives,
)
