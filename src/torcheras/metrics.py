"""Metric names to stateful metric objects, each with a known direction.

A metric accumulates on the device (no host read per batch) and is read once when the logs
are. ``direction`` is ``"max"`` for accuracy-like metrics and ``"min"`` for error-like ones;
``mode="auto"`` in the monitoring callbacks uses it.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from torcheras import losses
from torcheras.registry import lookup
from torcheras.tensors import to_cpu

__all__ = [
    "BinaryAccuracy",
    "Mean",
    "MeanMetric",
    "Metric",
    "OutputMetric",
    "direction_of",
    "get",
    "per_output",
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


# The tensor each metric's ``result`` last returned, by id (checked by identity when read):
# a step that returns it under any key (``{"loss": self.total_loss_tracker.result()}``) logs
# the metric's result, as Keras does, not a running mean of running results. The tensor itself
# is left unmarked, so it pickles and copies as any other.
_LAST_RESULTS: weakref.WeakValueDictionary[int, Metric] = weakref.WeakValueDictionary()


def result_of(value: Any) -> Metric | None:
    """The metric whose ``result()`` returned ``value`` last, if any."""
    metric = _LAST_RESULTS.get(id(value))
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
        # Whether labels may hold -100 (padding): the loops clear it for a pass over arrays
        # that hold none, so that an accuracy counts its labels without a mask per batch.
        self.padded_labels = True
        self._total: Tensor | None = None
        self._count: Tensor | float = 0.0

    def update(self, y_pred: Any, y_true: Any, sample_weight: Tensor | None = None) -> None:
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
        self._total = total if self._total is None else self._total + total
        self._count = self._count + count

    def result(self) -> Tensor | float:
        if self._total is None:
            return 0.0
        mean = self._total / self._count
        return self.transform(mean) if self.transform is not None else mean

    def snapshot(self) -> Callable[[], Tensor | float]:
        """The result as of now, computed only when called (the state is never changed in
        place, so nothing is copied)."""
        total, count, transform = self._total, self._count, self.transform
        if total is None:
            return lambda: 0.0

        def compute() -> Tensor:
            mean = total / count
            return transform(mean) if transform is not None else mean

        return compute

    def all_reduce(self, reduce_sum: Callable[[list[Any]], list[Any]]) -> None:
        """Sum the state over every rank (distributed training): the global mean."""
        total = self._total if self._total is not None else 0.0
        self._total, self._count = reduce_sum([total, self._count])

    def reset(self) -> None:
        self._total = None
        self._count = 0.0

    def state_dict(self) -> dict[str, Any]:
        return to_cpu({"total": self._total, "count": self._count}, clone=True)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._total, self._count = state["total"], state["count"]

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
        self.name = name or losses._snake(type(metric).__name__)
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

        def compute() -> Any:
            current = {k: getattr(metric, k) for k in state}
            cached, to_sync = metric._computed, metric._to_sync
            try:
                for k, v in state.items():
                    setattr(metric, k, v)
                metric._computed = None
                # A batch value is this rank's (read by one rank, such as the progress bar's):
                # torchmetrics' sync is a collective that only the epoch's result may make.
                metric._to_sync = False
                return metric.compute()
            finally:
                for k, v in current.items():
                    setattr(metric, k, v)
                metric._computed, metric._to_sync = cached, to_sync

        return compute

    def reset(self) -> None:
        self.metric.reset()

    def state_dict(self) -> dict[str, Any]:
        # torchmetrics keeps its accumulators as (non-persistent) states; save them explicitly.
        return to_cpu({k: getattr(self.metric, k) for k in self.metric._defaults}, clone=True)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self.metric, k, v)
        self.metric._update_count = 1


# ---- accuracy-like functions (per sample, 1.0 = correct) --------------------------------------


class _Kept(NamedTuple):
    """The hits of an accuracy (booleans) and the labels they were scored against: positions
    labelled -100 (torch's ``ignore_index``, padding) count for nothing, as the loss names
    leave them out."""

    hits: Tensor
    labels: Tensor


def sparse_categorical_accuracy(y_pred: Tensor, y_true: Tensor, axis: int = -1) -> _Kept:
    """True where the argmax over the class ``axis`` is the label."""
    if axis == -1 and y_true.dim() == y_pred.dim() and y_true.shape[-1] == 1:
        y_true = y_true.squeeze(-1)
    return _Kept(y_pred.argmax(dim=axis) == y_true, y_true)


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
        return _Kept(hits, target) if sparse else hits

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

    return accuracy


def _auto_binary_accuracy(loss: losses.CompiledLoss | None) -> Callable[[Tensor, Tensor], Tensor]:
    """Keras's ``binary_accuracy`` (threshold 0.5), at 0 when the loss takes logits."""
    threshold = threshold_for(loss)
    return _binary_accuracy(0.5 if threshold is None else threshold)


def _absolute_errors(y_pred: Tensor, y_true: Tensor) -> Tensor:
    return (y_pred - losses._match_shape(y_pred, y_true)).abs()


def _squared_errors(y_pred: Tensor, y_true: Tensor) -> Tensor:
    return (y_pred - losses._match_shape(y_pred, y_true)).square()


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


# name -> (factory(compiled loss) -> fn, canonical name, direction, transform)
_MAX = "max"
_MIN = "min"
_BUILTINS: dict[str, tuple[Callable[[str | None], Callable], str, str, Any]] = {
    "accuracy": (_auto_accuracy, "accuracy", _MAX, None),
    "acc": (_auto_accuracy, "acc", _MAX, None),
    "sparse_categorical_accuracy": (
        lambda loss: functools.partial(sparse_categorical_accuracy, axis=_class_axis(loss)),
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
_BUILTINS["cosine_similarity"] = (
    lambda _: lambda p, t: -losses.cosine_similarity(p, t),
    "cosine_similarity",
    _MAX,
    None,
)

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
        alternatives = "a torchmetrics.Metric or a callable metric(y_pred, y_true)"
        factory, _, direction, transform = lookup(_BUILTINS, metric, "metric", alternatives)
        return MeanMetric(factory(loss), name=metric, direction=direction, transform=transform)
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
    return any(
        c.__module__.startswith("torchmetrics") and c.__name__ == "Metric"
        for c in type(obj).__mro__
    )


def tracked(model: Any) -> dict[str, Metric]:
    """Metric objects assigned to ``model`` as attributes (Keras's tracked metrics), by name:
    torcheras metrics by their ``name``, torchmetrics objects by the attribute's name."""
    found: dict[str, Metric] = {}
    for attr, value in list(vars(model).items()) + list(getattr(model, "_modules", {}).items()):
        if isinstance(value, Metric):
            found.setdefault(value.name, value)
        elif _is_torchmetric(value):
            found.setdefault(attr, TorchMetric(value, name=attr))
    return found
