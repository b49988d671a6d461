"""Loss names to functions.

Every built-in loss takes ``(y_pred, y_true)`` — torch's argument order — and returns one
value per sample, so that ``sample_weight`` and ``class_weight`` can weight it. Predictions
are **logits** for the cross-entropies (Keras's ``from_logits=True``): a torch model normally
ends without a softmax or sigmoid, and the fused log-softmax is the numerically stable form.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torcheras.registry import lookup

__all__ = ["LOSSES", "get", "reduce_loss"]

LossFn = Callable[[Any, Any], Tensor]


def _match_shape(y_pred: Tensor, y_true: Tensor) -> Tensor:
    """Let ``(N,)`` targets meet ``(N, 1)`` predictions, as Keras does."""
    if y_true.shape != y_pred.shape and y_true.numel() == y_pred.numel():
        y_true = y_true.reshape(y_pred.shape)
    return y_true.to(y_pred.dtype) if y_pred.is_floating_point() else y_true


def _per_sample(values: Tensor) -> Tensor:
    """Mean over every axis but the batch axis."""
    return values.reshape(values.shape[0], -1).mean(dim=1) if values.dim() > 1 else values


def sparse_categorical_crossentropy(y_pred: Tensor, y_true: Tensor) -> Tensor:
    if y_true.dim() == y_pred.dim() and y_true.shape[-1] == 1:
        y_true = y_true.squeeze(-1)
    if y_pred.dim() > 2:  # (N, ..., C) as Keras lays it out; torch wants (N, C, ...)
        y_pred = y_pred.movedim(-1, 1)
    return _per_sample(F.cross_entropy(y_pred, y_true.long(), reduction="none"))


def categorical_crossentropy(y_pred: Tensor, y_true: Tensor) -> Tensor:
    return _per_sample(-(y_true.to(y_pred.dtype) * F.log_softmax(y_pred, dim=-1)).sum(dim=-1))


def binary_crossentropy(y_pred: Tensor, y_true: Tensor) -> Tensor:
    y_true = _match_shape(y_pred, y_true)
    return _per_sample(F.binary_cross_entropy_with_logits(y_pred, y_true, reduction="none"))


def mean_squared_error(y_pred: Tensor, y_true: Tensor) -> Tensor:
    return _per_sample((y_pred - _match_shape(y_pred, y_true)).square())


def mean_absolute_error(y_pred: Tensor, y_true: Tensor) -> Tensor:
    return _per_sample((y_pred - _match_shape(y_pred, y_true)).abs())


def mean_absolute_percentage_error(y_pred: Tensor, y_true: Tensor) -> Tensor:
    y_true = _match_shape(y_pred, y_true)
    return _per_sample(100.0 * ((y_true - y_pred) / y_true.abs().clamp_min(1e-7)).abs())


def mean_squared_logarithmic_error(y_pred: Tensor, y_true: Tensor) -> Tensor:
    y_true = _match_shape(y_pred, y_true)
    return _per_sample(
        (torch.log1p(y_pred.clamp_min(0)) - torch.log1p(y_true.clamp_min(0))).square()
    )


def huber(y_pred: Tensor, y_true: Tensor) -> Tensor:
    return _per_sample(F.huber_loss(y_pred, _match_shape(y_pred, y_true), reduction="none"))


def log_cosh(y_pred: Tensor, y_true: Tensor) -> Tensor:
    diff = y_pred - _match_shape(y_pred, y_true)
    return _per_sample(diff + F.softplus(-2.0 * diff) - torch.log(torch.tensor(2.0)))


def kl_divergence(y_pred: Tensor, y_true: Tensor) -> Tensor:
    y_true = _match_shape(y_pred, y_true).clamp(1e-7, 1)
    return (y_true * (y_true.log() - F.log_softmax(y_pred, dim=-1))).sum(dim=-1)


def poisson(y_pred: Tensor, y_true: Tensor) -> Tensor:
    y_true = _match_shape(y_pred, y_true)
    return _per_sample(y_pred - y_true * torch.log(y_pred + 1e-7))


def hinge(y_pred: Tensor, y_true: Tensor) -> Tensor:
    y_true = _match_shape(y_pred, y_true)
    y_true = torch.where(y_true == 0, -torch.ones_like(y_true), y_true)  # {0, 1} -> {-1, 1}
    return _per_sample(F.relu(1.0 - y_true * y_pred))


def squared_hinge(y_pred: Tensor, y_true: Tensor) -> Tensor:
    y_true = _match_shape(y_pred, y_true)
    y_true = torch.where(y_true == 0, -torch.ones_like(y_true), y_true)
    return _per_sample(F.relu(1.0 - y_true * y_pred).square())


def nll_loss(y_pred: Tensor, y_true: Tensor) -> Tensor:
    return F.nll_loss(y_pred, y_true.long(), reduction="none")


LOSSES: dict[str, LossFn] = {
    "sparse_categorical_crossentropy": sparse_categorical_crossentropy,
    "categorical_crossentropy": categorical_crossentropy,
    "binary_crossentropy": binary_crossentropy,
    "mean_squared_error": mean_squared_error,
    "mse": mean_squared_error,
    "mean_absolute_error": mean_absolute_error,
    "mae": mean_absolute_error,
    "mean_absolute_percentage_error": mean_absolute_percentage_error,
    "mape": mean_absolute_percentage_error,
    "mean_squared_logarithmic_error": mean_squared_logarithmic_error,
    "msle": mean_squared_logarithmic_error,
    "huber": huber,
    "log_cosh": log_cosh,
    "logcosh": log_cosh,
    "kl_divergence": kl_divergence,
    "kld": kl_divergence,
    "poisson": poisson,
    "hinge": hinge,
    "squared_hinge": squared_hinge,
    # torch's names
    "cross_entropy": sparse_categorical_crossentropy,
    "binary_cross_entropy_with_logits": binary_crossentropy,
    "bce_with_logits": binary_crossentropy,
    "mse_loss": mean_squared_error,
    "l1_loss": mean_absolute_error,
    "huber_loss": huber,
    "smooth_l1_loss": huber,
    "nll_loss": nll_loss,
}


def _fused_sparse_cce(y_pred: Tensor, y_true: Tensor) -> Tensor:
    if y_pred.dim() == 2 and y_true.dim() == 1:
        return F.cross_entropy(y_pred, y_true.long() if y_true.is_floating_point() else y_true)
    return sparse_categorical_crossentropy(y_pred, y_true).mean()


def _fused(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    def mean(y_pred: Tensor, y_true: Tensor) -> Tensor:
        if y_pred.shape == y_true.shape:
            return fn(y_pred, y_true.to(y_pred.dtype))
        return fn(y_pred, _match_shape(y_pred, y_true))

    return mean


# Batch-mean forms of the common losses: one fused kernel when no sample weights are given.
FUSED: dict[LossFn, LossFn] = {
    sparse_categorical_crossentropy: _fused_sparse_cce,
    mean_squared_error: _fused(F.mse_loss),
    mean_absolute_error: _fused(F.l1_loss),
    binary_crossentropy: _fused(F.binary_cross_entropy_with_logits),
    huber: _fused(F.huber_loss),
}


def get(loss: str | nn.Module | LossFn) -> tuple[str, LossFn]:
    """Resolve ``loss`` to ``(name, fn)`` where ``fn(y_pred, y_true)`` returns a tensor.

    >>> name, fn = get("mse")
    >>> name
    'mean_squared_error'
    """
    if isinstance(loss, str):
        fn = lookup(LOSSES, loss, "loss", "an nn.Module or a callable loss(y_pred, y_true)")
        return fn.__name__, fn
    if isinstance(loss, nn.Module):
        return _snake(type(loss).__name__), _module_loss(loss)
    if callable(loss):
        return getattr(loss, "__name__", type(loss).__name__), loss
    raise TypeError(
        f"`loss` must be a loss name, an nn.Module or a callable loss(y_pred, y_true); "
        f"got {type(loss).__name__}."
    )


def _module_loss(module: nn.Module) -> LossFn:
    """Call a torch loss module per sample when it has a ``reduction`` we can switch off."""
    if getattr(module, "reduction", None) == "mean":

        def per_sample(y_pred: Tensor, y_true: Tensor) -> Tensor:
            module.reduction = "none"
            try:
                return _per_sample(module(y_pred, y_true))
            finally:
                module.reduction = "mean"

        per_sample.__name__ = type(module).__name__
        return per_sample
    return module


def reduce_loss(values: Tensor, sample_weight: Tensor | None = None) -> Tensor:
    """Reduce per-sample losses to one value: Keras's ``sum_over_batch_size``.

    With weights the result is ``sum(loss * weight) / batch_size``, as in Keras.
    """
    if values.dim() == 0:
        if sample_weight is not None:
            raise ValueError(
                "sample_weight/class_weight need a loss that returns one value per sample, but "
                "the compiled loss returned a scalar. Use a built-in loss name, a torch loss "
                "module with `reduction`, or a callable that returns per-sample values."
            )
        return values
    if sample_weight is None:
        return values.mean()
    weights = sample_weight.to(values.dtype).reshape(-1)
    return (values.reshape(weights.shape[0], -1).mean(dim=1) * weights).sum() / weights.shape[0]


def _snake(name: str) -> str:
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i and not name[i - 1].isupper():
            out.append("_")
        out.append(ch.lower())
    return "".join(out)
