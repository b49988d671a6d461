"""Metric names to stateful metric objects, each with a known direction.

A metric accumulates on the device (no host read per batch) and is read once when the logs
are. ``direction`` is ``"max"`` for accuracy-like metrics and ``"min"`` for error-like ones;
``mode="auto"`` in the monitoring callbacks uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from torcheras import losses
from torcheras.data import to_cpu
from torcheras.registry import lookup

__all__ = ["Metric", "MeanMetric", "get", "direction_of"]


class Metric:
    """Base class: ``update(y_pred, y_true, sample_weight)``, ``result()``, ``reset()``.

    Subclass it for a custom stateful metric; set ``direction`` to ``"max"`` or ``"min"``.
    """

    name: str = "metric"
    direction: str | None = None

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
        self._total: Tensor | None = None
        self._count: Tensor | float = 0.0

    def update(self, y_pred: Any, y_true: Any, sample_weight: Tensor | None = None) -> None:
        with torch.no_grad():
            values = self.fn(y_pred, y_true)
            if not isinstance(values, Tensor):
                values = torch.as_tensor(values, dtype=torch.float32)
            values = values.detach().float()
            if values.dim() == 0:
                n = (
                    len(y_pred)
                    if hasattr(y_pred, "__len__") and not isinstance(y_pred, dict)
                    else 1
                )
                total, count = values * n, float(n)
            elif sample_weight is not None:
                w = sample_weight.reshape(-1).to(values.dtype)
                values = values.reshape(w.shape[0], -1).mean(dim=1)
                total, count = (values * w).sum(), w.sum()
            else:
                total, count = values.sum(), float(values.numel())
            if self._total is None:
                self._total = total
            else:
                self._total = self._total + total
            self._count = self._count + count

    def result(self) -> Tensor | float:
        if self._total is None:
            return 0.0
        mean = self._total / self._count
        return self.transform(mean) if self.transform is not None else mean

    def reset(self) -> None:
        self._total = None
        self._count = 0.0

    def state_dict(self) -> dict[str, Any]:
        return to_cpu({"total": self._total, "count": self._count}, clone=True)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._total, self._count = state["total"], state["count"]

    def __repr__(self) -> str:
        return f"MeanMetric(name={self.name!r}, direction={self.direction!r})"


class TorchMetric(Metric):
    """Adapter for a ``torchmetrics.Metric``; direction from its ``higher_is_better``."""

    def __init__(self, metric: Any, name: str | None = None) -> None:
        self.metric = metric
        self.name = name or losses._snake(type(metric).__name__)
        hib = getattr(metric, "higher_is_better", None)
        self.direction = None if hib is None else ("max" if hib else "min")

    def update(self, y_pred: Any, y_true: Any, sample_weight: Tensor | None = None) -> None:
        if self.metric.device != y_pred.device:
            self.metric.to(y_pred.device)
        self.metric.update(y_pred.detach(), y_true)

    def result(self) -> Tensor | float:
        return self.metric.compute()

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


def sparse_categorical_accuracy(y_pred: Tensor, y_true: Tensor) -> Tensor:
    if y_true.dim() == y_pred.dim() and y_true.shape[-1] == 1:
        y_true = y_true.squeeze(-1)
    return (y_pred.argmax(dim=-1) == y_true).float()


def categorical_accuracy(y_pred: Tensor, y_true: Tensor) -> Tensor:
    return (y_pred.argmax(dim=-1) == y_true.argmax(dim=-1)).float()


def _binary_accuracy(threshold: float) -> Callable[[Tensor, Tensor], Tensor]:
    def binary_accuracy(y_pred: Tensor, y_true: Tensor) -> Tensor:
        y_true = losses._match_shape(y_pred, y_true)
        return ((y_pred > threshold).to(y_true.dtype) == y_true).float()

    return binary_accuracy


def _top_k(k: int, sparse: bool) -> Callable[[Tensor, Tensor], Tensor]:
    def top_k(y_pred: Tensor, y_true: Tensor) -> Tensor:
        target = y_true.reshape(-1) if sparse else y_true.argmax(dim=-1)
        top = y_pred.topk(min(k, y_pred.shape[-1]), dim=-1).indices
        return (top == target.unsqueeze(-1).long()).any(dim=-1).float()

    return top_k


def _auto_accuracy(loss_name: str | None) -> Callable[[Tensor, Tensor], Tensor]:
    """Keras resolves ``"accuracy"`` from the loss; we also look at the shapes."""
    binary_logits = _binary_accuracy(0.0)
    binary_probs = _binary_accuracy(0.5)

    def accuracy(y_pred: Tensor, y_true: Tensor) -> Tensor:
        if loss_name == "binary_crossentropy":  # our binary cross-entropy takes logits
            return binary_logits(y_pred, y_true)
        if y_pred.dim() >= 2 and y_pred.shape[-1] > 1:
            if y_true.shape == y_pred.shape and y_true.is_floating_point():
                return categorical_accuracy(y_pred, y_true)
            return sparse_categorical_accuracy(y_pred, y_true)
        return binary_probs(y_pred, y_true)

    return accuracy


def _loss_metric(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    return losses.LOSSES[name]


# name -> (factory(loss_name) -> fn, canonical name, direction, transform)
_MAX = "max"
_MIN = "min"
_BUILTINS: dict[str, tuple[Callable[[str | None], Callable], str, str, Any]] = {
    "accuracy": (_auto_accuracy, "accuracy", _MAX, None),
    "acc": (_auto_accuracy, "acc", _MAX, None),
    "sparse_categorical_accuracy": (
        lambda _: sparse_categorical_accuracy,
        "sparse_categorical_accuracy",
        _MAX,
        None,
    ),
    "categorical_accuracy": (lambda _: categorical_accuracy, "categorical_accuracy", _MAX, None),
    "binary_accuracy": (lambda _: _binary_accuracy(0.5), "binary_accuracy", _MAX, None),
    "top_k_categorical_accuracy": (
        lambda _: _top_k(5, sparse=False),
        "top_k_categorical_accuracy",
        _MAX,
        None,
    ),
    "sparse_top_k_categorical_accuracy": (
        lambda _: _top_k(5, sparse=True),
        "sparse_top_k_categorical_accuracy",
        _MAX,
        None,
    ),
    "root_mean_squared_error": (
        lambda _: losses.mean_squared_error,
        "root_mean_squared_error",
        _MIN,
        torch.sqrt,
    ),
    "rmse": (lambda _: losses.mean_squared_error, "rmse", _MIN, torch.sqrt),
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
]:
    _BUILTINS[_name] = (lambda _, n=_name: _loss_metric(n), _name, _MIN, None)

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


def get(metric: Any, loss_name: str | None = None) -> Metric:
    """Resolve a metric name, ``torchmetrics.Metric``, :class:`Metric` or callable.

    >>> get("accuracy").direction
    'max'
    """
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        alternatives = "a torchmetrics.Metric or a callable metric(y_pred, y_true)"
        factory, _, direction, transform = lookup(_BUILTINS, metric, "metric", alternatives)
        return MeanMetric(factory(loss_name), name=metric, direction=direction, transform=transform)
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
