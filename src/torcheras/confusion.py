"""Metrics counted from a confusion matrix: Keras's classes and numbers, on torch tensors.

Two counts, one helper each:

- :func:`threshold_counts`: the true / false positives / negatives of binary (or multi-label)
  predictions at every threshold of a list, as Keras counts them (``y_pred > t`` is a
  positive, ``y_true`` is cast to bool). Each prediction goes to the bucket between two
  thresholds (``searchsorted``), the buckets are summed (``index_add_``) and a reversed
  cumulative sum gives the counts at every threshold at once: O(N + T) work, no loop over
  the thresholds, no read from the device. :class:`Precision`, :class:`Recall`, the four
  counts, :class:`AUC`, the "at" metrics and the F-scores keep these counts.
- :func:`class_confusion`: the ``(num_classes, num_classes)`` matrix of class ids, for the
  IoU metrics.

The counts are the metric's state (:class:`~torcheras.metrics.StateMetric`): summed over
batches on the device, over the ranks under torchrun, saved for a resume.

Outputs are probabilities, as in Keras; ``from_logits=True`` (Keras's AUC has it; here every
thresholded metric does) applies a sigmoid first. A metric given by name
(``metrics=["precision"]``) reads the probabilities the compiled loss implies, as
``"accuracy"`` does: the sigmoid of the logits of a binary cross-entropy
(``"binary_crossentropy"``, ``nn.BCEWithLogitsLoss``), so that ``"precision"`` thresholds
them at 0.5; the softmax over the classes of a multi-class one's (``"cross_entropy"``,
``"sparse_categorical_crossentropy"``), whose class ids become one-hot rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from torcheras import losses
from torcheras.metrics import StateMetric, count_dtype

__all__ = [
    "AUC",
    "BinaryIoU",
    "F1Score",
    "FBetaScore",
    "FalseNegatives",
    "FalsePositives",
    "IoU",
    "MeanIoU",
    "OneHotIoU",
    "OneHotMeanIoU",
    "Precision",
    "PrecisionAtRecall",
    "Recall",
    "RecallAtPrecision",
    "SensitivityAtSpecificity",
    "SpecificityAtSensitivity",
    "TrueNegatives",
    "TruePositives",
    "class_confusion",
    "threshold_counts",
]

EPSILON = 1e-7  # Keras's backend epsilon
NEG_INF = -1e10  # Keras's score for predictions outside the top k
TP, FP, FN, TN = range(4)  # rows of the counts


def threshold_counts(
    y_pred: Tensor,
    y_true: Tensor,
    thresholds: Tensor,
    weights: Tensor | None = None,
    per_label: bool = False,
) -> Tensor:
    """The counts ``(tp, fp, fn, tn)`` at each threshold, stacked: shape ``(4, T)``, or
    ``(4, T, L)`` with ``per_label`` (one count per column of ``y_pred``'s last axis).

    ``y_true`` holds booleans of ``y_pred``'s shape, ``weights`` (or None) floats of that
    shape, ``thresholds`` are sorted. A prediction is positive at ``t`` when ``y_pred > t``.

    >>> threshold_counts(torch.tensor([0.2, 0.7]), torch.tensor([False, True]),
    ...                  torch.tensor([0.5]))[:, 0].tolist()
    [1.0, 0.0, 0.0, 1.0]
    """
    n = thresholds.numel()
    labels = y_pred.shape[-1] if per_label else 1
    dtype = count_dtype(y_pred.device)
    # A prediction's bucket is the number of thresholds strictly below it, so that
    # y_pred > thresholds[i] exactly when bucket > i.
    bucket = torch.searchsorted(thresholds, y_pred.contiguous())
    if per_label:
        bucket = bucket + torch.arange(labels, device=bucket.device) * (n + 1)
    w = torch.ones((), dtype=dtype, device=y_pred.device) if weights is None else weights.to(dtype)
    source = torch.stack([(y_true * w).expand(y_pred.shape), (~y_true * w).expand(y_pred.shape)])
    buckets = torch.zeros(2, labels * (n + 1), dtype=dtype, device=y_pred.device)
    buckets.index_add_(1, bucket.reshape(-1), source.reshape(2, -1))
    above = buckets.reshape(2, labels, n + 1).flip(-1).cumsum(-1).flip(-1)
    positive = above[..., 1:]  # (tp, fp) at each threshold: the buckets above it
    counts = torch.cat([positive, above[..., :1] - positive])  # (tp, fp, fn, tn)
    return counts.transpose(1, 2) if per_label else counts[:, 0]


def class_confusion(
    y_pred: Tensor,
    y_true: Tensor,
    num_classes: int,
    weights: Tensor | None = None,
    ignore_class: int | None = None,
) -> Tensor:
    """The confusion matrix of class ids (rows: ``y_true``, columns: ``y_pred``), weighted;
    ids outside ``[0, num_classes)`` and labels equal to ``ignore_class`` count for nothing.

    >>> class_confusion(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 2).tolist()
    [[1.0, 1.0], [0.0, 1.0]]
    """
    y_true, y_pred = y_true.reshape(-1).long(), y_pred.reshape(-1).long()
    dtype = count_dtype(y_pred.device)
    w = torch.ones((), dtype=dtype, device=y_pred.device) if weights is None else weights.to(dtype)
    kept = (y_true >= 0) & (y_true < num_classes) & (y_pred >= 0) & (y_pred < num_classes)
    if ignore_class is not None:
        kept &= y_true != ignore_class
    cells = torch.where(kept, y_true * num_classes + y_pred, 0)
    matrix = torch.zeros(num_classes * num_classes, dtype=dtype, device=y_pred.device)
    matrix.index_add_(0, cells, (kept * w.reshape(-1)).expand(cells.shape))
    return matrix.reshape(num_classes, num_classes)


def _divide(a: Tensor, b: Tensor) -> Tensor:
    """``a / b``, 0 where ``b`` is 0 (Keras's ``divide_no_nan``)."""
    return torch.where(b == 0, 0.0, a / b)


def _binary_targets(y_pred: Tensor, y_true: Tensor) -> Tensor:
    """``y_true`` as booleans of ``y_pred``'s shape: ``(N,)`` labels meet ``(N, 1)`` outputs,
    and class ids ``(N,)`` meet ``(N, C)`` scores as one-hot rows."""
    y_true = torch.as_tensor(y_true, device=y_pred.device)
    if y_true.shape != y_pred.shape:
        classes = y_pred.shape[-1] if y_pred.dim() else 1
        if y_true.numel() == y_pred.numel():
            y_true = y_true.reshape(y_pred.shape)
        elif classes > 1 and y_true.numel() * classes == y_pred.numel():
            ids = torch.arange(classes, device=y_pred.device)
            y_true = y_true.reshape(y_pred.shape[:-1]).unsqueeze(-1) == ids
        else:
            raise ValueError(
                f"y_true of shape {tuple(y_true.shape)} does not fit y_pred of shape "
                f"{tuple(y_pred.shape)}: give targets of y_pred's shape (binary or multi-label), "
                "or class ids (N,) for (N, C) outputs."
            )
    return y_true.bool()


def _check_unit(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1]; got {name}={value!r}.")
    return float(value)


def _check_thresholds(thresholds: float | Sequence[float] | None, default: float) -> list[float]:
    if thresholds is None:
        return [default]
    values = [thresholds] if isinstance(thresholds, (int, float)) else list(thresholds)
    for t in values:
        _check_unit("thresholds", t)
    return [float(t) for t in values]


def _evenly_spaced(thresholds: Sequence[float]) -> bool:
    """Keras's test for its bucketed path, which clips the predictions to [0, 1]."""
    n = len(thresholds)
    even = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
    given = torch.tensor(thresholds, dtype=torch.float64)
    return n >= 3 and torch.allclose(given, even, atol=EPSILON)


class _Thresholded(StateMetric):
    """Counts at thresholds (:func:`threshold_counts`), kept as the state ``"counts"``."""

    _rows = False  # whether outputs are (N, C) rows: (N,) is then one column

    def __init__(
        self,
        thresholds: Sequence[float],
        name: str,
        direction: str | None,
        *,
        top_k: int | None = None,
        class_id: int | None = None,
        from_logits: bool = False,
        per_label: bool = False,
        num_labels: int | None = None,
        label_weights: Sequence[float] | None = None,
        clip: bool = False,
    ) -> None:
        super().__init__(name, direction)
        self.thresholds = list(thresholds)
        self.top_k, self.class_id, self.from_logits = top_k, class_id, bool(from_logits)
        self.per_label, self.num_labels, self.clip = per_label, num_labels, clip
        self.label_weights = (
            None if label_weights is None else torch.as_tensor(label_weights, dtype=torch.float32)
        )
        order = sorted(range(len(self.thresholds)), key=self.thresholds.__getitem__)
        self._sorted = torch.tensor([self.thresholds[i] for i in order], dtype=torch.float32)
        # Counts come out in sorted order; the given order is restored when read.
        self._given = None if order == sorted(order) else torch.tensor(order).argsort().tolist()
        self._on_device: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}
        # Set when a name is read through a multi-class loss on logits: their softmax.
        self._softmax_axis: int | None = None

    def _copy_on(self, key: str, tensor: Tensor, like: Tensor) -> Tensor:
        """``tensor`` on ``like``'s device and dtype, copied once, not per batch."""
        where = (key, like.device, like.dtype)
        if where not in self._on_device:
            self._on_device[where] = tensor.to(like.device, like.dtype)
        return self._on_device[where]

    def _probabilities(self, y_pred: Tensor) -> Tensor:
        if self._softmax_axis is not None:
            return y_pred.movedim(self._softmax_axis, -1).softmax(dim=-1)
        return torch.sigmoid(y_pred) if self.from_logits else y_pred

    def _scores(self, y_pred: Tensor) -> Tensor:
        """The scores to threshold: the top k kept, clipped (a hook for the F-scores)."""
        if self.top_k is not None:
            top = y_pred.topk(min(self.top_k, y_pred.shape[-1]), dim=-1).indices
            kept = torch.zeros_like(y_pred, dtype=torch.bool).scatter_(-1, top, True)
            y_pred = torch.where(kept, y_pred, NEG_INF)
        return y_pred.clamp(0.0, 1.0) if self.clip else y_pred

    def _sums(self, y_pred: Tensor, y_true: Tensor, weights: Tensor | None) -> dict[str, Tensor]:
        y_pred = self._probabilities(y_pred)
        y_true = _binary_targets(y_pred, y_true)
        if (self.per_label or self._rows) and y_pred.dim() == 1:
            y_pred, y_true = y_pred.unsqueeze(-1), y_true.unsqueeze(-1)
        if weights is not None:
            weights = torch.broadcast_to(losses.weights_like(y_pred, weights), y_pred.shape)
        if self.label_weights is not None and not self.per_label:
            label_weights = self._copy_on("label_weights", self.label_weights, y_pred)
            weights = label_weights if weights is None else weights * label_weights
            weights = torch.broadcast_to(weights, y_pred.shape)
        y_pred = self._scores(y_pred)
        if self.class_id is not None:
            pick = slice(self.class_id, self.class_id + 1)
            y_pred, y_true = y_pred[..., pick], y_true[..., pick]
            weights = None if weights is None else weights[..., pick]
        thresholds = self._copy_on("thresholds", self._sorted, y_pred)
        return {"counts": threshold_counts(y_pred, y_true, thresholds, weights, self.per_label)}

    def _empty(self) -> dict[str, Tensor] | None:
        shape: tuple[int, ...] = (4, len(self.thresholds))
        if self.per_label:
            if self.num_labels is None:
                return None  # known at the first batch
            shape += (self.num_labels,)
        return {"counts": torch.zeros(shape, dtype=count_dtype(torch.device("cpu")))}

    def _counts(self, state: dict[str, Tensor]) -> Tensor:
        counts = state["counts"]
        return counts if self._given is None else counts[:, self._given]

    def _one_or_all(self, values: Tensor) -> Tensor:
        """Keras's result: a scalar for one threshold, a vector for several."""
        return values[0] if len(self.thresholds) == 1 else values


class _Count(_Thresholded):
    _row, _name = TP, "true_positives"

    def __init__(
        self,
        thresholds: float | Sequence[float] | None = None,
        name: str | None = None,
        from_logits: bool = False,
    ) -> None:
        values = _check_thresholds(thresholds, 0.5)
        direction = "max" if self._row in (TP, TN) else "min"
        super().__init__(
            values,
            name or self._name,
            direction,
            from_logits=from_logits,
            clip=_evenly_spaced(values),
        )

    def _compute(self, state: dict[str, Tensor]) -> Tensor:
        return self._one_or_all(self._counts(state)[self._row])


class TruePositives(_Count):
    """Keras's ``TruePositives``: the (weighted) number of predictions ``> thresholds``
    (0.5 by default; a list gives one count each) whose label is true. Direction: max (Keras
    leaves the four counts without one).

    Example:
        ```python
        model.compile(loss="binary_crossentropy", metrics=[TruePositives(thresholds=0.3)])
        ```
    """

    _row, _name = TP, "true_positives"


class FalsePositives(_Count):
    """Keras's ``FalsePositives``: predictions ``> thresholds`` whose label is false.
    Direction: min.

    Example:
        ```python
        model.compile(loss="binary_crossentropy", metrics=[FalsePositives()])
        ```
    """

    _row, _name = FP, "false_positives"


class FalseNegatives(_Count):
    """Keras's ``FalseNegatives``: predictions ``<= thresholds`` whose label is true.
    Direction: min.

    Example:
        ```python
        model.compile(loss="binary_crossentropy", metrics=[FalseNegatives()])
        ```
    """

    _row, _name = FN, "false_negatives"


class TrueNegatives(_Count):
    """Keras's ``TrueNegatives``: predictions ``<= thresholds`` whose label is false.
    Direction: max.

    Example:
        ```python
        model.compile(loss="binary_crossentropy", metrics=[TrueNegatives()])
        ```
    """

    _row, _name = TN, "true_negatives"


class _PrecisionRecall(_Thresholded):
    def __init__(
        self,
        thresholds: float | Sequence[float] | None = None,
        top_k: int | None = None,
        class_id: int | None = None,
        name: str | None = None,
        from_logits: bool = False,
    ) -> None:
        values = _check_thresholds(thresholds, 0.5 if top_k is None else NEG_INF)
        super().__init__(
            values,
            name or type(self).__name__.lower(),
            "max",
            top_k=top_k,
            class_id=class_id,
            from_logits=from_logits,
            clip=_evenly_spaced(values),
        )


class Precision(_PrecisionRecall):
    """Keras's ``Precision``: ``tp / (tp + fp)`` of predictions ``> thresholds`` (0.5; a list
    gives one precision each), labels cast to bool; 0 before any positive prediction.

    ``top_k`` counts only the k highest scores of each row as predicted (threshold
    ``-inf`` unless given), ``class_id`` only that column. Integer class ids ``(N,)`` for
    ``(N, C)`` outputs are one-hot rows. ``from_logits=True`` (beyond Keras) applies a
    sigmoid first; by name (``"precision"``) it follows the compiled loss (see the module).

    Example:
        ```python
        model.compile(loss="binary_crossentropy", metrics=["precision"])  # sigmoid of logits
        Precision(thresholds=[0.3, 0.5, 0.7])  # three values
        Precision(top_k=1, class_id=2)         # multi-class: how often "2 is the top" is right
        ```
    """

    def _compute(self, state: dict[str, Tensor]) -> Tensor:
        tp, fp, _, _ = self._counts(state)
        return self._one_or_all(_divide(tp, tp + fp))


class Recall(_PrecisionRecall):
    """Keras's ``Recall``: ``tp / (tp + fn)`` of predictions ``> thresholds`` (0.5; a list
    gives one recall each); ``top_k``, ``class_id`` and ``from_logits`` as :class:`Precision`.

    Example:
        ```python
        model.compile(loss=torch.nn.BCEWithLogitsLoss(), metrics=["recall"])
        ```
    """

    def _compute(self, state: dict[str, Tensor]) -> Tensor:
        tp, _, fn, _ = self._counts(state)
        return self._one_or_all(_divide(tp, tp + fn))


class _AtValue(_Thresholded):
    """Keras's ``SensitivitySpecificityBase``: the best of one rate among the thresholds
    where another reaches ``value``."""

    def __init__(
        self,
        argument: str,
        value: float,
        num_thresholds: int,
        class_id: int | None,
        name: str,
        from_logits: bool,
    ) -> None:
        self.value = _check_unit(argument, value)
        setattr(self, argument, self.value)
        if num_thresholds <= 0:
            raise ValueError(f"`num_thresholds` must be > 0; got num_thresholds={num_thresholds}.")
        self.num_thresholds = num_thresholds
        inner = [(i + 1) / (num_thresholds - 1) for i in range(num_thresholds - 2)]
        thresholds = [0.5] if num_thresholds == 1 else [0.0, *inner, 1.0]
        super().__init__(
            thresholds,
            name,
            "max",
            class_id=class_id,
            from_logits=from_logits,
            clip=num_thresholds > 1,
        )

    def _best(self, constrained: Tensor, dependent: Tensor) -> Tensor:
        return torch.where(constrained >= self.value, dependent, 0.0).max().clamp_min(0.0)

    def _rates(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        tp, fp, fn, tn = self._counts(state)
        recall = _divide(tp, tp + fn)
        return {
            "recall": recall,
            "sensitivity": recall,
            "specificity": _divide(tn, tn + fp),
            "precision": _divide(tp, tp + fp),
        }


class SensitivityAtSpecificity(_AtValue):
    """Keras's ``SensitivityAtSpecificity``: the best recall at a threshold (of
    ``num_thresholds`` evenly spaced in [0, 1]) whose specificity is ``>= specificity``.

    Example:
        ```python
        model.compile(loss="binary_crossentropy", metrics=[SensitivityAtSpecificity(0.9)])
        ```
    """

    def __init__(
        self,
        specificity: float,
        num_thresholds: int = 200,
        class_id: int | None = None,
        name: str = "sensitivity_at_specificity",
        from_logits: bool = False,
    ) -> None:
        super().__init__("specificity", specificity, num_thresholds, class_id, name, from_logits)

    def _compute(self, state: dict[str, Tensor]) -> Tensor:
        rates = self._rates(state)
        return self._best(rates["specificity"], rates["sensitivity"])


class SpecificityAtSensitivity(_AtValue):
    """Keras's ``SpecificityAtSensitivity``: the best specificity where recall is
    ``>= sensitivity``.

    Example:
        ```python
        model.compile(loss="binary_crossentropy", metrics=[SpecificityAtSensitivity(0.9)])
        ```
    """

    def __init__(
        self,
        sensitivity: float,
        num_thresholds: int = 200,
        class_id: int | None = None,
        name: str = "specificity_at_sensitivity",
        from_logits: bool = False,
    ) -> None:
        super().__init__("sensitivity", sensitivity, num_thresholds, class_id, name, from_logits)

    def _compute(self, state: dict[str, Tensor]) -> Tensor:
        rates = self._rates(state)
        return self._best(rates["sensitivity"], rates["specificity"])


class PrecisionAtRecall(_AtValue):
    """Keras's ``PrecisionAtRecall``: the best precision where recall is ``>= recall``.

    Example:
        ```python
        model.compile(loss="binary_crossentropy", metrics=[PrecisionAtRecall(0.8)])
        ```
    """

    def __init__(
        self,
        recall: float,
        num_thresholds: int = 200,
        class_id: int | None = None,
        name: str = "precision_at_recall",
        from_logits: bool = False,
    ) -> None:
        super().__init__("recall", recall, num_thresholds, class_id, name, from_logits)

    def _compute(self, state: dict[str, Tensor]) -> Tensor:
        rates = self._rates(state)
        return self._best(rates["recall"], rates["precision"])


class RecallAtPrecision(_AtValue):
    """Keras's ``RecallAtPrecision``: the best recall where precision is ``>= precision``.

    Example:
        ```python
        model.compile(loss="binary_crossentropy", metrics=[RecallAtPrecision(0.8)])
        ```
    """

    def __init__(
        self,
        precision: float,
        num_thresholds: int = 200,
        class_id: int | None = None,
        name: str = "recall_at_precision",
        from_logits: bool = False,
    ) -> None:
        super().__init__("precision", precision, num_thresholds, class_id, name, from_logits)

    def _compute(self, state: dict[str, Tensor]) -> Tensor:
        rates = self._rates(state)
        return self._best(rates["precision"], rates["recall"])


class AUC(_Thresholded):
    """Keras's ``AUC``: the area under the ROC (or PR) curve, from the counts at
    ``num_thresholds`` thresholds evenly spaced in [0, 1] (the first and last moved out by
    1e-7 so that 0 and 1 fall inside), or at ``thresholds``.

    ``summation_method="interpolation"`` takes the trapezoid rule for ROC and, for PR, Keras's
    interpolation of the counts (Davis & Goadrich), not of precision; ``"minoring"`` /
    ``"majoring"`` take the lower / upper rectangles. Keras's numbers to about 1e-6.
    ``sklearn.metrics.roc_auc_score`` (and ``average_precision_score``) is the exact,
    threshold-free value; 200 thresholds approximate it (within about 1e-2 for ROC on a few
    hundred samples, closer with more thresholds), and give it exactly when no two distinct
    scores fall between the same two thresholds.

    ``multi_label=True`` keeps counts per column and averages the columns' areas
    (``label_weights`` weighs them); otherwise every value is one sample and
    ``label_weights`` weighs the columns' counts. ``from_logits=True`` applies a sigmoid.

    Example:
        ```python
        model.compile(loss="binary_crossentropy", metrics=["auc", AUC(curve="PR", name="pr_auc")])
        ```
    """

    def __init__(
        self,
        num_thresholds: int = 200,
        curve: str = "ROC",
        summation_method: str = "interpolation",
        name: str = "auc",
        thresholds: Sequence[float] | None = None,
        multi_label: bool = False,
        num_labels: int | None = None,
        label_weights: Sequence[float] | None = None,
        from_logits: bool = False,
    ) -> None:
        self.curve = str(curve).upper()
        if self.curve not in ("ROC", "PR", "PRGAIN"):
            raise ValueError(f"`curve` must be 'ROC', 'PR' or 'PRGAIN'; got curve={curve!r}.")
        self.summation_method = str(summation_method).lower()
        if self.summation_method not in ("interpolation", "minoring", "majoring"):
            raise ValueError(
                "`summation_method` must be 'interpolation', 'minoring' or 'majoring'; got "
                f"summation_method={summation_method!r}."
            )
        if num_labels and not multi_label:
            raise ValueError("`num_labels` is needed only when `multi_label` is True.")
        if thresholds is not None:
            inner = sorted(_check_thresholds(thresholds, 0.5))
            clip = _evenly_spaced([0.0, *inner, 1.0])
        elif num_thresholds <= 1:
            raise ValueError(f"`num_thresholds` must be > 1; got num_thresholds={num_thresholds}.")
        else:
            inner = [(i + 1) / (num_thresholds - 1) for i in range(num_thresholds - 2)]
            clip = True
        self.num_thresholds = len(inner) + 2
        self.multi_label = bool(multi_label)
        super().__init__(
            [0.0 - EPSILON, *inner, 1.0 + EPSILON],
            name,
            "max",
            from_logits=from_logits,
            per_label=self.multi_label,
            num_labels=num_labels,
            label_weights=label_weights,
            clip=clip,
        )

    def _compute(self, state: dict[str, Tensor]) -> Tensor:
        tp, fp, fn, tn = self._counts(state)
        if self.curve == "PR" and self.summation_method == "interpolation":
            return self._average(self._interpolated_pr(tp, fp, fn))
        recall = _divide(tp, tp + fn)
        if self.curve == "ROC":
            x, y = _divide(fp, fp + tn), recall
        elif self.curve == "PR":
            x, y = recall, _divide(tp, tp + fp)
        else:  # PRGAIN, as Keras computes it
            scale = _divide(tp + fn, tn + fp)
            x = torch.where(tp == 0, 0.0, 1.0 - scale * _divide(fn, tp)).clamp_min(0.0)
            y = torch.where(tp == 0, 1.0, 1.0 - scale * _divide(fp, tp))
        if self.summation_method == "interpolation":
            heights = (y[:-1] + y[1:]) / 2
        elif self.summation_method == "minoring":
            heights = torch.minimum(y[:-1], y[1:])
        else:
            heights = torch.maximum(y[:-1], y[1:])
        return self._average((x[:-1] - x[1:]) * heights)

    @staticmethod
    def _interpolated_pr(tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
        """Keras's ``interpolate_pr_auc``: between two thresholds, precision follows the
        straight line of the true positives against the predicted positives."""
        dtp = tp[:-1] - tp[1:]
        p = tp + fp
        dp = p[:-1] - p[1:]
        slope = _divide(dtp, dp.clamp_min(0))
        intercept = tp[1:] - slope * p[1:]
        both = (p[:-1] > 0) & (p[1:] > 0)
        ratio = torch.where(both, _divide(p[:-1], p[1:].clamp_min(0)), 1.0)
        return _divide(slope * (dtp + intercept * ratio.log()), (tp[1:] + fn[1:]).clamp_min(0))

    def _average(self, terms: Tensor) -> Tensor:
        """The area: the sum over thresholds; per label, their mean (or weighted mean)."""
        area = terms.sum(dim=0)
        if not self.multi_label:
            return area
        if self.label_weights is None:
            return area.mean()
        weights = self.label_weights.to(area.device, area.dtype)
        return _divide((area * weights).sum(), weights.sum())


class FBetaScore(_Thresholded):
    """Keras's ``FBetaScore``: ``(1 + beta**2) * p * r / (beta**2 * p + r)`` per class of
    ``(N, C)`` outputs with one-hot (or multi-label) targets; class ids ``(N,)`` are taken as
    one-hot rows.

    A prediction is positive when it is ``> threshold``, or, with ``threshold=None`` (Keras's
    default), when it is its row's highest (non-zero) score: the argmax, which on a single
    column ``(N, 1)`` calls every sample positive, as Keras does. ``average``: None (one
    score per class, Keras's default), ``"micro"`` (global counts), ``"macro"`` (the mean of
    the classes' scores), ``"weighted"`` (weighed by each class's true labels). Keras's
    epsilons: a score differs from ``sklearn.metrics.fbeta_score`` by about 1e-7.

    Example:
        ```python
        model.compile(loss="categorical_crossentropy", metrics=[F1Score(average="macro")])
        ```
    """

    _rows = True

    def __init__(
        self,
        average: str | None = None,
        beta: float = 1.0,
        threshold: float | None = None,
        name: str = "fbeta_score",
        from_logits: bool = False,
    ) -> None:
        if average not in (None, "micro", "macro", "weighted"):
            raise ValueError(
                f"`average` must be None, 'micro', 'macro' or 'weighted'; got average={average!r}."
            )
        if float(beta) <= 0.0:
            raise ValueError(f"`beta` must be > 0; got beta={beta!r}.")
        if threshold is not None and not 0.0 < float(threshold) <= 1.0:
            raise ValueError(f"`threshold` must be in (0, 1]; got threshold={threshold!r}.")
        self.average, self.beta = average, float(beta)
        self.threshold = None if threshold is None else float(threshold)
        super().__init__([0.5], name, "max", from_logits=from_logits, per_label=average != "micro")

    def _scores(self, y_pred: Tensor) -> Tensor:
        """1.0 for a positive prediction, 0.0 otherwise (thresholded at 0.5 after)."""
        y_pred = super()._scores(y_pred)
        if self.threshold is not None:
            return (y_pred > self.threshold).to(y_pred.dtype)
        top = y_pred.amax(dim=-1, keepdim=True)
        return ((y_pred >= top) & (y_pred.abs() > 1e-9)).to(y_pred.dtype)

    def _compute(self, state: dict[str, Tensor]) -> Tensor:
        tp, fp, fn, _ = self._counts(state)[:, 0]
        precision = tp / (tp + fp + EPSILON)
        recall = tp / (tp + fn + EPSILON)
        beta2 = self.beta**2
        score = precision * recall / (beta2 * precision + recall + EPSILON) * (1 + beta2)
        if self.average == "weighted":
            support = tp + fn
            return (score * support / (support.sum() + EPSILON)).sum()
        return score if self.average is None else score.mean()


class F1Score(FBetaScore):
    """Keras's ``F1Score``: :class:`FBetaScore` with ``beta=1``.

    Example:
        ```python
        model.compile(loss="binary_crossentropy", metrics=[F1Score(threshold=0.5)])
        ```
    """

    def __init__(
        self,
        average: str | None = None,
        threshold: float | None = None,
        name: str = "f1_score",
        from_logits: bool = False,
    ) -> None:
        super().__init__(average, 1.0, threshold, name, from_logits)


class IoU(StateMetric):
    """Keras's ``IoU``: the intersection over union ``tp / (tp + fp + fn)`` of each class in
    ``target_class_ids``, averaged over those present (a class absent from both labels and
    predictions counts for nothing), from the confusion matrix of class ids.

    ``y_true`` and ``y_pred`` are class ids by default (``sparse_y_true`` / ``sparse_y_pred``);
    set ``sparse_y_pred=False`` for scores ``(..., C)``: the argmax over ``axis`` is taken.
    Labels equal to ``ignore_class`` and ids outside ``[0, num_classes)`` count for nothing.
    Weights are used as floats (Keras's integer matrix truncates them).

    Example:
        ```python
        model.compile(loss="cross_entropy",
                      metrics=[IoU(num_classes=3, target_class_ids=[1], sparse_y_pred=False)])
        ```
    """

    def __init__(
        self,
        num_classes: int,
        target_class_ids: Sequence[int],
        name: str = "io_u",
        ignore_class: int | None = None,
        sparse_y_true: bool = True,
        sparse_y_pred: bool = True,
        axis: int = -1,
    ) -> None:
        super().__init__(name, "max")
        self.target_class_ids = list(target_class_ids)
        if max(self.target_class_ids) >= num_classes or min(self.target_class_ids) < 0:
            raise ValueError(
                f"`target_class_ids` must lie in [0, {num_classes}) (num_classes={num_classes});"
                f" got {self.target_class_ids}."
            )
        self.num_classes, self.ignore_class = int(num_classes), ignore_class
        self.sparse_y_true, self.sparse_y_pred, self.axis = sparse_y_true, sparse_y_pred, axis

    def _ids(self, y_pred: Tensor, y_true: Tensor) -> tuple[Tensor, Tensor]:
        y_true = torch.as_tensor(y_true, device=y_pred.device)
        if not self.sparse_y_true:
            y_true = y_true.argmax(dim=self.axis)
        if not self.sparse_y_pred:
            y_pred = y_pred.argmax(dim=self.axis)
        return y_pred, y_true

    def _sums(self, y_pred: Tensor, y_true: Tensor, weights: Tensor | None) -> dict[str, Tensor]:
        y_pred, y_true = self._ids(y_pred, y_true)
        if y_pred.numel() != y_true.numel():
            raise ValueError(
                f"{type(self).__name__} compares class ids, but y_pred has shape "
                f"{tuple(y_pred.shape)} and y_true {tuple(y_true.shape)}: for scores (N, C) pass "
                "sparse_y_pred=False (and sparse_y_true=False for one-hot targets)."
            )
        if weights is not None:
            ids = y_true.reshape(y_pred.shape).float()
            weights = torch.broadcast_to(losses.weights_like(ids, weights), ids.shape)
        matrix = class_confusion(y_pred, y_true, self.num_classes, weights, self.ignore_class)
        return {"matrix": matrix}

    def _empty(self) -> dict[str, Tensor]:
        shape = (self.num_classes, self.num_classes)
        return {"matrix": torch.zeros(shape, dtype=count_dtype(torch.device("cpu")))}

    def _compute(self, state: dict[str, Tensor]) -> Tensor:
        matrix = state["matrix"]
        tp = matrix.diagonal()
        union = matrix.sum(dim=0) + matrix.sum(dim=1) - tp
        ids = self.target_class_ids
        tp, union = tp[ids], union[ids]
        present = union > 1e-9
        iou = torch.where(present, tp / (union + EPSILON), 0.0)
        return iou.sum() / (present.sum() + EPSILON)


class MeanIoU(IoU):
    """Keras's ``MeanIoU``: :class:`IoU` averaged over every class.

    Example:
        ```python
        model.compile(loss="cross_entropy", metrics=[MeanIoU(num_classes=3, sparse_y_pred=False)])
        ```
    """

    def __init__(
        self,
        num_classes: int,
        name: str = "mean_io_u",
        ignore_class: int | None = None,
        sparse_y_true: bool = True,
        sparse_y_pred: bool = True,
        axis: int = -1,
    ) -> None:
        super().__init__(
            num_classes, range(num_classes), name, ignore_class, sparse_y_true, sparse_y_pred, axis
        )


class OneHotIoU(IoU):
    """Keras's ``OneHotIoU``: :class:`IoU` of one-hot targets and scores (argmax of both).

    Example:
        ```python
        model.compile(loss="categorical_crossentropy",
                      metrics=[OneHotIoU(num_classes=3, target_class_ids=[0, 2])])
        ```
    """

    def __init__(
        self,
        num_classes: int,
        target_class_ids: Sequence[int],
        name: str = "one_hot_io_u",
        ignore_class: int | None = None,
        sparse_y_pred: bool = False,
        axis: int = -1,
    ) -> None:
        super().__init__(
            num_classes, target_class_ids, name, ignore_class, False, sparse_y_pred, axis
        )


class OneHotMeanIoU(MeanIoU):
    """Keras's ``OneHotMeanIoU``: :class:`MeanIoU` of one-hot targets and scores.

    Example:
        ```python
        model.compile(loss="categorical_crossentropy", metrics=[OneHotMeanIoU(num_classes=3)])
        ```
    """

    def __init__(
        self,
        num_classes: int,
        name: str = "one_hot_mean_io_u",
        ignore_class: int | None = None,
        sparse_y_pred: bool = False,
        axis: int = -1,
    ) -> None:
        super().__init__(num_classes, name, ignore_class, False, sparse_y_pred, axis)


class BinaryIoU(IoU):
    """Keras's ``BinaryIoU``: :class:`IoU` of binary targets and predictions
    ``>= threshold`` (0.5), over the classes ``target_class_ids`` (both, 0 and 1, by
    default). ``from_logits=True`` applies a sigmoid first (by name, from the loss).

    Example:
        ```python
        model.compile(loss="binary_crossentropy", metrics=[BinaryIoU(target_class_ids=[1])])
        ```
    """

    def __init__(
        self,
        target_class_ids: Sequence[int] = (0, 1),
        threshold: float = 0.5,
        name: str = "binary_io_u",
        from_logits: bool = False,
    ) -> None:
        super().__init__(2, target_class_ids, name)
        self.threshold, self.from_logits = float(threshold), bool(from_logits)

    def _ids(self, y_pred: Tensor, y_true: Any) -> tuple[Tensor, Tensor]:
        if self.from_logits:
            y_pred = torch.sigmoid(y_pred)
        return (y_pred >= self.threshold).long(), torch.as_tensor(y_true, device=y_pred.device)
