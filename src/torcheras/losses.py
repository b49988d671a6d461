"""Losses: Keras's names and loss objects, torch's modules and functions, one reduction rule.

Every loss takes ``(y_pred, y_true)`` — torch's argument order. :func:`get` turns what the user
passed to ``compile(loss=...)`` into a :class:`CompiledLoss`, which computes one value per batch:

* **Built-in names** (``"sparse_categorical_crossentropy"``, ``"mse"``, ...) mean what Keras
  means, except that the cross-entropy *names* take **logits** (Keras's ``from_logits=True``);
  the loss objects (``BinaryCrossentropy(from_logits=False)``, ...) follow Keras's defaults.
* **A torch loss module** (``nn.CrossEntropyLoss(weight=w, ignore_index=-1)``) is computed as
  torch computes it: its class weights, ``ignore_index``, ``label_smoothing`` and
  ``reduction`` all hold.
* **A callable** ``loss(y_pred, y_true)`` returning a scalar or one value per sample.

Sample weights (``sample_weight=``, and ``class_weight=`` turned into sample weights) combine
as in Keras: they multiply each sample's loss in the numerator, and the denominator stays what
the loss divides by without them — the number of loss values for the built-ins (Keras's
``sum_over_batch_size``), torch's own divisor for a module (``sum(weight[y])`` over the samples
not ignored, for ``CrossEntropyLoss(weight=...)``; the batch size for ``KLDivLoss``'s
``reduction="batchmean"``, so a weight scales its sample's KL divergence, the sum of the
sample's pointwise terms), nothing for ``reduction="sum"``. With all weights 1 the result is
exactly the unweighted loss. A built-in gives one value per sample, or
per time step of a sequence (``(N, T, C)`` outputs, as Keras's losses do), so weights of shape
``(N, T)`` weigh each step (Keras's temporal sample weights).

Integer labels of any integer dtype (``uint8``, ``int16``, ``int32``...) are cast to int64 for
the cross-entropies.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torcheras.registry import lookup

__all__ = [
    "LOSSES",
    "BinaryCrossentropy",
    "CategoricalCrossentropy",
    "CompiledLoss",
    "MultiOutputLoss",
    "SparseCategoricalCrossentropy",
    "get",
    "output_kind",
]

LossFn = Callable[[Any, Any], Tensor]
EPSILON = 1e-7  # Keras's backend epsilon: the clip of probabilities and logarithms
IGNORE_INDEX = -100  # torch's default ignore_index: a label that counts for nothing

# What a loss says about the model's outputs: "logits", "probabilities", "values" (a
# regression: no threshold question) or None (cannot tell).
LOGITS, PROBABILITIES, VALUES = "logits", "probabilities", "values"


def _match_shape(y_pred: Tensor, y_true: Tensor) -> Tensor:
    """Let ``(N,)`` targets meet ``(N, 1)`` predictions, as Keras does; floats as y_pred."""
    if y_true.shape != y_pred.shape and y_true.numel() == y_pred.numel():
        y_true = y_true.reshape(y_pred.shape)
    if y_true.dtype is not y_pred.dtype and y_pred.is_floating_point():
        return y_true.to(y_pred.dtype)
    return y_true  # no no-op ``to`` call per batch


def _mean_last_axis(values: Tensor) -> Tensor:
    """Keras's per-position loss of an elementwise one: the mean over the last (feature) axis,
    so ``(N, D)`` gives one value per sample and ``(N, T, D)`` one per time step. ``(N,)``
    values are one per sample already."""
    return values.mean(dim=-1) if values.dim() > 1 else values


def class_labels(y_pred: Tensor, y_true: Tensor) -> Tensor:
    """Integer class labels as int64 (any integer dtype, or whole floats), ``(N, 1)`` squeezed."""
    if y_true.dim() == y_pred.dim() and y_true.shape[-1] == 1:
        y_true = y_true.squeeze(-1)
    return y_true if y_true.dtype == torch.int64 else y_true.long()


# ---- built-ins: one value per sample, or per position of a sequence (Keras's formulas) -----


def _check_classes_last(y_pred: Tensor, labels: Tensor) -> None:
    """Keras's sparse cross-entropy reads the classes on the last axis: labels ``(N, ...)``
    for outputs ``(N, ..., C)``. Outputs in torch's layout ``(N, C, ...)`` (a segmentation
    net's ``(N, C, H, W)`` against labels ``(N, H, W)``) are refused with the two fixes, not
    guessed: the accuracies compiled with the loss read the same axis. Where both layouts fit
    (as many classes as positions), Keras's is taken."""
    if labels.shape == y_pred.shape[:-1]:
        return
    if labels.dim() == y_pred.dim() - 1 and labels.shape[1:] == y_pred.shape[2:]:
        raise ValueError(
            f"'sparse_categorical_crossentropy' reads the classes on the last axis (Keras's "
            f"layout (N, ..., C)), but the outputs {tuple(y_pred.shape)} and the labels "
            f"{tuple(labels.shape)} have them on axis 1 (torch's layout (N, C, ...)). Use "
            "loss='cross_entropy' (torch's layout; the accuracies follow it), or put the "
            "classes last in the model's output (out.movedim(1, -1): (N, H, W, C))."
        )
    raise ValueError(
        f"'sparse_categorical_crossentropy' takes outputs (N, ..., C) and labels (N, ...); "
        f"got outputs {tuple(y_pred.shape)} and labels {tuple(labels.shape)}."
    )


def sparse_categorical_crossentropy(y_pred: Tensor, y_true: Tensor) -> Tensor:
    """Integer labels and logits; ``(N, ..., C)`` predictions as Keras lays them out (torch's
    ``(N, C, ...)`` raises, naming ``"cross_entropy"``)."""
    labels = class_labels(y_pred, y_true)
    if y_pred.dim() > 2:  # torch wants (N, C, ...)
        _check_classes_last(y_pred, labels)
        y_pred = y_pred.movedim(-1, 1)
    return _mean_over_kept_labels(F.cross_entropy(y_pred, labels, reduction="none"), labels)


def _mean_over_kept_labels(values: Tensor, labels: Tensor) -> Tensor:
    """Values (one per label) whose mean is the mean over the labels not ignored (-100), as
    ``F.cross_entropy``'s own mean (and Keras's masked mean). Without ignored labels the scale
    is exactly 1; no host sync."""
    return values * (labels.numel() / (labels != IGNORE_INDEX).sum())


def cross_entropy(y_pred: Tensor, y_true: Tensor) -> Tensor:
    """torch's ``cross_entropy``: class labels, or class probabilities of ``y_pred``'s shape.
    Labels of -100 (torch's ``ignore_index``, padding) count for nothing, as in torch."""
    if y_true.is_floating_point() and y_true.shape == y_pred.shape:
        return F.cross_entropy(y_pred, y_true, reduction="none")
    labels = class_labels(y_pred, y_true)
    return _mean_over_kept_labels(F.cross_entropy(y_pred, labels, reduction="none"), labels)


def categorical_crossentropy(y_pred: Tensor, y_true: Tensor) -> Tensor:
    return -(y_true.to(y_pred.dtype) * F.log_softmax(y_pred, dim=-1)).sum(dim=-1)


def binary_crossentropy(y_pred: Tensor, y_true: Tensor) -> Tensor:
    y_true = _match_shape(y_pred, y_true)
    return _mean_last_axis(F.binary_cross_entropy_with_logits(y_pred, y_true, reduction="none"))


def _binary_crossentropy_probs(y_pred: Tensor, y_true: Tensor) -> Tensor:
    y_true = _match_shape(y_pred, y_true)
    p = y_pred.clamp(EPSILON, 1 - EPSILON)
    return _mean_last_axis(-(y_true * p.log() + (1 - y_true) * (1 - p).log()))


def _categorical_crossentropy_probs(y_pred: Tensor, y_true: Tensor) -> Tensor:
    p = (y_pred / y_pred.sum(dim=-1, keepdim=True)).clamp(EPSILON, 1 - EPSILON)
    return -(y_true.to(y_pred.dtype) * p.log()).sum(dim=-1)


def _sparse_categorical_crossentropy_probs(y_pred: Tensor, y_true: Tensor) -> Tensor:
    labels = class_labels(y_pred, y_true)
    if y_pred.dim() > 2:
        _check_classes_last(y_pred, labels)
    p = (y_pred / y_pred.sum(dim=-1, keepdim=True)).clamp(EPSILON, 1 - EPSILON)
    return -p.log().gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def mean_squared_error(y_pred: Tensor, y_true: Tensor) -> Tensor:
    return _mean_last_axis((y_pred - _match_shape(y_pred, y_true)).square())


def mean_absolute_error(y_pred: Tensor, y_true: Tensor) -> Tensor:
    return _mean_last_axis((y_pred - _match_shape(y_pred, y_true)).abs())


def mean_absolute_percentage_error(y_pred: Tensor, y_true: Tensor) -> Tensor:
    y_true = _match_shape(y_pred, y_true)
    return _mean_last_axis(100.0 * ((y_true - y_pred) / y_true.abs().clamp_min(EPSILON)).abs())


def mean_squared_logarithmic_error(y_pred: Tensor, y_true: Tensor) -> Tensor:
    y_true = _match_shape(y_pred, y_true)
    return _mean_last_axis(
        (torch.log1p(y_pred.clamp_min(EPSILON)) - torch.log1p(y_true.clamp_min(EPSILON))).square()
    )


def huber(y_pred: Tensor, y_true: Tensor) -> Tensor:
    return _mean_last_axis(F.huber_loss(y_pred, _match_shape(y_pred, y_true), reduction="none"))


def log_cosh(y_pred: Tensor, y_true: Tensor) -> Tensor:
    diff = y_pred - _match_shape(y_pred, y_true)
    return _mean_last_axis(diff + F.softplus(-2.0 * diff) - math.log(2.0))


def kl_divergence(y_pred: Tensor, y_true: Tensor) -> Tensor:
    """Keras's KL divergence of two probability distributions (both clipped to [1e-7, 1])."""
    y_true = _match_shape(y_pred, y_true).clamp(EPSILON, 1)
    p = y_pred.clamp(EPSILON, 1)
    return (y_true * (y_true / p).log()).sum(dim=-1)


def poisson(y_pred: Tensor, y_true: Tensor) -> Tensor:
    y_true = _match_shape(y_pred, y_true)
    return _mean_last_axis(y_pred - y_true * torch.log(y_pred + EPSILON))


def _hinge_labels(y_true: Tensor) -> Tensor:
    """Keras: {0, 1} labels become {-1, 1}; labels already in {-1, 1} stay."""
    return torch.where(y_true == 0, -torch.ones_like(y_true), y_true)


def hinge(y_pred: Tensor, y_true: Tensor) -> Tensor:
    y_true = _hinge_labels(_match_shape(y_pred, y_true))
    return _mean_last_axis(F.relu(1.0 - y_true * y_pred))


def squared_hinge(y_pred: Tensor, y_true: Tensor) -> Tensor:
    y_true = _hinge_labels(_match_shape(y_pred, y_true))
    return _mean_last_axis(F.relu(1.0 - y_true * y_pred).square())


def categorical_hinge(y_pred: Tensor, y_true: Tensor) -> Tensor:
    y_true = y_true.to(y_pred.dtype)
    positive = (y_true * y_pred).sum(dim=-1)
    negative = ((1.0 - y_true) * y_pred).amax(dim=-1)
    return F.relu(negative - positive + 1.0)


def cosine_similarity(y_pred: Tensor, y_true: Tensor) -> Tensor:
    """Keras's loss: minus the cosine similarity (so -1 is a perfect match)."""
    y_true = _match_shape(y_pred, y_true)
    return -(F.normalize(y_true, dim=-1) * F.normalize(y_pred, dim=-1)).sum(dim=-1)


def nll_loss(y_pred: Tensor, y_true: Tensor) -> Tensor:
    return F.nll_loss(y_pred, class_labels(y_pred, y_true), reduction="none")


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
    "categorical_hinge": categorical_hinge,
    "cosine_similarity": cosine_similarity,
    # torch's names
    "cross_entropy": cross_entropy,
    "binary_cross_entropy_with_logits": binary_crossentropy,
    "bce_with_logits": binary_crossentropy,
    "mse_loss": mean_squared_error,
    "l1_loss": mean_absolute_error,
    "huber_loss": huber,
    "smooth_l1_loss": huber,
    "nll_loss": nll_loss,
}

# What each built-in expects of y_true ("sparse": class labels) and says of y_pred.
_SPARSE = {sparse_categorical_crossentropy, nll_loss}
_CATEGORICAL = {categorical_crossentropy}
_BINARY = {binary_crossentropy}
_LOGIT_LOSSES = _SPARSE | _CATEGORICAL | _BINARY | {cross_entropy}
_PROBABILITY_LOSSES = {kl_divergence}


# ---- Keras's loss objects -------------------------------------------------------------------


_REDUCTIONS = ("sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none", None)


class _KerasCrossentropy:
    """Base of the Keras-style cross-entropy objects: ``from_logits`` as in Keras (False),
    ``label_smoothing`` spreading that much of each target evenly over the classes.

    Called directly, an object behaves as Keras's: ``loss(y_true, y_pred, sample_weight=None)``
    (Keras's argument order: the targets first) returns the loss reduced by ``reduction``
    (Keras's default ``"sum_over_batch_size"``: a scalar, ready for ``.backward()``; ``"sum"``;
    ``"mean_with_sample_weight"``, divided by the weights' sum; ``"none"`` / None: one value
    per sample). Where the order shows (integers where the predictions belong, or labels of a
    cross-entropy outside [0, 1]), arguments given the other way round raise a ValueError.
    ``compile(loss=...)`` uses :meth:`values`, in torch's order, and reduces as every
    compiled loss does.
    """

    target = "binary"
    _on_logits: Callable[[Tensor, Tensor], Tensor] = staticmethod(binary_crossentropy)
    _on_probabilities: Callable[[Tensor, Tensor], Tensor] = staticmethod(_binary_crossentropy_probs)

    def __init__(
        self,
        from_logits: bool = False,
        label_smoothing: float = 0.0,
        reduction: str | None = "sum_over_batch_size",
        name: str | None = None,
    ) -> None:
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise ValueError(
                f"{type(self).__name__}: `label_smoothing` must be in [0, 1]; "
                f"got {label_smoothing!r}."
            )
        if reduction not in _REDUCTIONS:
            raise ValueError(
                f"{type(self).__name__}: `reduction` must be one of {list(_REDUCTIONS)} "
                f"(Keras's); got {reduction!r}."
            )
        self.from_logits = bool(from_logits)
        self.label_smoothing = float(label_smoothing)
        self.reduction = reduction
        self.name = name or type(self).__name__

    def values(self, y_pred: Tensor, y_true: Tensor) -> Tensor:
        """The loss of each sample (or position of a sequence), in torch's order
        ``(y_pred, y_true)``: what ``compile(loss=...)`` reduces."""
        if self.target == "binary":
            y_true = _match_shape(y_pred, y_true)
        elif self.target == "categorical":
            y_true = y_true.to(y_pred.dtype)
        if self.label_smoothing:
            classes = 2 if self.target == "binary" else y_pred.shape[-1]
            smoothing = self.label_smoothing
            y_true = y_true * (1.0 - smoothing) + smoothing / classes
        fn = self._on_logits if self.from_logits else self._on_probabilities
        return fn(y_pred, y_true)

    def __call__(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Tensor:
        """Keras's call: ``loss(y_true, y_pred)``, reduced by ``self.reduction``."""
        y_pred = torch.as_tensor(y_pred)
        if not y_pred.is_floating_point():
            y_true = torch.as_tensor(y_true)
            if y_true.is_floating_point():
                self._swapped("integers where the predictions belong", "y_pred", "y_true")
            y_pred = y_pred.to(torch.get_default_dtype())
        y_true = torch.as_tensor(y_true, device=y_pred.device)
        self._check_order(y_true, y_pred)
        values = self.values(y_pred, y_true)
        weights = None
        if sample_weight is not None:
            weights = torch.as_tensor(sample_weight, device=values.device).to(values.dtype)
            values = values * weights_like(values, weights)
        if self.reduction in (None, "none") or values.dim() == 0:
            return values
        total = values.sum()
        if self.reduction == "sum":
            return total
        if self.reduction == "mean_with_sample_weight" and weights is not None:
            return total / weights.sum()
        return total / max(values.numel(), 1)

    def _check_order(self, y_true: Tensor, y_pred: Tensor) -> None:
        """Arguments in torch's order ``(y_pred, y_true)`` where Keras's is expected: labels
        that cannot be labels (outside [0, 1], or, for class ids, not whole numbers)."""
        if not y_true.is_floating_point() or y_true.numel() == 0:
            return
        if self.target == "sparse":
            if not torch.equal(y_true, y_true.round()):
                self._swapped("labels that are not whole numbers (logits?)", "y_true", "y_pred")
        elif bool(((y_true < 0) | (y_true > 1)).any()):
            self._swapped("labels outside [0, 1] (logits?)", "y_true", "y_pred")

    def _swapped(self, what: str, first: str, second: str) -> None:
        raise ValueError(
            f"{type(self).__name__} was called with {what}. Keras's loss objects take "
            "the targets first: call loss(y_true, y_pred) (the arguments look swapped: "
            "torch's order is (input, target), Keras's is (y_true, y_pred)). In compile(loss=...)"
            " the order is handled for you."
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(from_logits={self.from_logits})"


class BinaryCrossentropy(_KerasCrossentropy):
    """Keras's ``BinaryCrossentropy``: probabilities by default, ``from_logits=True`` for logits.

    Example:
        ```python
        model.compile(loss=torcheras.losses.BinaryCrossentropy(from_logits=False))  # sigmoid net
        ```
    """

    __name__ = "binary_crossentropy"


class CategoricalCrossentropy(_KerasCrossentropy):
    """Keras's ``CategoricalCrossentropy`` (one-hot targets); probabilities by default.

    Example:
        ```python
        model.compile(loss=torcheras.losses.CategoricalCrossentropy(from_logits=True))
        ```
    """

    __name__ = "categorical_crossentropy"
    target = "categorical"
    _on_logits = staticmethod(categorical_crossentropy)
    _on_probabilities = staticmethod(_categorical_crossentropy_probs)


class SparseCategoricalCrossentropy(_KerasCrossentropy):
    """Keras's ``SparseCategoricalCrossentropy`` (integer labels); probabilities by default.

    Example:
        ```python
        model.compile(loss=torcheras.losses.SparseCategoricalCrossentropy(from_logits=True))
        ```
    """

    __name__ = "sparse_categorical_crossentropy"
    target = "sparse"
    _on_logits = staticmethod(sparse_categorical_crossentropy)
    _on_probabilities = staticmethod(_sparse_categorical_crossentropy_probs)

    def __init__(
        self,
        from_logits: bool = False,
        reduction: str | None = "sum_over_batch_size",
        name: str | None = None,
    ) -> None:
        super().__init__(from_logits, reduction=reduction, name=name)


# ---- one compiled loss: reduction, sample weights, first-batch checks -----------------------


def _fused_sparse_cce(y_pred: Tensor, y_true: Tensor) -> Tensor:
    if y_pred.dim() == 2 and y_true.dim() == 1:
        return F.cross_entropy(y_pred, class_labels(y_pred, y_true))
    return sparse_categorical_crossentropy(y_pred, y_true).mean()


def _fused_cross_entropy(y_pred: Tensor, y_true: Tensor) -> Tensor:
    """``F.cross_entropy`` itself: its mean over the labels kept (one kernel, one grad node)."""
    if y_true.dtype is torch.int64 and y_true.ndim == 1 and y_pred.ndim == 2:  # the common case
        return F.cross_entropy(y_pred, y_true)
    if y_true.is_floating_point() and y_true.shape == y_pred.shape:
        return F.cross_entropy(y_pred, y_true)
    return F.cross_entropy(y_pred, class_labels(y_pred, y_true))


class _FusedMean:
    """The batch mean of a torch loss function, ``y_true`` shaped like ``y_pred``; a class, not
    a closure, so that a compiled model pickles (scikit-learn's estimators, joblib)."""

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        self.fn = fn

    def __call__(self, y_pred: Tensor, y_true: Tensor) -> Tensor:
        if y_pred.shape == y_true.shape:
            same = y_true.dtype is y_pred.dtype
            return self.fn(y_pred, y_true if same else y_true.to(y_pred.dtype))
        return self.fn(y_pred, _match_shape(y_pred, y_true))


# Batch-mean forms of the common losses: one fused kernel when no sample weights are given.
FUSED: dict[LossFn, LossFn] = {
    sparse_categorical_crossentropy: _fused_sparse_cce,
    cross_entropy: _fused_cross_entropy,
    mean_squared_error: _FusedMean(F.mse_loss),
    mean_absolute_error: _FusedMean(F.l1_loss),
    binary_crossentropy: _FusedMean(F.binary_cross_entropy_with_logits),
    huber: _FusedMean(F.huber_loss),
}

# torch loss modules: what they say of y_pred, and which take class labels.
_MODULE_KINDS: dict[type, str] = {
    nn.CrossEntropyLoss: LOGITS,
    nn.BCEWithLogitsLoss: LOGITS,
    nn.BCELoss: PROBABILITIES,
    nn.NLLLoss: VALUES,  # log-probabilities: no threshold question
    nn.MSELoss: VALUES,
    nn.L1Loss: VALUES,
    nn.HuberLoss: VALUES,
    nn.SmoothL1Loss: VALUES,
    nn.KLDivLoss: VALUES,
    nn.PoissonNLLLoss: VALUES,
}
_LABEL_MODULES = (nn.CrossEntropyLoss, nn.NLLLoss)
_BUILTIN_FUNCTIONS = frozenset(LOSSES.values())
_HALF = (torch.float16, torch.bfloat16)
_TORCH_LAYOUT = (cross_entropy, nll_loss, F.cross_entropy, F.nll_loss)  # classes on axis 1
_FUNCTION_KINDS: dict[Any, str] = {
    F.binary_cross_entropy_with_logits: LOGITS,
    F.cross_entropy: LOGITS,
    F.binary_cross_entropy: PROBABILITIES,
    F.mse_loss: VALUES,
    F.l1_loss: VALUES,
    F.huber_loss: VALUES,
    F.smooth_l1_loss: VALUES,
    F.nll_loss: VALUES,
}


class CompiledLoss:
    """The loss ``compile`` resolved: ``loss(y_pred, y_true, sample_weight) -> scalar``.

    ``name`` is the loss's name, ``output_kind`` what it says of the model's outputs
    (``"logits"``, ``"probabilities"``, ``"values"`` or None), ``target`` what it expects of
    ``y_true`` (``"sparse"``, ``"categorical"``, ``"binary"`` or None), ``class_axis`` where
    the classes lie in the outputs: 1 for torch's cross-entropies (``(N, C, T)``), -1 for
    Keras's (``(N, T, C)``). ``said_logits``: the user named logits explicitly
    (``from_logits=True``, ``nn.BCEWithLogitsLoss``, ``"bce_with_logits"``), so outputs that
    look like probabilities are not warned of. :meth:`check` runs the one-time checks of the
    first batch.
    """

    def __init__(
        self,
        fn: LossFn,
        name: str,
        *,
        output_kind: str | None,
        target: str | None = None,
        module: nn.Module | None = None,
        said_logits: bool = False,
    ) -> None:
        self.fn = fn
        self.said_logits = said_logits
        self.name = name
        self.output_kind = output_kind
        self.target = target
        self.module = module
        self._fused = FUSED.get(fn)
        torch_layout = fn in _TORCH_LAYOUT or isinstance(fn, _LABEL_MODULES)
        self.class_axis = 1 if torch_layout else -1
        # Ours compute in float32 under mixed precision, as Keras's losses and torch's own
        # loss functions (autocast) do: float16 / bfloat16 outputs are upcast first.
        self._in_float32 = fn in _BUILTIN_FUNCTIONS or isinstance(
            getattr(fn, "__self__", None), _KerasCrossentropy
        )

    def __call__(self, y_pred: Any, y_true: Any, sample_weight: Tensor | None = None) -> Tensor:
        if self.module is not None:
            return self._module_loss(y_pred, y_true, sample_weight)
        if self._in_float32 and y_pred.dtype in _HALF:
            y_pred = y_pred.float()
        if sample_weight is None and self._fused is not None:
            return self._fused(y_pred, y_true)
        return reduce_loss(self.fn(y_pred, y_true), sample_weight)

    def fused_float32(self) -> Callable[[Tensor, Tensor], Tensor] | None:
        """What ``self(y_pred, y_true)`` runs for float32 outputs without sample weights,
        where that is one fused torch function (else None): a caller that checked the dtype
        may call it directly."""
        return self._fused if self.module is None else None

    def _module_loss(self, y_pred: Tensor, y_true: Tensor, sample_weight: Tensor | None) -> Tensor:
        module = self.module
        if self.target == "sparse" and not (
            y_true.is_floating_point() and y_true.shape == y_pred.shape
        ):
            y_true = y_true if y_true.dtype == torch.int64 else y_true.long()
        elif self.target == "binary":
            y_true = _match_shape(y_pred, y_true)
        if sample_weight is None:
            return module(y_pred, y_true)  # exactly torch's
        reduction = module.reduction  # type: ignore[union-attr]
        if reduction == "none":
            raise ValueError(
                "sample_weight/class_weight need a loss that reduces; this loss module has "
                "reduction='none'. Use reduction='mean' or 'sum'."
            )
        module.reduction = "none"  # type: ignore[union-attr]
        try:
            values = module(y_pred, y_true)
        finally:
            module.reduction = reduction  # type: ignore[union-attr]
        numerator = (values * weights_like(values, sample_weight)).sum()
        if reduction == "sum":
            return numerator
        if reduction == "batchmean":  # KLDivLoss: the sum over the batch, by the batch size
            return numerator / (y_pred.shape[0] if y_pred.dim() else 1)
        return numerator / _torch_mean_divisor(module, y_pred, y_true, values)

    def check(self, y_pred: Any, y_true: Any) -> None:
        """One-time checks of the first batch: the targets' form and the logits trap."""
        if not isinstance(y_pred, Tensor) or not isinstance(y_true, Tensor):
            return
        if self.target == "sparse":
            _check_sparse_labels(self.name, y_pred, y_true, self.module is not None)
        if self.output_kind == LOGITS and not self.said_logits:
            _warn_if_probabilities(self.name, self.target, y_pred)
        elif self.output_kind == PROBABILITIES and self.target is not None:
            _warn_if_logits(self.name, y_pred)

    def __repr__(self) -> str:
        return f"CompiledLoss({self.name!r}, output_kind={self.output_kind!r})"


class MultiOutputLoss(CompiledLoss):
    """Keras's loss for a model with several outputs: one loss per output, each computed on
    that output and its targets, weighted by ``loss_weights`` (1 by default) and summed.

    ``losses`` is a dict keyed by the names of a dict of outputs, or a list in the order of a
    tuple of outputs (named ``output_0``, ``output_1``, ...); an output without a loss is not
    trained on. The logs get ``loss`` (the weighted sum) and each output's unweighted loss as
    ``<output>_loss``, as in Keras.

    Example:
        ```python
        model.compile("adam", loss={"label": "sparse_categorical_crossentropy", "box": "mse"},
                      loss_weights={"box": 0.5}, metrics={"label": ["accuracy"]})
        model.fit(x, {"label": labels, "box": boxes})
        ```
    """

    def __init__(
        self, losses: Mapping[Any, Any] | list[Any] | tuple[Any, ...], loss_weights: Any = None
    ) -> None:
        keyed = dict(losses) if isinstance(losses, Mapping) else dict(enumerate(losses))
        self.parts = {key: get(value) for key, value in keyed.items() if value is not None}
        if not self.parts:
            raise ValueError(
                f"`loss` is {losses!r}: give a loss for at least one output, e.g. "
                "loss={'label': 'sparse_categorical_crossentropy'}."
            )
        self.weights = _loss_weights(keyed, loss_weights)
        self.log_names = {key: f"{output_name(key)}_loss" for key in self.parts}
        super().__init__(self.__call__, "multi_output_loss", output_kind=None)

    def __call__(self, y_pred: Any, y_true: Any, sample_weight: Tensor | None = None) -> Tensor:
        return self.with_parts(y_pred, y_true, sample_weight)[0]

    def with_parts(
        self, y_pred: Any, y_true: Any, sample_weight: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted sum, and each output's own loss by its log name (``<output>_loss``)."""
        parts: dict[str, Tensor] = {}
        total: Tensor | None = None
        for key, loss in self.parts.items():
            value = loss(output_of(y_pred, key, "outputs"), output_of(y_true, key, "targets"),
                         weights_of(sample_weight, key))  # fmt: skip
            parts[self.log_names[key]] = value
            weight = self.weights.get(key, 1.0)
            term = value if weight == 1.0 else value * weight
            total = term if total is None else total + term
        return total, parts  # type: ignore[return-value]

    def check(self, y_pred: Any, y_true: Any) -> None:
        for key, loss in self.parts.items():
            loss.check(output_of(y_pred, key, "outputs"), output_of(y_true, key, "targets"))

    def __repr__(self) -> str:
        parts = ", ".join(f"{output_name(k)}={v.name!r}" for k, v in self.parts.items())
        return f"MultiOutputLoss({parts})"


def weights_of(sample_weight: Any, key: Any) -> Tensor | None:
    """An output's sample weights: the same for every output, or its own from a dict keyed by
    output (an output missing from the dict is unweighted)."""
    if isinstance(sample_weight, Mapping):
        return sample_weight.get(key)
    return sample_weight


def output_name(key: Any) -> str:
    """The name an output goes by in the logs: its dict key, or ``output_<i>`` in a tuple."""
    return key if isinstance(key, str) else f"output_{key}"


def output_of(structure: Any, key: Any, what: str) -> Any:
    """One output (or its targets) of a model with several: ``structure[key]``, or a
    ValueError that names the keys there are."""
    if isinstance(key, str):
        if isinstance(structure, Mapping) and key in structure:
            return structure[key]
        have = (
            f"a dict with {sorted(map(str, structure))}"
            if isinstance(structure, Mapping)
            else f"a {type(structure).__name__}, not a dict"
        )
    else:
        if isinstance(structure, (list, tuple)) and key < len(structure):
            return structure[key]
        have = (
            f"a {type(structure).__name__} of {len(structure)}"
            if isinstance(structure, (list, tuple))
            else f"a {type(structure).__name__}, not a tuple or list"
        )
    raise ValueError(
        f"The loss (or metric) for output {output_name(key)!r} needs the model's {what} to "
        f"hold it, but they are {have}. Key `loss` and `metrics` by the names of the dict "
        "the model returns (and y by the same names), or list them in the order of its tuple."
    )


def _loss_weights(keyed: Mapping[Any, Any], loss_weights: Any) -> dict[Any, float]:
    if loss_weights is None:
        return {}
    given = (
        dict(loss_weights)
        if isinstance(loss_weights, Mapping)
        else dict(enumerate(loss_weights))
        if isinstance(loss_weights, (list, tuple))
        else None
    )
    if given is None or set(given) - set(keyed):
        raise ValueError(
            f"`loss_weights` must name outputs that `loss` has ({sorted(map(output_name, keyed))}),"
            f" as a dict (or a list in the same order); got {loss_weights!r}."
        )
    weights = {}
    for key, weight in given.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(
                f"`loss_weights[{key!r}]` must be a non-negative number; got {weight!r}."
            )
        weights[key] = float(weight)
    return weights


def _torch_mean_divisor(module: nn.Module, y_pred: Tensor, y_true: Tensor, values: Tensor) -> Any:
    """What torch's ``reduction="mean"`` divides by, for these targets."""
    if isinstance(module, _LABEL_MODULES) and not y_true.is_floating_point():
        ignore = getattr(module, "ignore_index", -100)
        valid = y_true != ignore
        weight = getattr(module, "weight", None)
        if weight is None:
            return valid.sum().to(values.dtype)
        return weight[torch.where(valid, y_true, 0)].mul(valid).sum().to(values.dtype)
    return values.numel()


def reduce_loss(values: Tensor, sample_weight: Tensor | None = None) -> Tensor:
    """Reduce a loss's values (one per sample, or per position of a sequence) to one value:
    Keras's ``sum_over_batch_size``.

    With weights the result is ``sum(loss * weight) / values.numel()``, as in Keras: a weight
    per sample ``(N,)`` counts for each of the sample's positions, a weight per position
    ``(N, T)`` (Keras's temporal sample weights, a padding mask) for that position.
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
    return (values * weights_like(values, sample_weight)).sum() / values.numel()


def weights_like(values: Tensor, sample_weight: Tensor) -> Tensor:
    """``sample_weight`` shaped to multiply ``values``: one weight per sample (``(N,)`` or
    ``(N, 1)``) spreads over the sample's positions; weights of shape ``(N, T, ...)`` must
    match the leading axes of ``values``. A ValueError names the two shapes otherwise."""
    if not isinstance(sample_weight, Tensor):
        raise ValueError(
            f"sample_weight is a {type(sample_weight).__name__} (weights per output?), but the "
            "loss is one loss for the whole output: give one weight array, or compile a loss "
            "per output (loss={'<output>': ...}) to weigh each output's samples apart."
        )
    weights = sample_weight.to(values.dtype)
    if weights.dim() > 1 and weights.numel() == weights.shape[0]:
        weights = weights.reshape(-1)  # (N, 1): one per sample
    if weights.shape != values.shape[: weights.dim()]:
        raise ValueError(
            f"sample_weight of shape {tuple(sample_weight.shape)} does not fit the loss values "
            f"of shape {tuple(values.shape)}: give one weight per sample (N,), or one per "
            "position (N, T) for a loss with one value per time step (the output (N, T, C) of "
            "a sequence model, with targets (N, T))."
        )
    return weights.reshape(weights.shape + (1,) * (values.dim() - weights.dim()))


def _check_sparse_labels(name: str, y_pred: Tensor, y_true: Tensor, torch_module: bool) -> None:
    if not y_true.is_floating_point():
        return
    if y_true.shape == y_pred.shape and y_pred.dim() >= 2 and y_pred.shape[-1] > 1:
        if torch_module:  # torch's CrossEntropyLoss takes class probabilities of this shape
            return
        raise ValueError(
            f"`y` holds one-hot (or probability) rows of shape {tuple(y_true.shape)}, but the "
            f"loss {name!r} takes integer class labels. Use loss='categorical_crossentropy' "
            "for one-hot targets, or pass y.argmax(-1) as the labels."
        )
    if not torch.equal(y_true, y_true.round()):
        raise ValueError(
            f"`y` holds float values that are not whole numbers (e.g. "
            f"{y_true[y_true != y_true.round()].flatten()[0].item()!r}), but the loss {name!r} "
            "takes integer class labels. Pass integer labels (y.astype('int64')), or use a "
            "regression loss such as 'mse' for continuous targets."
        )


def _warn_if_probabilities(name: str, target: str | None, y_pred: Tensor) -> None:
    """The logits trap: a network that ends with sigmoid/softmax, given to a logits loss."""
    if y_pred.numel() == 0 or not y_pred.is_floating_point():
        return
    outputs = y_pred.detach()
    in_unit = bool(((outputs >= 0) & (outputs <= 1)).all())
    if not in_unit:
        return
    if target in ("sparse", "categorical") or (target is None and outputs.dim() >= 2):
        if outputs.shape[-1] < 2:
            return
        sums = outputs.float().sum(dim=-1)
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
            return
        fix = (
            "remove the final softmax (recommended), or compile with "
            f"torcheras.losses.{_OBJECT_FOR.get(name, 'CategoricalCrossentropy')}"
            "(from_logits=False)"
        )
        what = "rows that sum to 1, as a softmax's do"
    else:
        fix = (
            "remove the final sigmoid (recommended), or compile with "
            "torcheras.losses.BinaryCrossentropy(from_logits=False)"
        )
        what = "in [0, 1], as a sigmoid's are"
    warnings.warn(
        f"The loss {name!r} expects logits, but the model's outputs on the first batch are "
        f"all {what}. If the network ends with one, training will go badly: {fix}.",
        UserWarning,
        stacklevel=4,
    )


def _warn_if_logits(name: str, y_pred: Tensor) -> None:
    if y_pred.numel() == 0 or not y_pred.is_floating_point():
        return
    outputs = y_pred.detach()
    if bool(((outputs >= 0) & (outputs <= 1)).all()):
        return
    warnings.warn(
        f"The loss {name!r} expects probabilities (from_logits=False), but the model's outputs "
        "on the first batch lie outside [0, 1] (logits?). End the network with a sigmoid / "
        "softmax, or pass from_logits=True.",
        UserWarning,
        stacklevel=4,
    )


_OBJECT_FOR = {
    "sparse_categorical_crossentropy": "SparseCategoricalCrossentropy",
    "categorical_crossentropy": "CategoricalCrossentropy",
    "cross_entropy": "SparseCategoricalCrossentropy",
}


def get(loss: Any, loss_weights: Any = None) -> CompiledLoss:
    """Resolve ``compile(loss=...)`` to a :class:`CompiledLoss`: a dict or list of losses (one
    per output, weighted by ``loss_weights``) to a :class:`MultiOutputLoss`.

    >>> get("mse").name
    'mean_squared_error'
    """
    if isinstance(loss, (Mapping, list, tuple)):
        return MultiOutputLoss(loss, loss_weights)
    if loss_weights is not None:
        raise ValueError(
            "`loss_weights` weighs the losses of a model with several outputs; give `loss` as "
            "a dict {output: loss} (or a list in the outputs' order) to use it."
        )
    if isinstance(loss, CompiledLoss):
        return loss
    if isinstance(loss, str):
        fn = lookup(LOSSES, loss, "loss", "an nn.Module or a callable loss(y_pred, y_true)")
        return CompiledLoss(
            fn,
            fn.__name__,
            output_kind=_builtin_kind(fn),
            target=_target(fn),
            said_logits="logits" in loss.lower(),
        )
    if isinstance(loss, _KerasCrossentropy):
        kind = LOGITS if loss.from_logits else PROBABILITIES
        return CompiledLoss(
            loss.values,
            loss.__name__,
            output_kind=kind,
            target=loss.target,
            said_logits=loss.from_logits,
        )
    if isinstance(loss, nn.Module):
        kind = _MODULE_KINDS.get(type(loss))
        target = (
            "sparse"
            if isinstance(loss, _LABEL_MODULES)
            else "binary"
            if isinstance(loss, (nn.BCEWithLogitsLoss, nn.BCELoss))
            else None
        )
        reduces = getattr(loss, "reduction", None) in ("mean", "sum", "none", "batchmean")
        return CompiledLoss(
            loss,
            _snake(type(loss).__name__),
            output_kind=kind,
            target=target,
            module=loss if reduces else None,
            said_logits=isinstance(loss, nn.BCEWithLogitsLoss),
        )
    if callable(loss):
        name = getattr(loss, "__name__", type(loss).__name__)
        return CompiledLoss(
            loss,
            name,
            output_kind=output_kind(loss),
            target=_target(loss),
            said_logits="logits" in name or getattr(loss, "from_logits", None) is True,
        )
    raise TypeError(
        f"`loss` must be a loss name, an nn.Module or a callable loss(y_pred, y_true); "
        f"got {type(loss).__name__}."
    )


def _builtin_kind(fn: LossFn) -> str:
    if fn in _LOGIT_LOSSES:
        return LOGITS
    if fn in _PROBABILITY_LOSSES:
        return PROBABILITIES
    return VALUES


def _target(fn: Any) -> str | None:
    if fn in _SPARSE or fn is F.cross_entropy or fn is F.nll_loss:
        return "sparse"
    if fn in _CATEGORICAL:
        return "categorical"
    if fn in _BINARY or fn in (F.binary_cross_entropy, F.binary_cross_entropy_with_logits):
        return "binary"
    return None


def output_kind(loss: Any) -> str | None:
    """What a loss says of the model's outputs: "logits", "probabilities", "values" or None.

    Known names, torch modules and functions answer for themselves; any other callable may
    declare it with a ``from_logits`` attribute.
    """
    if isinstance(loss, CompiledLoss):
        return loss.output_kind
    if loss in _FUNCTION_KINDS:
        return _FUNCTION_KINDS[loss]
    if isinstance(loss, nn.Module):
        return _MODULE_KINDS.get(type(loss))
    if loss in LOSSES.values():
        return _builtin_kind(loss)
    from_logits = getattr(loss, "from_logits", None)
    if from_logits is not None:
        return LOGITS if from_logits else PROBABILITIES
    return None


def _snake(name: str, acronyms: bool = True) -> str:
    """A class name in snake case, acronyms kept whole: ``BCEWithLogitsLoss`` ->
    ``bce_with_logits_loss``, ``NLLLoss`` -> ``nll_loss``, ``F1Score`` -> ``f1_score``.
    ``acronyms=False``: a break only before a capital that follows a small letter or digit
    (``MulticlassFBetaScore`` -> ``multiclass_fbeta_score``), the names torchmetrics objects
    have always been logged under."""
    if acronyms:
        return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()
    return re.sub(r"(?<=[^A-Z])(?=[A-Z])", "_", name).lower().lstrip("_")
