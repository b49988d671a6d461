"""Losses and metrics give the numbers torch and Keras give (issue: every number right).

Each built-in is checked against torch's own function where torch has one, and against the
values Keras documents for the name; torch loss modules are computed as torch computes them,
options included. Tolerances state float32 reality.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_model
from torch import nn

import torcheras
from torcheras import losses, metrics

RTOL = 1e-5  # float32 arithmetic in another order than torch's


def _loss(loss, y_pred, y_true, sample_weight=None):
    compiled = losses.get(loss)
    weights = None if sample_weight is None else torch.as_tensor(sample_weight)
    return float(compiled(torch.as_tensor(y_pred), torch.as_tensor(y_true), weights))


# ---- torch loss modules: exactly torch's numbers -------------------------------------------


@pytest.fixture
def logits_and_labels():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(12, 4, generator=gen), torch.randint(0, 4, (12,), generator=gen)


@pytest.mark.parametrize(
    "module",
    [
        nn.CrossEntropyLoss(),
        nn.CrossEntropyLoss(weight=torch.tensor([0.2, 1.0, 3.0, 0.5])),
        nn.CrossEntropyLoss(ignore_index=2),
        nn.CrossEntropyLoss(weight=torch.tensor([0.2, 1.0, 3.0, 0.5]), ignore_index=1),
        nn.CrossEntropyLoss(label_smoothing=0.1, weight=torch.tensor([0.2, 1.0, 3.0, 0.5])),
        nn.CrossEntropyLoss(reduction="sum"),
        nn.NLLLoss(weight=torch.tensor([1.0, 2.0, 0.5, 1.0])),
    ],
    ids=["plain", "weight", "ignore_index", "weight+ignore", "smoothing+weight", "sum", "nll"],
)
def test_a_torch_loss_module_gives_torchs_value_in_fit_and_evaluate(module, logits_and_labels):
    logits, labels = logits_and_labels
    expected = float(module(logits, labels))
    assert _loss(module, logits, labels) == pytest.approx(expected, rel=RTOL)

    class Fixed(torcheras.Model):  # a "model" that outputs the fixed logits
        def forward(self, index):
            return logits[index]

    model = Fixed()
    model.compile(optimizer=None, loss=module, device="cpu")
    index = torch.arange(12)
    assert model.evaluate(index, labels, batch_size=12, verbose=0) == pytest.approx(
        expected, rel=RTOL
    )


def test_issue_figures_weighted_and_ignored_cross_entropy():
    """The two numbers the issue reproduced: torch gives 1.166 and 1.348."""
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(64, 5, generator=gen), torch.randint(0, 5, (64,), generator=gen)
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([0.1, 1.0, 5.0, 1.0, 1.0]))
    ignoring = nn.CrossEntropyLoss(ignore_index=0)
    for module in (weighted, ignoring):
        assert _loss(module, logits, labels) == pytest.approx(
            float(module(logits, labels)), rel=RTOL
        )


@pytest.mark.parametrize("name", ["cross_entropy", "sparse_categorical_crossentropy"])
@pytest.mark.parametrize("shape", ["classes", "sequence"], ids=["(N,C)", "(N,C,T)"])
def test_padding_labels_count_for_nothing_as_in_torch(name, shape):
    """Labels of -100 (torch's ignore_index): the loss is F.cross_entropy's mean over the
    labels kept, weighted or not; weights of 1 change nothing."""
    gen = torch.Generator().manual_seed(5)
    if shape == "classes":
        logits, labels = (
            torch.randn(16, 4, generator=gen),
            torch.randint(0, 4, (16,), generator=gen),
        )
        labels[[1, 5, 6]] = -100
    else:  # 8 sequences of 6 tokens, the last ones padded
        logits, labels = (
            torch.randn(8, 4, 6, generator=gen),
            torch.randint(0, 4, (8, 6), generator=gen),
        )
        labels[:, 4:] = -100
        labels[0, 1:] = -100
    y_pred = logits if name == "cross_entropy" or shape == "classes" else logits.movedim(1, -1)
    expected = F.cross_entropy(logits, labels)
    assert _loss(name, y_pred, labels) == pytest.approx(float(expected), rel=RTOL)
    assert _loss(name, y_pred, labels, torch.ones(labels.shape[0])) == pytest.approx(
        float(expected), rel=RTOL
    )
    weights = torch.linspace(0.5, 2.0, labels.shape[0])
    per_label = F.cross_entropy(logits, labels, reduction="none")
    weighted = (per_label * weights.reshape(-1, *[1] * (per_label.dim() - 1))).sum()
    assert _loss(name, y_pred, labels, weights) == pytest.approx(
        float(weighted / (labels != -100).sum()), rel=RTOL
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sample_weights_multiply_each_term_and_keep_torchs_divisor(reduction, logits_and_labels):
    """Keras's combination: weights scale each sample's loss; the divisor is torch's own."""
    logits, labels = logits_and_labels
    class_weight = torch.tensor([0.2, 1.0, 3.0, 0.5])
    module = nn.CrossEntropyLoss(weight=class_weight, ignore_index=3, reduction=reduction)
    sample_weight = torch.linspace(0.1, 2.0, 12)
    per_sample = F.cross_entropy(
        logits, labels, weight=class_weight, ignore_index=3, reduction="none"
    )
    numerator = (per_sample * sample_weight).sum()
    valid = labels != 3
    divisor = class_weight[labels.clamp_max(2)][valid].sum() if reduction == "mean" else 1.0
    assert _loss(module, logits, labels, sample_weight) == pytest.approx(
        float(numerator / divisor), rel=RTOL
    )
    ones = torch.ones(12)  # weights of 1 change nothing
    assert _loss(module, logits, labels, ones) == pytest.approx(
        float(module(logits, labels)), rel=RTOL
    )


@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_batchmean_takes_sample_weights_per_sample(log_target):
    """A sample's KL divergence is the sum of its pointwise terms; batchmean divides the
    weighted sum by the batch size, as it divides the plain sum."""
    gen = torch.Generator().manual_seed(5)
    log_probs = torch.randn(6, 2, 5, generator=gen).log_softmax(-1)  # (N, T, C)
    target = torch.randn(6, 2, 5, generator=gen).softmax(-1)
    target = target.log() if log_target else target
    module = nn.KLDivLoss(reduction="batchmean", log_target=log_target)
    pointwise = F.kl_div(log_probs, target, reduction="none", log_target=log_target)
    per_sample = pointwise.sum(dim=(1, 2))  # (N,)
    weights = torch.tensor([0.0, 0.5, 1.0, 2.0, 1.0, 3.0])
    expected = (weights * per_sample).sum() / 6
    assert _loss(module, log_probs, target, weights) == pytest.approx(float(expected), rel=RTOL)
    assert _loss(module, log_probs, target, torch.ones(6)) == pytest.approx(
        float(F.kl_div(log_probs, target, reduction="batchmean", log_target=log_target)), rel=RTOL
    )
    steps = torch.tensor([[1.0, 0.0]] * 6)  # (N, T): the first step of each sample only
    assert _loss(module, log_probs, target, steps) == pytest.approx(
        float(pointwise[:, 0].sum() / 6), rel=RTOL
    )


def test_kl_div_batchmean_with_sample_weight_in_fit():
    torch.manual_seed(0)
    x = torch.randn(32, 4)
    target = torch.randn(32, 3).softmax(-1)
    weights = torch.rand(32)
    net = nn.Sequential(nn.Linear(4, 3), nn.LogSoftmax(-1))
    model = torcheras.Model(net)
    model.compile("sgd", nn.KLDivLoss(reduction="batchmean"), device="cpu")
    loss = model.evaluate(x, target, sample_weight=weights, batch_size=32, verbose=0)
    with torch.no_grad():
        per_sample = F.kl_div(net(x), target, reduction="none").sum(dim=1)
    assert loss == pytest.approx(float((weights * per_sample).sum() / 32), rel=RTOL)
    history = model.fit(x, target, sample_weight=weights, epochs=2, batch_size=8, verbose=0)
    assert len(history.history["loss"]) == 2


def test_builtin_losses_reduce_weighted_samples_over_the_batch_size():
    """Keras's sum_over_batch_size: sum(loss * w) / N."""
    y_pred, y_true = torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [0.0]])
    assert _loss("mse", y_pred, y_true, [1.0, 0.5]) == pytest.approx((1.0 + 0.5 * 4.0) / 2)


# ---- sequence outputs: a weight per time step (Keras's temporal sample weights) -------------

N_SEQ, T_SEQ, C_SEQ = 6, 5, 4


def _sequence_batch():
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(N_SEQ, T_SEQ, C_SEQ, generator=gen)  # Keras's layout (N, T, C)
    labels = torch.randint(0, C_SEQ, (N_SEQ, T_SEQ), generator=gen)
    weights = torch.rand(N_SEQ, T_SEQ, generator=gen)
    weights[:, 3:] = 0.0  # a padding mask, the usual reason for weights per step
    return logits, labels, weights


class _Fixed(torcheras.Model):
    """A "model" whose outputs are fixed: output ``index`` is ``outputs[index]``."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, index):
        return self.outputs[index]


def _per_step_cases():
    logits, labels, _ = _sequence_batch()
    targets = torch.randn(N_SEQ, T_SEQ, 3, generator=torch.Generator().manual_seed(2))
    per_step_ce = F.cross_entropy(logits.movedim(-1, 1), labels, reduction="none")  # (N, T)
    return {
        "sparse_categorical_crossentropy": (logits, labels, per_step_ce),
        "cross_entropy (N, C, T)": (logits.movedim(-1, 1), labels, per_step_ce),
        "nn.CrossEntropyLoss (N, C, T)": (logits.movedim(-1, 1), labels, per_step_ce),
        "mse (N, T, D)": (targets + 0.5, targets, (0.5**2) * torch.ones(N_SEQ, T_SEQ)),
        "binary_crossentropy (N, T, 1)": (
            logits[..., :1],
            (labels[..., None] > 1).float(),
            F.binary_cross_entropy_with_logits(
                logits[..., :1], (labels[..., None] > 1).float(), reduction="none"
            ).squeeze(-1),
        ),
    }


@pytest.mark.parametrize("case", list(_per_step_cases()))
def test_a_weight_per_time_step_weighs_that_step_as_in_keras(case):
    """sample_weight of shape (N, T) for outputs with one loss value per step: the loss is
    sum(loss * weight) / (N * T), Keras's ``sum_over_batch_size`` (checked against Keras 3:
    the same formula); a weight per sequence (N,) counts for each of its steps."""
    outputs, targets, per_step = _per_step_cases()[case]
    _, _, weights = _sequence_batch()
    loss = nn.CrossEntropyLoss() if case.startswith("nn.") else case.split(" ")[0]
    model = _Fixed(outputs)
    model.compile(optimizer=None, loss=loss, device="cpu")
    index = torch.arange(N_SEQ)
    expected = float((per_step * weights).sum() / per_step.numel())
    got = model.evaluate(index, targets, sample_weight=weights, batch_size=4, verbose=0)
    assert got == pytest.approx(expected, rel=RTOL)
    per_sequence = torch.linspace(0.5, 2.0, N_SEQ)
    expected = float((per_step * per_sequence[:, None]).sum() / per_step.numel())
    got = model.evaluate(index, targets, sample_weight=per_sequence, batch_size=N_SEQ, verbose=0)
    assert got == pytest.approx(expected, rel=RTOL)


def test_weighted_accuracy_with_a_weight_per_step_is_keras_weighted_mean():
    logits, labels, weights = _sequence_batch()
    model = _Fixed(logits)
    model.compile(
        optimizer=None,
        loss="sparse_categorical_crossentropy",
        weighted_metrics=["accuracy"],
        device="cpu",
    )
    logs = model.evaluate(
        torch.arange(N_SEQ), labels, sample_weight=weights, batch_size=4, verbose=0,
        return_dict=True,
    )  # fmt: skip
    correct = (logits.argmax(-1) == labels).float()
    assert logs["accuracy"] == pytest.approx(float((correct * weights).sum() / weights.sum()))


def test_class_weight_on_sequence_labels_weighs_each_step_by_its_class():
    """class_weight with labels (N, T): each step weighs what its class does (Keras fails on
    these targets; its argmax rule would weigh by the position of the largest label). Training
    with it is training with the per-step weights spelled out; -100 padding is allowed."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(32, T_SEQ, 3, generator=gen)
    labels = torch.randint(0, C_SEQ, (32, T_SEQ), generator=gen)
    labels[:, -1] = -100
    class_weight = {0: 0.5, 1: 1.0, 2: 3.0, 3: 1.5}
    table = torch.tensor([class_weight[c] for c in range(C_SEQ)])
    spelled_out = torch.where(labels == -100, 1.0, table[labels.clamp_min(0)])

    def train(**weights):
        torch.manual_seed(0)
        model = torcheras.Model(nn.Linear(3, C_SEQ))
        model.compile(optimizer="sgd", learning_rate=0.1, loss="sparse_categorical_crossentropy",
                      device="cpu")  # fmt: skip
        history = model.fit(x, labels, batch_size=8, epochs=2, shuffle=False, verbose=0, **weights)
        return history.history["loss"], model.module.weight.detach().clone()

    losses_cw, weight_cw = train(class_weight=class_weight)
    losses_sw, weight_sw = train(sample_weight=spelled_out)
    losses_none, _ = train()
    assert losses_cw == pytest.approx(losses_sw, rel=RTOL)
    torch.testing.assert_close(weight_cw, weight_sw)
    assert losses_cw != pytest.approx(losses_none, rel=1e-3)


def test_one_hot_sequence_targets_take_the_class_weight_of_their_argmax():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(N_SEQ, T_SEQ, C_SEQ, generator=gen)
    labels = torch.randint(0, C_SEQ, (N_SEQ, T_SEQ), generator=gen)
    from torcheras.data import _class_weights

    class_weight = {0: 2.0, 3: 0.25}
    expected = torch.tensor([2.0, 1.0, 1.0, 0.25])[labels]
    one_hot = F.one_hot(labels, C_SEQ)
    torch.testing.assert_close(_class_weights(one_hot.float(), class_weight, None), expected)
    torch.testing.assert_close(
        _class_weights(one_hot, class_weight, None, one_hot=True), expected
    )  # integer one-hot rows (F.one_hot) with a categorical loss
    torch.testing.assert_close(_class_weights(labels, class_weight, None), expected)
    assert logits.shape[:2] == expected.shape


def test_a_weight_per_step_with_a_loss_that_gives_one_value_per_sample_is_a_clear_error():
    logits, labels, weights = _sequence_batch()

    def per_sequence(y_pred, y_true):  # one value per sequence: steps cannot be weighed
        return F.cross_entropy(y_pred.movedim(-1, 1), y_true, reduction="none").mean(dim=1)

    model = _Fixed(logits)
    model.compile(optimizer=None, loss=per_sequence, device="cpu")
    with pytest.raises(ValueError, match=r"sample_weight of shape \(4, 5\) does not fit"):
        model.evaluate(torch.arange(N_SEQ), labels, sample_weight=weights, batch_size=4,
                       verbose=0)  # fmt: skip


def test_sparse_top_k_accuracy_on_sequences_counts_each_step():
    """(N, T, C) outputs and (N, T) labels: a hit or miss per step, as Keras's metric (it was
    a shape error)."""
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(N_SEQ, T_SEQ, 8, generator=gen)
    labels = torch.randint(0, 8, (N_SEQ, T_SEQ), generator=gen)
    model = _Fixed(logits)
    model.compile(optimizer=None, loss="sparse_categorical_crossentropy",
                  metrics=["sparse_top_k_categorical_accuracy"], device="cpu")  # fmt: skip
    logs = model.evaluate(torch.arange(N_SEQ), labels, batch_size=4, verbose=0,
                          return_dict=True)  # fmt: skip
    hit = (logits.topk(5, dim=-1).indices == labels[..., None]).any(-1).float()  # Keras's k=5
    assert 0 < float(hit.mean()) < 1
    assert logs["sparse_top_k_categorical_accuracy"] == pytest.approx(float(hit.mean()))


@pytest.mark.parametrize("steps", [C_SEQ, C_SEQ + 1], ids=["T == C", "T != C"])
@pytest.mark.parametrize("loss", ["cross_entropy", nn.CrossEntropyLoss(), "keras layout"])
def test_accuracy_reads_the_classes_where_the_loss_does_and_skips_padding(loss, steps):
    """torch's cross-entropies take (N, C, T) outputs: accuracy takes the argmax over axis 1
    (it took the last axis: a wrong number when T == C, a shape error otherwise). Positions
    labelled -100 count for nothing in the accuracy, as in the loss; weighted too."""
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(N_SEQ, C_SEQ, steps, generator=gen)  # torch's layout
    labels = torch.randint(0, C_SEQ, (N_SEQ, steps), generator=gen)
    labels[0, :2] = labels[3, -1] = -100
    weights = torch.rand(N_SEQ, generator=gen)
    outputs = logits
    if loss == "keras layout":
        loss, outputs = "sparse_categorical_crossentropy", logits.movedim(1, -1)
    model = _Fixed(outputs)
    names = ["accuracy", "sparse_categorical_accuracy", "sparse_top_k_categorical_accuracy"]
    model.compile(optimizer=None, loss=loss, metrics=names, weighted_metrics=["acc"],
                  device="cpu")  # fmt: skip
    logs = model.evaluate(torch.arange(N_SEQ), labels, sample_weight=weights, batch_size=4,
                          verbose=0, return_dict=True)  # fmt: skip
    kept = (labels != -100).float()
    correct = (logits.argmax(dim=1) == labels).float()
    assert logs["accuracy"] == pytest.approx(float((correct * kept).sum() / kept.sum()))
    assert logs["sparse_categorical_accuracy"] == pytest.approx(logs["accuracy"])
    assert logs["sparse_top_k_categorical_accuracy"] == pytest.approx(1.0)  # k=5 > C
    w = kept * weights[:, None]
    assert logs["acc"] == pytest.approx(float((correct * w).sum() / w.sum()))


# ---- integer labels of any dtype, and labels of the wrong form -----------------------------


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.int16, np.int64])
@pytest.mark.parametrize(
    "loss",
    ["sparse_categorical_crossentropy", "cross_entropy", nn.CrossEntropyLoss()],
    ids=["keras-name", "torch-name", "module"],
)
def test_integer_labels_of_any_dtype_train_and_match_torch(dtype, loss, blobs):
    x, y = blobs
    model = make_model(loss=loss)
    model.fit(x, y.astype(dtype), epochs=1, batch_size=60, verbose=0)
    logits = model(torch.from_numpy(x)).detach()
    expected = float(F.cross_entropy(logits, torch.from_numpy(y)))
    result = model.evaluate(x, y.astype(dtype), batch_size=240, verbose=0, return_dict=True)
    assert result["loss"] == pytest.approx(expected, rel=RTOL)


def test_whole_float_labels_work_but_fractional_ones_are_an_error_naming_y(blobs):
    x, y = blobs
    model = make_model()
    model.fit(x, y.astype("float32"), epochs=1, verbose=0)  # 0.0, 1.0, 2.0: fine
    bad = y.astype("float32") + 0.5
    with pytest.raises(ValueError, match=r"`y` holds float values that are not whole numbers"):
        model.fit(x, bad, epochs=1, verbose=0)


def test_one_hot_targets_to_a_sparse_loss_point_to_categorical_crossentropy(blobs):
    x, y = blobs
    one_hot = np.eye(3, dtype="float32")[y]
    with pytest.raises(ValueError, match="categorical_crossentropy"):
        make_model().fit(x, one_hot, epochs=1, verbose=0)
    # ... while categorical_crossentropy and torch's CrossEntropyLoss take them
    for loss in ("categorical_crossentropy", nn.CrossEntropyLoss()):
        history = make_model(loss=loss).fit(x, one_hot, epochs=3, verbose=0)
        assert history.history["accuracy"][-1] > 0.9


# ---- every built-in against torch and Keras ------------------------------------------------

Y_TRUE = [[0.0, 1.0], [0.0, 0.0]]
Y_SOFT = [[0.6, 0.4], [0.4, 0.6]]


@pytest.mark.parametrize(
    ("name", "y_true", "y_pred", "keras_value", "keras_weighted"),
    [
        ("mean_squared_error", Y_TRUE, [[1.0, 1.0], [1.0, 0.0]], 0.5, ([0.7, 0.3], 0.25)),
        ("mean_absolute_error", Y_TRUE, [[1.0, 1.0], [1.0, 0.0]], 0.5, ([0.7, 0.3], 0.25)),
        (
            "mean_absolute_percentage_error",
            [[2.0, 1.0], [2.0, 3.0]],
            [[1.0, 1.0], [1.0, 0.0]],
            50.0,
            ([0.7, 0.3], 20.0),
        ),
        (
            "mean_squared_logarithmic_error",
            [[0.0, 1.0], [0.0, 0.0]],
            [[1.0, 1.0], [1.0, 0.0]],
            0.240,
            ([0.7, 0.3], 0.120),
        ),
        ("huber", Y_TRUE, Y_SOFT, 0.155, ([1.0, 0.0], 0.09)),
        ("log_cosh", Y_TRUE, [[1.0, 1.0], [0.0, 0.0]], 0.108, ([0.8, 0.2], 0.087)),
        ("kl_divergence", Y_TRUE, Y_SOFT, 0.458, ([0.8, 0.2], 0.366)),
        ("poisson", Y_TRUE, [[1.0, 1.0], [0.0, 0.0]], 0.5, ([0.8, 0.2], 0.4)),
        ("hinge", Y_TRUE, Y_SOFT, 1.3, ([1.0, 0.0], 0.55)),
        ("squared_hinge", Y_TRUE, Y_SOFT, 1.86, ([1.0, 0.0], 0.73)),
        ("categorical_hinge", Y_TRUE, Y_SOFT, 1.4, ([1.0, 0.0], 0.6)),
        ("cosine_similarity", [[0.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [1.0, 1.0]], -0.5, None),
    ],
)
def test_builtin_loss_matches_the_value_keras_documents(
    name, y_true, y_pred, keras_value, keras_weighted
):
    assert _loss(name, y_pred, y_true) == pytest.approx(keras_value, abs=1e-3)
    if keras_weighted is not None:
        weights, value = keras_weighted
        assert _loss(name, y_pred, y_true, weights) == pytest.approx(value, abs=1e-3)


def test_kl_divergence_takes_probabilities_as_keras_documents():
    assert _loss("kl_divergence", [[0.5, 0.8, 0.12]], [[0.4, 0.9, 0.2]]) == pytest.approx(
        0.11891246, rel=1e-4
    )


@pytest.mark.parametrize(
    ("name", "torch_fn"),
    [
        ("mse", F.mse_loss),
        ("mae", F.l1_loss),
        ("huber", F.huber_loss),
        ("smooth_l1_loss", F.smooth_l1_loss),
        ("binary_crossentropy", F.binary_cross_entropy_with_logits),
        ("poisson", lambda p, t: F.poisson_nll_loss(p, t, log_input=False, eps=1e-7)),
    ],
)
def test_regression_and_binary_losses_equal_torchs_functions(name, torch_fn):
    gen = torch.Generator().manual_seed(1)
    y_pred = torch.rand(16, 3, generator=gen) * 2
    y_true = (torch.rand(16, 3, generator=gen) > 0.5).float()
    weights = torch.rand(16, generator=gen)
    expected = torch_fn(y_pred, y_true)
    assert _loss(name, y_pred, y_true) == pytest.approx(float(expected), rel=1e-4)
    per_sample = torch.stack([torch_fn(y_pred[i], y_true[i]) for i in range(16)])
    weighted = float((per_sample * weights).sum() / 16)
    assert _loss(name, y_pred, y_true, weights) == pytest.approx(weighted, rel=1e-4)


def test_cross_entropies_equal_torch_and_keras():
    y_prob = torch.tensor([[0.05, 0.95, 0.0], [0.1, 0.8, 0.1]])
    one_hot, labels = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), torch.tensor([1, 2])
    # Keras's documented 1.177, from probabilities
    assert _loss(losses.CategoricalCrossentropy(), y_prob, one_hot) == pytest.approx(
        1.177, abs=1e-3
    )
    assert _loss(losses.SparseCategoricalCrossentropy(), y_prob, labels) == pytest.approx(
        1.177, abs=1e-3
    )
    assert _loss(losses.CategoricalCrossentropy(), y_prob, one_hot, [0.3, 0.7]) == pytest.approx(
        0.814, abs=1e-3
    )
    # logits: the names, and torch
    logits = torch.tensor([[-18.6, 0.51, 2.94, -12.8]])
    binary = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    assert _loss("binary_crossentropy", logits, binary) == pytest.approx(0.865, abs=1e-3)
    assert _loss(losses.BinaryCrossentropy(from_logits=True), logits, binary) == pytest.approx(
        0.865, abs=1e-3
    )
    assert _loss(
        losses.BinaryCrossentropy(), [[0.6, 0.4], [0.4, 0.6]], [[0.0, 1.0], [0.0, 0.0]]
    ) == pytest.approx(0.815, abs=1e-3)
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 3, 1, 1, 2, 0])
    assert _loss("sparse_categorical_crossentropy", z, t) == pytest.approx(
        float(F.cross_entropy(z, t)), rel=RTOL
    )
    assert _loss("categorical_crossentropy", z, F.one_hot(t, 4).float()) == pytest.approx(
        float(F.cross_entropy(z, t)), rel=RTOL
    )
    smoothed = losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.2)
    assert _loss(smoothed, z, F.one_hot(t, 4).float()) == pytest.approx(
        float(F.cross_entropy(z, t, label_smoothing=0.2)), rel=RTOL
    )


def _metric(name, y_pred, y_true, loss=None, sample_weight=None):
    metric = metrics.get(name, None if loss is None else losses.get(loss))
    metric.update(torch.as_tensor(y_pred), torch.as_tensor(y_true), sample_weight)
    return float(metric.result())


def test_builtin_metrics_equal_torch():
    gen = torch.Generator().manual_seed(4)
    logits, labels = torch.randn(50, 5, generator=gen), torch.randint(0, 5, (50,), generator=gen)
    expected_acc = float((logits.argmax(1) == labels).float().mean())
    assert _metric("accuracy", logits, labels, "sparse_categorical_crossentropy") == pytest.approx(
        expected_acc
    )
    assert _metric("sparse_categorical_accuracy", logits, labels) == pytest.approx(expected_acc)
    assert _metric("categorical_accuracy", logits, F.one_hot(labels, 5)) == pytest.approx(
        expected_acc
    )
    top3 = float((logits.topk(3, 1).indices == labels[:, None]).any(1).float().mean())
    sparse_top_k = metrics.MeanMetric(metrics._top_k(3, sparse=True), "top3")
    sparse_top_k.update(logits, labels)
    assert float(sparse_top_k.result()) == pytest.approx(top3)
    y_pred, y_true = torch.randn(50, 2, generator=gen), torch.randn(50, 2, generator=gen)
    assert _metric("mse", y_pred, y_true) == pytest.approx(float(F.mse_loss(y_pred, y_true)), RTOL)
    assert _metric("mae", y_pred, y_true) == pytest.approx(float(F.l1_loss(y_pred, y_true)), RTOL)
    assert _metric("rmse", y_pred, y_true) == pytest.approx(
        float(F.mse_loss(y_pred, y_true).sqrt()), RTOL
    )
    assert _metric("cosine_similarity", y_pred, y_true) == pytest.approx(
        float(F.cosine_similarity(y_pred, y_true).mean()), RTOL
    )
    weights = torch.rand(50, generator=gen)
    per_sample = (y_pred - y_true).square().mean(1)
    assert _metric("mse", y_pred, y_true, sample_weight=weights) == pytest.approx(
        float((per_sample * weights).sum() / weights.sum()), RTOL
    )


# ---- accuracy on logits: the rule -----------------------------------------------------------


@pytest.mark.parametrize(
    ("loss", "outputs", "threshold"),
    [
        ("binary_crossentropy", "logits", 0.0),
        (nn.BCEWithLogitsLoss(), "logits", 0.0),
        (F.binary_cross_entropy_with_logits, "logits", 0.0),
        (losses.BinaryCrossentropy(from_logits=True), "logits", 0.0),
        (nn.BCELoss(), "probabilities", 0.5),
        (F.binary_cross_entropy, "probabilities", 0.5),
        (losses.BinaryCrossentropy(), "probabilities", 0.5),
        ("mse", "probabilities", 0.5),
    ],
)
def test_accuracy_threshold_follows_what_the_loss_says_of_the_outputs(loss, outputs, threshold):
    y_true = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    if outputs == "logits":  # all correct logits, all of them below 0.5
        y_pred = torch.tensor([[0.2], [-3.0], [0.4], [-0.1]])
    else:
        y_pred = torch.tensor([[0.6], [0.4], [0.9], [0.1]])
    assert metrics.threshold_for(losses.get(loss)) == threshold
    assert _metric("accuracy", y_pred, y_true, loss) == 1.0
    assert _metric("binary_accuracy", y_pred, y_true, loss) == 1.0


def test_accuracy_on_all_correct_logits_with_bce_with_logits_in_fit():
    x = torch.linspace(-1, 1, 64).reshape(-1, 1)
    y = (x > 0).float()
    net = nn.Linear(1, 1)
    with torch.no_grad():
        net.weight.fill_(0.3)  # logits in [-0.3, 0.3]: all correct, none above 0.5
        net.bias.zero_()
    model = torcheras.Model(net)
    model.compile(optimizer=None, loss=nn.BCEWithLogitsLoss(), metrics=["accuracy"], device="cpu")
    assert model.evaluate(x, y, verbose=0, return_dict=True)["accuracy"] == 1.0


def test_accuracy_errors_when_a_custom_binary_loss_cannot_say():
    def my_loss(y_pred, y_true):
        return (y_pred - y_true).abs().mean()

    x, y = torch.randn(8, 1), (torch.rand(8, 1) > 0.5).float()
    model = torcheras.Model(nn.Linear(1, 1))
    model.compile("sgd", loss=my_loss, metrics=["accuracy"], device="cpu")
    with pytest.raises(ValueError, match="cannot tell whether the model's outputs are logits"):
        model.fit(x, y, verbose=0)
    my_loss.from_logits = True  # a loss may say so itself
    model.compile("sgd", loss=my_loss, metrics=["accuracy"], device="cpu")
    model.fit(x, y, verbose=0)
    assert metrics.threshold_for(model.compiled_loss) == 0.0
    explicit = metrics.BinaryAccuracy(threshold=0.0)
    model.compile("sgd", loss=lambda p, t: (p - t).abs().mean(), metrics=[explicit], device="cpu")
    model.fit(x, y, verbose=0)


# ---- the logits trap ------------------------------------------------------------------------


def _moons():
    from sklearn.datasets import make_moons

    x, y = make_moons(400, noise=0.15, random_state=0)
    return x.astype("float32"), y.astype("float32").reshape(-1, 1)


def _sigmoid_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 1), nn.Sigmoid())


def test_a_sigmoid_network_with_a_logits_loss_warns_once_with_the_fix():
    x, y = _moons()
    model = torcheras.Model(_sigmoid_net())
    model.compile("adam", "binary_crossentropy", metrics=["accuracy"], device="cpu")
    with pytest.warns(
        UserWarning,
        match=r"expects logits.*as a sigmoid's are.*BinaryCrossentropy\(from_logits=False\)",
    ) as rec:
        model.fit(x, y, epochs=2, verbose=0)
    assert sum("expects logits" in str(w.message) for w in rec) == 1


def test_keras_loss_object_with_probabilities_trains_a_sigmoid_network_without_a_warning():
    x, y = _moons()
    model = torcheras.Model(_sigmoid_net())
    model.compile(
        torch.optim.Adam(model.parameters(), lr=0.02),
        losses.BinaryCrossentropy(from_logits=False),
        metrics=["accuracy"],
        device="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        history = model.fit(x, y, epochs=40, batch_size=32, verbose=0)
    assert history.history["accuracy"][-1] > 0.85


def test_a_softmax_network_with_a_logits_loss_warns(blobs):
    x, y = blobs
    net = nn.Sequential(nn.Linear(8, 3), nn.Softmax(dim=-1))
    model = torcheras.Model(net)
    model.compile("adam", "sparse_categorical_crossentropy", device="cpu")
    with pytest.warns(UserWarning, match=r"rows that sum to 1.*SparseCategoricalCrossentropy"):
        model.fit(x, y, epochs=1, verbose=0)


class _UnitLogits(nn.Module):
    """Correct logits that happen to lie in [0, 1] on the first batch (a small net near 0.5)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.constant_(self.linear.bias, 0.5)

    def forward(self, x):
        return self.linear(x)


@pytest.mark.parametrize(
    "loss",
    [
        losses.BinaryCrossentropy(from_logits=True),
        nn.BCEWithLogitsLoss(),
        "bce_with_logits",
        F.binary_cross_entropy_with_logits,
    ],
    ids=["BinaryCrossentropy(from_logits=True)", "nn.BCEWithLogitsLoss", "name", "function"],
)
def test_a_loss_that_says_logits_never_warns_of_probabilities(loss):
    x, y = _moons()
    model = torcheras.Model(_UnitLogits())
    model.compile("sgd", loss, metrics=["accuracy"], device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.fit(x, y, epochs=1, batch_size=32, verbose=0)


def test_the_warning_names_a_torch_loss_module_as_torch_spells_it(blobs):
    x, y = blobs
    model = torcheras.Model(nn.Sequential(nn.Linear(8, 3), nn.Softmax(dim=-1)))
    model.compile("adam", nn.CrossEntropyLoss(), device="cpu")
    with pytest.warns(UserWarning, match=r"The loss 'cross_entropy_loss' expects logits"):
        model.fit(x, y, epochs=1, verbose=0)
    assert losses.get(nn.BCEWithLogitsLoss()).name == "bce_with_logits_loss"
    assert losses.get(nn.NLLLoss()).name == "nll_loss"


def test_logits_given_to_a_probability_loss_warn(blobs):
    x, y = blobs
    model = make_model(loss=losses.SparseCategoricalCrossentropy(from_logits=False), metrics=[])
    with pytest.warns(UserWarning, match="expects probabilities"):
        model.fit(x, y, epochs=1, verbose=0)


@pytest.mark.parametrize(
    ("sample_weight", "expected"),
    [
        (None, 2.5),
        (2.0, 2.5),  # one weight for every value
        ([1.0, 0.0, 2.0], 19 / 6),  # a weight per row, for each value of the row
        ([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], 3.5),  # a weight per value
    ],
    ids=["unweighted", "scalar", "per row", "per value"],
)
def test_mean_tracker_weighs_values_as_keras_mean_does(sample_weight, expected):
    """keras.metrics.Mean().update_state(values, sample_weight) on values [[0, 1], [2, 3],
    [4, 5]] gives these results (run with Keras 3): sum(v * w) / sum(w), w broadcast."""
    tracker = metrics.Mean()
    tracker.update_state(torch.arange(6.0).reshape(3, 2), sample_weight=sample_weight)
    assert float(tracker.result()) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", ["mse", "log_cosh", "mape", "categorical_crossentropy"])
def test_builtin_losses_compute_in_float32_under_mixed_precision(name):
    """Under precision="bf16-mixed" the model's outputs are bfloat16; the built-in losses
    compute in float32 from them, as Keras's losses and torch's own loss functions (autocast)
    do: the same number as float32 arithmetic on the same outputs, weighted or not (they were
    computed in bfloat16: 576.0 for 574.7)."""
    gen = torch.Generator().manual_seed(1)
    net = nn.Linear(8, 4)
    x, weights = torch.randn(256, 8, generator=gen) * 30, torch.rand(256, generator=gen)
    y = torch.randn(256, 4, generator=gen) * 30
    if name == "categorical_crossentropy":
        y = torch.softmax(y, dim=-1)
    model = torcheras.Model(net)
    metric = "categorical_crossentropy" if name == "mse" else "mse"  # a loss as a metric
    model.compile("sgd", name, metrics=[metric], precision="bf16-mixed", device="cpu")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = net(x)
    assert outputs.dtype == torch.bfloat16
    p, t = outputs.double(), y.double()
    per_sample = {
        "mse": lambda: (p - t).square().mean(-1),
        "log_cosh": lambda: torch.log(torch.cosh(p - t)).mean(-1),
        "mape": lambda: (100 * (t - p).abs() / t.abs()).mean(-1),
        "categorical_crossentropy": lambda: -(t * F.log_softmax(p, -1)).sum(-1),
    }[name]()
    logs = model.evaluate(x, y, batch_size=256, verbose=0, return_dict=True)
    assert logs["loss"] == pytest.approx(float(per_sample.mean()), rel=RTOL)
    got = model.evaluate(x, y, sample_weight=weights, batch_size=256, verbose=0, return_dict=True)
    assert got["loss"] == pytest.approx(float((per_sample * weights).mean()), rel=RTOL)
    if metric == "mse":
        assert logs["mse"] == pytest.approx(float((p - t).square().mean()), rel=RTOL)
    else:
        expected = -(t * F.log_softmax(p, -1)).sum(-1).mean()
        assert logs[metric] == pytest.approx(float(expected), rel=RTOL)


@pytest.mark.parametrize("source", ["arrays", "loader"])
def test_accuracy_masks_padding_only_where_the_data_has_it_and_is_exact_either_way(source):
    """Arrays are looked at once for -100 labels: a pass over arrays without any counts its
    labels without a mask per batch. Training arrays without padding, validation data with
    some, then a pass outside fit: each number is torch's count."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 5, generator=gen)
    labels = torch.randint(0, 5, (40,), generator=gen)
    padded = labels.clone()
    padded[[2, 9, 33]] = -100
    model = _Fixed(logits)
    model.compile(optimizer=None, loss="cross_entropy", metrics=["accuracy"], device="cpu")
    index = torch.arange(40)
    val = {"x": index, "y": padded}
    if source == "loader":
        val = {"x": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(index, padded), 8)}
    correct = (logits.argmax(1) == labels).float()
    kept = (padded != -100).float()
    for _ in range(2):  # train, validate, train again: each pass knows its own data
        logs = model.evaluate(index, labels, batch_size=8, verbose=0, return_dict=True)
        assert logs["accuracy"] == pytest.approx(float(correct.mean()))
        logs = model.evaluate(**val, batch_size=None if source == "loader" else 8, verbose=0,
                              return_dict=True)  # fmt: skip
        assert logs["accuracy"] == pytest.approx(float((correct * kept).sum() / kept.sum()))
    model.reset_metrics()
    model.update_metrics(logits, padded)  # outside any pass: padding is always looked for
    assert float(model.compiled_metrics[0].result()) == pytest.approx(
        float((correct * kept).sum() / kept.sum())
    )


def test_a_custom_step_that_masks_labels_itself_gets_the_padding_rule():
    """Arrays without -100, but a train_step that masks labels on the fly (masked language
    modelling does): its accuracy still counts only the labels kept."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(32, 5, generator=gen)
    labels = torch.randint(0, 5, (32,), generator=gen)
    masked = labels.clone()
    masked[::4] = -100  # what the step hides

    class Masking(_Fixed):
        def train_step(self, batch):
            index, y = batch
            y = torch.where(index % 4 == 0, -100, y)
            self.update_metrics(self(index), y)
            return {}

    model = Masking(logits)
    model.compile(optimizer=None, loss="cross_entropy", metrics=["accuracy"], device="cpu")
    history = model.fit(torch.arange(32), labels, batch_size=8, shuffle=False, verbose=0)
    kept = (masked != -100).float()
    correct = (logits.argmax(1) == labels).float()
    assert history.history["accuracy"][0] == pytest.approx(float((correct * kept).sum() / 24))


@pytest.mark.parametrize(
    "shape", [(12,), (12, 1), (12, 3), (12, 4, 3)], ids=["N", "N1", "NC", "NTC"]
)
def test_error_metrics_equal_torchs_means_weighted_or_not(shape):
    """mae / mse / rmse as metrics (summed element by element, one op less per batch) give
    torch's means; weighted, Keras's sum(mean_c(v) * w) / sum(w), a weight per sample or per
    time step."""
    gen = torch.Generator().manual_seed(5)
    outputs, targets = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    weights = torch.rand(shape[:2] if len(shape) == 3 else shape[:1], generator=gen)
    model = _Fixed(outputs)
    model.compile(optimizer=None, loss="mse", metrics=["mae", "mse", "rmse"],
                  weighted_metrics=["mean_absolute_error"], device="cpu")  # fmt: skip
    logs = model.evaluate(torch.arange(12), targets, sample_weight=weights, batch_size=5,
                          verbose=0, return_dict=True)  # fmt: skip
    assert logs["mae"] == pytest.approx(float(F.l1_loss(outputs, targets)), rel=1e-6)
    assert logs["mse"] == pytest.approx(float(F.mse_loss(outputs, targets)), rel=1e-6)
    assert logs["rmse"] == pytest.approx(float(F.mse_loss(outputs, targets).sqrt()), rel=1e-6)
    per_position = (outputs - targets).abs()
    if per_position.dim() > weights.dim():
        per_position = per_position.mean(-1)  # Keras: the mean over the last axis first
    expected = (per_position * weights).sum() / weights.sum()
    assert logs["mean_absolute_error"] == pytest.approx(float(expected), rel=1e-6)
