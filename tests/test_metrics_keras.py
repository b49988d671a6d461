"""Keras's metrics by name and by class (issue 20, point 4): scikit-learn's and Keras's numbers.

Each metric is updated over 3 batches of seeded random data, weighted and not, and checked
against scikit-learn (or torch, or a direct numpy count) always, and against
``keras.metrics`` on the same data where Keras is installed. Tolerances: float32 inputs,
float64 counts here and float32 sums in Keras: 1e-6 (1e-5 relative for R2, whose float32
sums in Keras lose digits to cancellation). AUC against the exact, threshold-free
``roc_auc_score`` is exact when no two distinct scores share a bucket between thresholds,
within 5e-3 on 300 spread scores otherwise.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn import metrics as sk

import torcheras
from torcheras import losses
from torcheras import metrics as M

ATOL = 1e-6

rng = np.random.default_rng(20)
N = 300
# binary: labels (N, 1), probabilities that lean towards them, weights per sample
Y = rng.integers(0, 2, (N, 1)).astype("float32")
P = np.clip(rng.normal(0.45, 0.25, (N, 1)) + 0.2 * Y, 0, 1).astype("float32")
LOGITS = (rng.normal(size=(N, 1)) + Y).astype("float32")
W = rng.uniform(0, 2, N).astype("float32")
# multi-class: 4 classes, ids, one-hot rows, logits and their softmax
C = 4
LABELS = rng.integers(0, C, N)
ONE_HOT = np.eye(C, dtype="float32")[LABELS]
CLASS_LOGITS = (rng.normal(size=(N, C)) + 1.5 * ONE_HOT).astype("float32")
PROBS = torch.as_tensor(CLASS_LOGITS).softmax(-1).numpy()
# multi-label: 4 independent labels per sample, scores
MULTI = (rng.uniform(size=(N, C)) < 0.4).astype("float32")
MULTI_P = np.clip(0.3 * MULTI + 0.7 * rng.uniform(size=(N, C)), 0, 1).astype("float32")
# regression: 3 targets, predictions near them (positive, for the logarithmic errors)
TARGETS = rng.uniform(0.5, 3, (N, 3)).astype("float32")
PREDS = (TARGETS + rng.normal(0, 0.4, (N, 3))).clip(0.1).astype("float32")

DATA = {
    "binary": (Y, P),
    "binary_1d": (Y[:, 0], P[:, 0]),
    "binary_logits": (Y, LOGITS),
    "one_hot": (ONE_HOT, PROBS),
    "one_hot_logits": (ONE_HOT, CLASS_LOGITS),
    "labels": (LABELS, PROBS),
    "label_ids": (LABELS, PROBS.argmax(-1)),
    "labels_logits": (LABELS, CLASS_LOGITS),
    "sorted_ids": (LABELS, np.argsort(-PROBS, axis=-1).astype("float32")),
    "multi_label": (MULTI, MULTI_P),
    "regression": (TARGETS, PREDS),
    "hinge": (MULTI, 2 * MULTI_P - 1),
}


def accumulate(metric, y_true, y_pred, sample_weight=None, batches=3):
    """``update_state`` (Keras's order: y_true first) over consecutive batches; the result."""
    for part in np.array_split(np.arange(len(y_true)), batches):
        weights = None if sample_weight is None else sample_weight[part]
        metric.update_state(y_true[part], y_pred[part], weights)
    result = metric.result()
    if isinstance(result, torch.Tensor):
        return result.detach().cpu().double().numpy()
    return np.asarray(result, dtype="float64")


# ---- scikit-learn: the counts, precision, recall, F-scores ----------------------------------


@pytest.mark.parametrize("weighted", [False, True])
def test_counts_precision_and_recall_at_each_threshold_are_sklearns(weighted):
    thresholds = [0.7, 0.3, 0.5]  # unsorted: one value each, in the order given
    w = W if weighted else None
    got = {
        cls: accumulate(getattr(M, cls)(thresholds=thresholds), Y, P, w)
        for cls in ["TruePositives", "FalsePositives", "TrueNegatives", "FalseNegatives"]
    }
    precision = accumulate(M.Precision(thresholds=thresholds), Y, P, w)
    recall = accumulate(M.Recall(thresholds=thresholds), Y, P, w)
    for i, t in enumerate(thresholds):
        tn, fp, fn, tp = sk.confusion_matrix(Y, t < P, sample_weight=w).ravel()
        np.testing.assert_allclose(
            [got[c][i] for c in got], [tp, fp, tn, fn], rtol=1e-6, err_msg=str(t)
        )
        assert precision[i] == pytest.approx(sk.precision_score(Y, t < P, sample_weight=w))
        assert recall[i] == pytest.approx(sk.recall_score(Y, t < P, sample_weight=w))
    # the default: one threshold, 0.5, and a scalar result
    assert accumulate(M.Precision(), Y, P, w).shape == ()
    assert float(accumulate(M.Precision(), Y, P, w)) == pytest.approx(precision[2])


def test_class_id_and_top_k_count_one_column_and_the_top_scores():
    for k in range(C):
        got = accumulate(M.Precision(class_id=k), LABELS, PROBS)  # class ids: one-hot rows
        assert got == pytest.approx(sk.precision_score(ONE_HOT[:, k], PROBS[:, k] > 0.5))
        top = PROBS.argmax(-1) == k
        got = accumulate(M.Recall(top_k=1, class_id=k), ONE_HOT, PROBS)
        assert got == pytest.approx(sk.recall_score(ONE_HOT[:, k], top))
    top2 = np.argsort(-PROBS, axis=-1)[:, :2]
    predicted = np.zeros_like(ONE_HOT)
    np.put_along_axis(predicted, top2, 1.0, axis=-1)
    got = accumulate(M.Precision(top_k=2), ONE_HOT, PROBS)
    assert got == pytest.approx(sk.precision_score(ONE_HOT.ravel(), predicted.ravel()))


@pytest.mark.parametrize("weighted", [False, True])
def test_f_scores_are_sklearns(weighted):
    w = W if weighted else None
    binary = accumulate(M.F1Score(threshold=0.5), Y, P, w)
    assert binary == pytest.approx([sk.f1_score(Y, P > 0.5, sample_weight=w)], abs=ATOL)
    argmax = PROBS.argmax(-1)  # threshold=None: the row's highest score is the prediction
    for average in [None, "micro", "macro", "weighted"]:
        for beta in [1.0, 2.0, 0.5]:
            got = accumulate(M.FBetaScore(average=average, beta=beta), LABELS, PROBS, w)
            want = sk.fbeta_score(LABELS, argmax, beta=beta, average=average, sample_weight=w)
            np.testing.assert_allclose(got, want, atol=ATOL, err_msg=f"{average} {beta}")
    got = accumulate(M.F1Score(average="macro", threshold=0.4), MULTI, MULTI_P, w)
    want = sk.f1_score(MULTI, MULTI_P > 0.4, average="macro", sample_weight=w)
    assert got == pytest.approx(want, abs=ATOL)


# ---- AUC and the "at" metrics ----------------------------------------------------------------


def test_roc_auc_is_sklearns_exactly_when_scores_fall_between_the_thresholds():
    """200 thresholds k/199: scores at the middles between them are told apart at every
    threshold, so the trapezoids are sklearn's exact area."""
    midpoints = ((np.minimum(np.floor(P * 199), 198) + 0.5) / 199).astype("float32")
    for w in (None, W):
        got = accumulate(M.AUC(), Y, midpoints, w)
        assert got == pytest.approx(sk.roc_auc_score(Y, midpoints, sample_weight=w), abs=ATOL)


def test_auc_approximates_sklearns_exact_areas_with_200_thresholds():
    assert accumulate(M.AUC(), Y, P) == pytest.approx(sk.roc_auc_score(Y, P), abs=5e-3)
    pr = accumulate(M.AUC(curve="PR"), Y, P)
    assert pr == pytest.approx(sk.average_precision_score(Y, P), abs=5e-3)
    logits = accumulate(M.AUC(from_logits=True), Y, LOGITS)
    assert logits == pytest.approx(sk.roc_auc_score(Y, LOGITS), abs=5e-3)
    by_label = accumulate(M.AUC(multi_label=True), MULTI, MULTI_P)
    assert by_label == pytest.approx(sk.roc_auc_score(MULTI, MULTI_P, average="macro"), abs=5e-3)
    flat = accumulate(M.AUC(), MULTI, MULTI_P)  # not multi-label: every value is a sample
    assert flat == pytest.approx(sk.roc_auc_score(MULTI.ravel(), MULTI_P.ravel()), abs=5e-3)


def _rates(y, p, thresholds, w=None):
    """tp, fp, tn, fn at each threshold, counted directly (a loop, the test's own)."""
    w = np.ones(len(y)) if w is None else w
    y, p = y.ravel().astype(bool), p.ravel()
    out = []
    for t in thresholds:
        pos = p > t
        out.append([w[pos & y].sum(), w[pos & ~y].sum(), w[~pos & ~y].sum(), w[~pos & y].sum()])
    tp, fp, tn, fn = np.array(out).T
    div = np.divide
    recall = div(tp, tp + fn, out=np.zeros_like(tp), where=tp + fn > 0)
    return {
        "recall": recall,
        "precision": div(tp, tp + fp, out=np.zeros_like(tp), where=tp + fp > 0),
        "specificity": div(tn, tn + fp, out=np.zeros_like(tp), where=tn + fp > 0),
    }


@pytest.mark.parametrize(
    "cls, value, constrained, best",
    [
        ("SensitivityAtSpecificity", 0.6, "specificity", "recall"),
        ("SpecificityAtSensitivity", 0.8, "recall", "specificity"),
        ("PrecisionAtRecall", 0.7, "recall", "precision"),
        ("RecallAtPrecision", 0.7, "precision", "recall"),
    ],
)
@pytest.mark.parametrize("weighted", [False, True])
def test_the_at_metrics_take_the_best_rate_where_the_other_reaches_the_value(
    cls, value, constrained, best, weighted
):
    w = W if weighted else None
    thresholds = [0.0] + [(i + 1) / 49 for i in range(48)] + [1.0]
    rates = _rates(Y, P, thresholds, w)
    want = np.where(rates[constrained] >= value, rates[best], 0).max()
    got = accumulate(getattr(M, cls)(value, num_thresholds=50), Y, P, w)
    assert got == pytest.approx(want, abs=ATOL)


# ---- IoU, R2 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
def test_iou_metrics_are_sklearns_jaccard(weighted):
    w = W if weighted else None
    argmax = PROBS.argmax(-1)
    per_class = sk.jaccard_score(LABELS, argmax, average=None, sample_weight=w)
    got = accumulate(M.MeanIoU(C, sparse_y_pred=False), LABELS, PROBS, w)
    assert got == pytest.approx(per_class.mean(), abs=ATOL)
    assert accumulate(M.MeanIoU(C), LABELS, argmax, w) == pytest.approx(got)
    assert accumulate(M.OneHotMeanIoU(C), ONE_HOT, PROBS, w) == pytest.approx(got)
    got = accumulate(M.IoU(C, [0, 2], sparse_y_pred=False), LABELS, PROBS, w)
    assert got == pytest.approx(per_class[[0, 2]].mean(), abs=ATOL)
    assert accumulate(M.OneHotIoU(C, [0, 2]), ONE_HOT, PROBS, w) == pytest.approx(got)
    kept = LABELS != 1  # ignore_class: those labels count for nothing
    ignored = sk.jaccard_score(
        LABELS[kept],
        argmax[kept],
        labels=range(C),
        average=None,
        sample_weight=None if w is None else w[kept],
    )
    got = accumulate(M.IoU(C, [0, 2], ignore_class=1, sparse_y_pred=False), LABELS, PROBS, w)
    assert got == pytest.approx(ignored[[0, 2]].mean(), abs=ATOL)
    binary = sk.jaccard_score(Y, P >= 0.5, average=None, sample_weight=w)
    assert accumulate(M.BinaryIoU(), Y, P, w) == pytest.approx(binary.mean(), abs=ATOL)
    got = accumulate(M.BinaryIoU(target_class_ids=[1], threshold=0.3), Y, P, w)
    assert got == pytest.approx(sk.jaccard_score(Y, P >= 0.3, sample_weight=w), abs=ATOL)


def test_iou_asks_for_sparse_y_pred_false_when_given_scores():
    with pytest.raises(ValueError, match="sparse_y_pred=False"):
        M.MeanIoU(C).update_state(LABELS, PROBS)


@pytest.mark.parametrize("weighted", [False, True])
def test_r2_score_is_sklearns(weighted):
    w = W if weighted else None
    for aggregation, multioutput in [
        ("uniform_average", "uniform_average"),
        ("variance_weighted_average", "variance_weighted"),
        (None, "raw_values"),
    ]:
        got = accumulate(M.R2Score(class_aggregation=aggregation), TARGETS, PREDS, w)
        want = sk.r2_score(TARGETS, PREDS, sample_weight=w, multioutput=multioutput)
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=aggregation)
    one = accumulate(M.R2Score(), TARGETS[:, 0], PREDS[:, 0], w)  # (N,): one column
    assert one == pytest.approx(sk.r2_score(TARGETS[:, 0], PREDS[:, 0], sample_weight=w))
    plain = sk.r2_score(TARGETS, PREDS, sample_weight=w)
    n, p = TARGETS.size, 5
    adjusted = accumulate(M.R2Score(num_regressors=p), TARGETS, PREDS, w)
    assert adjusted == pytest.approx(1 - (1 - plain) * (n - 1) / (n - p - 1))


# ---- the mean metrics: torch's and scikit-learn's numbers -----------------------------------


def _per_row(fn):
    return lambda t, p, w: np.average([fn(a, b) for a, b in zip(t, p)], weights=w)


def _concordance(t, p):
    return 2 * np.mean((t - t.mean()) * (p - p.mean())) / (t.var() + p.var() + (t - p).mean() ** 2)


def _torch(fn):
    """``fn(y_pred, y_true)`` per sample (torch tensors) -> its weighted mean."""
    return lambda t, p, w: np.average(fn(torch.as_tensor(p), torch.as_tensor(t)).numpy(), weights=w)


MEAN_ORACLES = {
    "Accuracy": ("label_ids", lambda t, p, w: sk.accuracy_score(t, p, sample_weight=w)),
    "CategoricalAccuracy": (
        "one_hot",
        lambda t, p, w: sk.accuracy_score(t.argmax(-1), p.argmax(-1), sample_weight=w),
    ),
    "SparseCategoricalAccuracy": (
        "labels",
        lambda t, p, w: sk.accuracy_score(t, p.argmax(-1), sample_weight=w),
    ),
    "TopKCategoricalAccuracy": (
        "one_hot",
        lambda t, p, w: sk.top_k_accuracy_score(t.argmax(-1), p, k=2, sample_weight=w),
    ),
    "SparseTopKCategoricalAccuracy": (
        "labels",
        lambda t, p, w: sk.top_k_accuracy_score(t, p, k=2, sample_weight=w),
    ),
    "MeanSquaredError": (
        "regression",
        lambda t, p, w: sk.mean_squared_error(t, p, sample_weight=w),
    ),
    "RootMeanSquaredError": (
        "regression",
        lambda t, p, w: np.sqrt(sk.mean_squared_error(t, p, sample_weight=w)),
    ),
    "MeanAbsoluteError": (
        "regression",
        lambda t, p, w: sk.mean_absolute_error(t, p, sample_weight=w),
    ),
    "MeanAbsolutePercentageError": (
        "regression",
        lambda t, p, w: 100 * sk.mean_absolute_percentage_error(t, p, sample_weight=w),
    ),
    "MeanSquaredLogarithmicError": (
        "regression",
        lambda t, p, w: sk.mean_squared_log_error(t, p, sample_weight=w),
    ),
    "LogCoshError": ("regression", _per_row(lambda t, p: np.mean(np.log(np.cosh(p - t))))),
    "CosineSimilarity": ("regression", _torch(lambda p, t: F.cosine_similarity(p, t, dim=-1))),
    "PearsonCorrelation": ("regression", _per_row(lambda t, p: np.corrcoef(t, p)[0, 1])),
    "ConcordanceCorrelation": ("regression", _per_row(_concordance)),
    "Hinge": ("hinge", _per_row(lambda t, p: np.mean(np.maximum(1 - (2 * t - 1) * p, 0)))),
    "SquaredHinge": (
        "hinge",
        _per_row(lambda t, p: np.mean(np.maximum(1 - (2 * t - 1) * p, 0) ** 2)),
    ),
    "CategoricalHinge": (
        "one_hot_logits",
        _per_row(lambda t, p: max(0, 1 + np.max((1 - t) * p) - np.sum(t * p))),  # Keras's
    ),
    "KLDivergence": ("one_hot", _per_row(lambda t, p: -np.log(np.clip(p[t == 1][0], 1e-7, 1)))),
    "Poisson": (
        "regression",
        _torch(
            lambda p, t: F.poisson_nll_loss(p, t, log_input=False, eps=1e-7, reduction="none").mean(
                -1
            )
        ),
    ),
    "BinaryCrossentropy": ("binary", lambda t, p, w: sk.log_loss(t, p, sample_weight=w)),
    "CategoricalCrossentropy": (
        "one_hot",
        lambda t, p, w: sk.log_loss(t.argmax(-1), p, sample_weight=w),
    ),
    "SparseCategoricalCrossentropy": ("labels", lambda t, p, w: sk.log_loss(t, p, sample_weight=w)),
}


@pytest.mark.parametrize("cls", MEAN_ORACLES)
@pytest.mark.parametrize("weighted", [False, True])
def test_mean_metrics_are_sklearns_and_torchs(cls, weighted):
    data, oracle = MEAN_ORACLES[cls]
    y_true, y_pred = DATA[data]
    w = W if weighted else None
    metric = getattr(M, cls)(**({"k": 2} if "TopK" in cls else {}))
    got = accumulate(metric, y_true, y_pred, w)
    assert got == pytest.approx(oracle(y_true, y_pred, w), rel=1e-5, abs=ATOL)


def test_crossentropy_metrics_from_logits_ignore_class_and_axis():
    t = torch.as_tensor
    got = accumulate(M.SparseCategoricalCrossentropy(from_logits=True), LABELS, CLASS_LOGITS)
    assert got == pytest.approx(float(F.cross_entropy(t(CLASS_LOGITS), t(LABELS))), rel=1e-6)
    kept = LABELS != 2
    got = accumulate(
        M.SparseCategoricalCrossentropy(from_logits=True, ignore_class=2), LABELS, CLASS_LOGITS
    )
    want = F.cross_entropy(t(CLASS_LOGITS), t(LABELS), ignore_index=2)
    assert got == pytest.approx(float(want), rel=1e-6)
    # the loops mark arrays without -100 as unpadded: the metric's own ignored labels still count
    metric = M.SparseCategoricalCrossentropy(from_logits=True, ignore_class=2)
    metric.padded_labels = False
    assert accumulate(metric, LABELS, CLASS_LOGITS) == pytest.approx(float(want), rel=1e-6)
    weighted = accumulate(
        M.SparseCategoricalCrossentropy(from_logits=True, ignore_class=2), LABELS, CLASS_LOGITS, W
    )
    per_sample = F.cross_entropy(t(CLASS_LOGITS), t(LABELS), reduction="none").numpy()
    assert weighted == pytest.approx(np.average(per_sample[kept], weights=W[kept]), rel=1e-6)
    got = accumulate(M.BinaryCrossentropy(from_logits=True), Y, LOGITS)
    assert got == pytest.approx(float(F.binary_cross_entropy_with_logits(t(LOGITS), t(Y))))
    moved = accumulate(M.CategoricalCrossentropy(axis=1), ONE_HOT[:, :, None], PROBS[:, :, None])
    assert moved == pytest.approx(sk.log_loss(LABELS, PROBS), rel=1e-5)


def test_sum_and_mean_metric_wrapper():
    total = M.Sum()
    total.update_state(torch.tensor([1.0, 2.0]))
    total.update_state(torch.tensor([3.0]), sample_weight=torch.tensor([2.0]))
    assert float(total.result()) == 9.0

    def within(y_true, y_pred, tolerance):  # Keras's order
        return (y_true - y_pred).abs() < tolerance

    metric = M.MeanMetricWrapper(within, tolerance=0.5, direction="max")
    assert accumulate(metric, TARGETS, PREDS) == pytest.approx(
        np.mean(np.abs(TARGETS - PREDS) < 0.5)
    )
    assert metric.name == "within" and metric.direction == "max"


# ---- Keras's own numbers ---------------------------------------------------------------------

# (class, arguments, data); Keras's IoU metrics count in float32 here: by default they keep an
# integer matrix, which truncates weights (Keras warns); the counts of weight 1 are the same.
KERAS_CASES = [
    ("Precision", {}, "binary"),
    ("Precision", {"thresholds": [0.3, 0.5, 0.7]}, "binary"),
    ("Precision", {"top_k": 2}, "one_hot"),
    ("Precision", {"class_id": 1, "thresholds": [0.2, 0.4]}, "one_hot"),
    ("Recall", {}, "binary_1d"),
    ("Recall", {"top_k": 1, "class_id": 2}, "one_hot"),
    ("TruePositives", {}, "binary"),
    ("FalsePositives", {"thresholds": [0.1, 0.9]}, "binary"),
    ("TrueNegatives", {"thresholds": [0.0, 0.5, 1.0]}, "binary"),
    ("FalseNegatives", {}, "multi_label"),
    ("AUC", {}, "binary"),
    ("AUC", {"curve": "PR"}, "binary"),
    ("AUC", {"curve": "PRGAIN"}, "binary"),
    ("AUC", {"summation_method": "minoring"}, "binary"),
    ("AUC", {"summation_method": "majoring", "curve": "PR"}, "binary"),
    ("AUC", {"num_thresholds": 13}, "binary"),
    ("AUC", {"thresholds": [0.6, 0.2, 0.5]}, "binary"),
    ("AUC", {"from_logits": True}, "binary_logits"),
    ("AUC", {"multi_label": True}, "multi_label"),
    ("AUC", {"multi_label": True, "curve": "PR", "num_labels": 4}, "multi_label"),
    ("AUC", {"multi_label": True, "label_weights": [1, 2, 0.5, 1]}, "multi_label"),
    ("AUC", {"label_weights": [1, 2, 0.5, 1]}, "multi_label"),
    ("SensitivityAtSpecificity", {"specificity": 0.5}, "binary"),
    ("SpecificityAtSensitivity", {"sensitivity": 0.5, "num_thresholds": 1}, "binary"),
    ("PrecisionAtRecall", {"recall": 0.8}, "binary"),
    ("PrecisionAtRecall", {"recall": 0.6, "num_thresholds": 50, "class_id": 0}, "one_hot"),
    ("RecallAtPrecision", {"precision": 0.7}, "binary"),
    ("F1Score", {}, "binary"),
    ("F1Score", {"threshold": 0.5}, "binary"),
    ("F1Score", {"average": "macro"}, "one_hot"),
    ("F1Score", {"average": "micro"}, "one_hot"),
    ("FBetaScore", {"beta": 2.0}, "one_hot"),
    ("FBetaScore", {"average": "weighted", "threshold": 0.3}, "one_hot"),
    ("IoU", {"num_classes": 4, "target_class_ids": [0, 2], "sparse_y_pred": False}, "labels"),
    ("IoU", {"num_classes": 4, "target_class_ids": [1], "ignore_class": 0}, "label_ids"),
    ("MeanIoU", {"num_classes": 4, "sparse_y_pred": False}, "labels"),
    ("OneHotIoU", {"num_classes": 4, "target_class_ids": [1, 3]}, "one_hot"),
    ("OneHotMeanIoU", {"num_classes": 4}, "one_hot"),
    ("BinaryIoU", {}, "binary"),
    ("BinaryIoU", {"target_class_ids": [1], "threshold": 0.3}, "binary"),
    ("R2Score", {}, "regression"),
    ("R2Score", {"class_aggregation": "variance_weighted_average"}, "regression"),
    ("R2Score", {"class_aggregation": None}, "regression"),
    ("R2Score", {"num_regressors": 3}, "regression"),
    ("Accuracy", {}, "label_ids"),
    ("BinaryAccuracy", {"threshold": 0.3}, "binary"),
    ("CategoricalAccuracy", {}, "one_hot"),
    ("SparseCategoricalAccuracy", {}, "labels"),
    ("TopKCategoricalAccuracy", {"k": 2}, "one_hot"),
    ("SparseTopKCategoricalAccuracy", {"k": 2}, "labels"),
    ("SparseTopKCategoricalAccuracy", {"k": 2, "from_sorted_ids": True}, "sorted_ids"),
    ("MeanSquaredError", {}, "regression"),
    ("RootMeanSquaredError", {}, "regression"),
    ("MeanAbsoluteError", {}, "regression"),
    ("MeanAbsolutePercentageError", {}, "regression"),
    ("MeanSquaredLogarithmicError", {}, "regression"),
    ("LogCoshError", {}, "regression"),
    ("CosineSimilarity", {}, "regression"),
    ("PearsonCorrelation", {}, "regression"),
    ("ConcordanceCorrelation", {}, "regression"),
    ("Hinge", {}, "hinge"),
    ("SquaredHinge", {}, "hinge"),
    ("CategoricalHinge", {}, "one_hot_logits"),
    ("KLDivergence", {}, "one_hot"),
    ("Poisson", {}, "regression"),
    ("BinaryCrossentropy", {}, "binary"),
    ("BinaryCrossentropy", {"from_logits": True, "label_smoothing": 0.1}, "binary_logits"),
    ("CategoricalCrossentropy", {}, "one_hot"),
    ("CategoricalCrossentropy", {"from_logits": True, "label_smoothing": 0.2}, "one_hot_logits"),
    ("SparseCategoricalCrossentropy", {}, "labels"),
    ("SparseCategoricalCrossentropy", {"from_logits": True}, "labels_logits"),
]


@pytest.mark.parametrize(
    "cls, kwargs, data",
    KERAS_CASES,
    ids=[f"{c}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for c, kw, _ in KERAS_CASES],
)
@pytest.mark.parametrize("weighted", [False, True], ids=["", "weighted"])
def test_every_metric_gives_kerass_number(keras, cls, kwargs, data, weighted):
    y_true, y_pred = DATA[data]
    w = W if weighted else None
    extra = {"dtype": "float32"} if "IoU" in cls else {}
    want = accumulate(getattr(keras.metrics, cls)(**kwargs, **extra), y_true, y_pred, w)
    got = accumulate(getattr(M, cls)(**kwargs), y_true, y_pred, w)
    rtol = 1e-5 if cls == "R2Score" else 1e-6  # Keras's float32 sums
    np.testing.assert_allclose(got, want, rtol=rtol, atol=ATOL)


def test_keras_reads_ignore_class_into_its_weighted_mean_only(keras):
    """Keras's unweighted SparseCategoricalCrossentropy(ignore_class=...) counts the ignored
    labels as 0s in its mean; weighted, it leaves them out. Here they are left out in both."""
    kwargs = {"from_logits": True, "ignore_class": 1}
    keras_cls = keras.metrics.SparseCategoricalCrossentropy
    weighted = accumulate(keras_cls(**kwargs), LABELS, CLASS_LOGITS, W)
    ours = accumulate(M.SparseCategoricalCrossentropy(**kwargs), LABELS, CLASS_LOGITS, W)
    assert ours == pytest.approx(weighted, abs=ATOL)


# ---- names, classes, directions ---------------------------------------------------------------

# Keras's names of metrics of values (update_state(values)), not of (y_true, y_pred).
NOT_METRICS_OF_OUTPUTS = {"mean", "sum", "metric", "mean_metric_wrapper"}


def test_every_keras_metric_class_is_here(keras):
    names = [n for n in dir(keras.metrics) if n[0].isupper()]
    missing = [n for n in names if not hasattr(M, n)]
    assert not missing


def test_every_name_keras_builds_is_known_with_kerass_direction(keras):
    from keras.src.metrics import ALL_OBJECTS_DICT

    built = set()
    for name in sorted(n for n in ALL_OBJECTS_DICT if n.islower()):
        if name in NOT_METRICS_OF_OUTPUTS:
            continue
        try:
            theirs = keras.metrics.get(name)
        except TypeError:  # a class with a required argument (num_classes, recall...)
            with pytest.raises(ValueError, match=r"needs .*torcheras\.metrics\.\w+\(\w+=\.\.\."):
                M.get(name)
            continue
        ours = M.get(name)
        assert ours.name == name
        direction = {"up": "max", "down": "min"}.get(getattr(theirs, "_direction", None))
        if direction is not None:
            assert ours.direction == direction, name
        built.add(name)
    asked = {"precision", "recall", "auc", "true_positives", "false_positives", "true_negatives"}
    assert asked | {"false_negatives", "f1_score", "f_beta_score", "r2_score"} <= built


@pytest.mark.parametrize(
    "typo, name",
    [
        ("precison", "precision"),
        ("recal", "recall"),
        ("true_positive", "true_positives"),
        ("acu", "auc"),
    ],
)
def test_an_unknown_name_suggests_the_closest(typo, name):
    with pytest.raises(ValueError, match=rf"Unknown metric '{typo}'\. Did you mean '{name}'\?"):
        M.get(typo)


def test_directions_for_mode_auto():
    for name in ["precision", "recall", "auc", "f1_score", "r2_score", "true_positives"]:
        assert M.get(name).direction == "max"
        assert M.direction_of(f"val_{name}") == "max"
    assert M.get("false_negatives").direction == "min"
    assert M.MeanIoU(3).direction == "max" and M.Poisson().direction == "min"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: M.Precision(thresholds=[0.5, 1.5]), r"`thresholds` must be in \[0, 1\]"),
        (lambda: M.AUC(curve="XY"), "`curve` must be"),
        (lambda: M.AUC(num_thresholds=1), "`num_thresholds` must be > 1"),
        (lambda: M.AUC(num_labels=3), "only when `multi_label`"),
        (lambda: M.FBetaScore(average="samples"), "`average` must be"),
        (lambda: M.F1Score(threshold=0.0), r"`threshold` must be in \(0, 1\]"),
        (lambda: M.PrecisionAtRecall(recall=2), r"`recall` must be in \[0, 1\]"),
        (lambda: M.IoU(3, [3]), "target_class_ids"),
        (lambda: M.R2Score(class_aggregation="mean"), "class_aggregation"),
    ],
)
def test_bad_arguments_fail_at_construction_naming_them(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ---- state: device-side, resumable, summed over ranks -----------------------------------------

STATEFUL = [
    lambda: M.Precision(thresholds=[0.3, 0.6]),
    lambda: M.AUC(),
    lambda: M.AUC(multi_label=True),
    lambda: M.F1Score(average="macro"),
    lambda: M.MeanIoU(2),
    lambda: M.BinaryIoU(),
    lambda: M.R2Score(),
    lambda: M.RecallAtPrecision(0.5),
]


@pytest.mark.parametrize("make", STATEFUL)
def test_updates_read_nothing_from_the_device(make, monkeypatch):
    """No ``.item()``, ``float()``, ``bool()`` or ``.tolist()`` of a tensor per batch (each a
    synchronisation on a GPU): the counts stay where the outputs are until read."""
    metric = make()
    y, p = torch.as_tensor(Y), torch.as_tensor(P)
    metric.update(p, y)  # the first batch may cache the thresholds on the device

    def refuse(*args, **kwargs):
        raise AssertionError("a read from the device during an update")

    for method in ("item", "tolist", "__float__", "__bool__", "__int__", "numpy"):
        monkeypatch.setattr(torch.Tensor, method, refuse)
    metric.update(p, y, torch.as_tensor(W))
    metric.update(p, y)
    monkeypatch.undo()
    assert np.isfinite(np.asarray(metric.result(), dtype="float64")).all()


@pytest.mark.parametrize("make", STATEFUL)
def test_state_dict_resumes_exactly_and_reset_clears(make):
    y, p, w = torch.as_tensor(Y), torch.as_tensor(P), torch.as_tensor(W)
    whole = make()
    for part in torch.arange(N).chunk(3):
        whole.update(p[part], y[part], w[part])
    first, second = make(), make()
    for part in torch.arange(N).chunk(3)[:2]:
        first.update(p[part], y[part], w[part])
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    last = torch.arange(N).chunk(3)[2]
    second.update(p[last], y[last], w[last])
    torch.testing.assert_close(torch.as_tensor(second.result()), torch.as_tensor(whole.result()))
    whole.reset()
    fresh = make()
    fresh.update(p[last], y[last], w[last])
    whole.update(p[last], y[last], w[last])
    torch.testing.assert_close(torch.as_tensor(whole.result()), torch.as_tensor(fresh.result()))


def test_a_snapshot_keeps_the_state_it_saw_and_ranks_sum_every_count():
    y, p = torch.as_tensor(Y), torch.as_tensor(P)
    metric = M.AUC()
    metric.update(p[:100], y[:100])
    before = metric.snapshot()
    first = float(metric.result())
    metric.update(p[100:], y[100:])
    assert float(before()) == first != float(metric.result())
    # two "ranks" that saw the same data: every count doubles, the area is the same
    counts, area = metric.state_dict()["counts"], float(metric.result())
    metric.all_reduce(lambda values: [v * 2 for v in values])
    assert torch.equal(metric.state_dict()["counts"], 2 * counts)
    assert float(metric.result()) == pytest.approx(area)


def test_half_precision_outputs_are_counted_in_float32():
    half = torch.as_tensor(P).bfloat16()
    a, b = M.AUC(), M.AUC()
    a.update(half, torch.as_tensor(Y))
    b.update(half.float(), torch.as_tensor(Y))
    assert float(a.result()) == float(b.result())


# ---- in compile / fit / evaluate -----------------------------------------------------------------


def _binary_model(seed=0):
    torch.manual_seed(seed)
    return torcheras.Model(
        torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    )


def _binary_data():
    gen = np.random.default_rng(1)
    x = gen.normal(size=(256, 5)).astype("float32")
    y = (x[:, 0] + 0.5 * x[:, 1] + gen.normal(0, 0.7, 256) > 0).astype("float32")
    return x, y


def _expected(y, logits):
    """precision, recall (threshold 0.5 on the sigmoid) and AUC, computed independently."""
    prob = 1 / (1 + np.exp(-logits.ravel().astype("float64")))
    return {
        "precision": sk.precision_score(y, prob > 0.5),
        "recall": sk.recall_score(y, prob > 0.5),
        "auc": sk.roc_auc_score(y, prob),
    }


@pytest.mark.parametrize("loss", ["binary_crossentropy", torch.nn.BCEWithLogitsLoss()])
def test_fit_logs_kerass_names_and_sklearns_values_on_logits(loss):
    """The loss takes logits: the names read their sigmoid, as "accuracy" thresholds at 0."""
    x, y = _binary_data()
    model = _binary_model()
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)  # the epoch's outputs are predict's
    model.compile(frozen, loss, metrics=["precision", "recall", "auc"], device="cpu")
    history = model.fit(
        x, y, batch_size=64, epochs=1, validation_data=(x[:100], y[:100]), verbose=0
    )
    names = ["loss", "precision", "recall", "auc"]
    assert set(history.history) == {*names, *(f"val_{n}" for n in names), "learning_rate"}
    want = _expected(y, model.predict(x, verbose=0))
    val = _expected(y[:100], model.predict(x[:100], verbose=0))
    for key in ("precision", "recall"):
        assert history.history[key][0] == pytest.approx(want[key], abs=ATOL)
        assert history.history[f"val_{key}"][0] == pytest.approx(val[key], abs=ATOL)
    assert history.history["auc"][0] == pytest.approx(want["auc"], abs=5e-3)
    assert history.history["val_auc"][0] == pytest.approx(val["auc"], abs=5e-3)


def test_evaluate_after_training_gives_sklearns_values():
    x, y = _binary_data()
    model = _binary_model()
    model.compile(
        "adam",
        "binary_crossentropy",
        metrics=["precision", "recall", "auc", "f1_score"],
        device="cpu",
    )
    model.fit(x, y, batch_size=32, epochs=3, verbose=0)
    result = model.evaluate(x, y, batch_size=50, verbose=0, return_dict=True)
    logits = model.predict(x, verbose=0)
    want = _expected(y, logits)
    assert result["precision"] == pytest.approx(want["precision"], abs=ATOL)
    assert result["recall"] == pytest.approx(want["recall"], abs=ATOL)
    assert result["auc"] == pytest.approx(want["auc"], abs=5e-3)
    # Keras's F1Score(threshold=None) on one column: every sample is "the top", positive
    assert result["f1_score"] == pytest.approx(sk.f1_score(y, np.ones_like(y)), abs=ATOL)
    assert model.evaluate(x, y, verbose=0) == pytest.approx(
        [result[k] for k in ["loss", "precision", "recall", "auc", "f1_score"]]
    )


def test_probabilities_are_thresholded_as_they_are_and_multi_class_logits_by_softmax():
    x, y = _binary_data()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 1), torch.nn.Sigmoid())
    model = torcheras.Model(net)
    model.compile(
        "sgd", losses.BinaryCrossentropy(from_logits=False), metrics=["precision"], device="cpu"
    )
    result = model.evaluate(x, y, verbose=0, return_dict=True)
    prob = model.predict(x, verbose=0).ravel()
    assert result["precision"] == pytest.approx(sk.precision_score(y, prob > 0.5), abs=ATOL)

    labels = (x[:, 0] > 0).astype("int64") + (x[:, 1] > 1).astype("int64")
    torch.manual_seed(0)
    model = torcheras.Model(torch.nn.Linear(5, 3))
    model.compile("sgd", "cross_entropy", metrics=["precision", "f1_score", "auc"], device="cpu")
    history = model.fit(x, labels, epochs=1, batch_size=256, shuffle=False, verbose=0)
    result = model.evaluate(x, labels, verbose=0, return_dict=True)
    probs = torch.as_tensor(model.predict(x, verbose=0)).softmax(-1).numpy()
    one_hot = np.eye(3)[labels]
    assert result["precision"] == pytest.approx(
        sk.precision_score(one_hot.ravel(), probs.ravel() > 0.5), abs=ATOL
    )
    per_class = sk.f1_score(labels, probs.argmax(-1), average=None, labels=[0, 1, 2])
    assert result["f1_score"] == pytest.approx(list(per_class), abs=ATOL)  # a list: one per class
    assert len(history.history["f1_score"][0]) == 3


def test_early_stopping_mode_auto_maximises_auc():
    from torcheras.callbacks import EarlyStopping

    x, y = _binary_data()
    model = _binary_model()
    model.compile("adam", "binary_crossentropy", metrics=["auc"], device="cpu")
    stop = EarlyStopping(monitor="val_auc", patience=5)
    history = model.fit(x, y, epochs=4, validation_split=0.25, verbose=0, callbacks=[stop])
    assert model.metric_direction("val_auc") == "max"
    assert stop.best == max(history.history["val_auc"])


@pytest.mark.parametrize(
    ("class_name", "logged"),
    [("F1Score", "f1_score"), ("BinaryAccuracy", "binary_accuracy"), ("AUC", "auc")],
)
def test_keras_class_names_work_as_metric_names(class_name, logged):
    """Keras's compile takes class names ("F1Score") as it takes snake-case names."""
    metric = M.get(class_name)
    assert metric.name == logged
    assert type(metric).__name__ in (class_name, "MeanMetric")


def test_the_mean_errors_summed_in_one_expression_are_torchs():
    """From a metric's third batch of float32 outputs and targets of one shape, the absolute
    and squared errors are summed in one expression (``MeanMetric._elementwise``): "mae",
    "mse", MeanAbsoluteError, MeanSquaredError and RootMeanSquaredError give torch's own
    ``l1_loss`` / ``mse_loss`` over every batch, bit for bit what the general path gives;
    targets of another dtype (float64), another shape ((N,) for (N, 1) outputs) or that
    require grad take the general path; a snapshot keeps its value while float32 batches
    follow it; outputs that require grad keep no graph."""

    def built():
        model = torcheras.Model(torch.nn.Linear(4, 3))
        model.compile(
            "sgd",
            "mse",
            metrics=[
                "mae",
                "mse",
                M.MeanAbsoluteError("mae2"),
                M.MeanSquaredError("mse2"),
                M.RootMeanSquaredError("rmse"),
            ],
            device="cpu",
        )
        return model.compiled_metrics

    fast, general = built(), built()
    assert all(m._elementwise is m.fn for m in fast)
    general_paths = []  # per batch: how many of the fast side's metrics took _add
    for metric in fast:
        real_add = metric._add

        def counted(*args, real_add=real_add):
            general_paths[-1] += 1
            return real_add(*args)

        metric._add = counted
    for metric in general:
        metric._elementwise = None
    gen = torch.Generator().manual_seed(0)
    y_pred = torch.randn(86, 3, generator=gen).requires_grad_()
    y_true = torch.randn(86, 3, generator=gen)
    snapshots = {}
    for i, part in enumerate(torch.arange(86).split(16)):  # 16 x 5, 6
        target = y_true[part]
        if i == 5:
            target = target.double()  # float64: the general path
        elif i == 4:
            target = target.clone().requires_grad_()  # the general path: no graph kept
        general_paths.append(0)
        for side, compiled in (("fast", fast), ("general", general)):
            for metric in compiled:
                metric.update(y_pred[part], target)
            if i == 2:
                snapshots[side] = [m.snapshot() for m in compiled]
    # one column, targets of shape (N,): the general path, the same numbers
    column, column_true = torch.randn(9, 1, generator=gen), torch.randn(9, generator=gen)
    general_paths.append(0)
    for compiled in (fast, general):
        for metric in compiled:
            metric.update(column, column_true)
    # the general path: the first two batches (they make the running total), the one after
    # the snapshot (it holds the total: a new one is made, not added to in place), the
    # target that requires grad, the float64 one and the (N,) targets
    assert general_paths == [5, 5, 0, 5, 5, 5, 5]
    errors = torch.cat([(y_pred.detach() - y_true).flatten(), (column[:, 0] - column_true)])
    mae, mse = float(errors.abs().mean()), float(errors.square().mean())
    wanted = [mae, mse, mae, mse, mse**0.5]
    got = [float(m.result()) for m in fast]
    assert got == pytest.approx(wanted, rel=1e-6)
    assert got == [float(m.result()) for m in general]  # bit for bit
    assert not any(m.result().requires_grad for m in fast)
    first = (y_pred.detach()[:48] - y_true[:48]).flatten()
    held = [float(first.abs().mean()), float(first.square().mean())]
    held = [held[0], held[1], held[0], held[1], held[1] ** 0.5]
    assert [float(s()) for s in snapshots["fast"]] == pytest.approx(held, rel=1e-6)
    assert [float(s()) for s in snapshots["fast"]] == [float(s()) for s in snapshots["general"]]


def test_fit_logs_torchs_mean_errors_for_a_regression():
    """What a user reads: with the weights fixed (learning rate 0), the epoch's logged
    ``mae`` and ``mse`` (and the loss) are torch's ``l1_loss`` / ``mse_loss`` of the model's
    outputs over all the samples, training and validation, in batches whose last is short."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    model = torcheras.Model(net)
    model.compile(torch.optim.SGD(net.parameters(), lr=0.0), "mse", metrics=["mae", "mse"],
                  device="cpu")  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(150, 4, generator=gen), torch.randn(150, 3, generator=gen)
    xv, yv = torch.randn(70, 4, generator=gen), torch.randn(70, 3, generator=gen)
    history = model.fit(x, y, batch_size=32, epochs=2, validation_data=(xv, yv), verbose=0)
    with torch.no_grad():
        out, out_v = net(x), net(xv)
    for prefix, (o, t) in (("", (out, y)), ("val_", (out_v, yv))):
        for name, fn in (("mae", F.l1_loss), ("mse", F.mse_loss), ("loss", F.mse_loss)):
            assert history.history[prefix + name] == pytest.approx([float(fn(o, t))] * 2, rel=1e-6)
