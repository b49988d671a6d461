"""The ``(hits, labels)`` pairs that the sparse accuracies return: positions labelled -100
(padding) count for nothing, through ``jit_compile=True`` as in eager, through a user's own
``MeanMetric`` of the public function, and the pair reads as ``(hits, labels)``."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn

import torcheras
from torcheras import metrics


def _padded_data():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(96, 8, generator=gen)
    y = torch.randint(0, 5, (96,), generator=gen)
    y[::7] = -100  # padding: no hit, no count
    return x, y


def _expected(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    kept = y != -100
    hit = (logits.argmax(-1) == y) & kept
    top2 = (logits.topk(2, dim=-1).indices == y[:, None]).any(-1) & kept
    n = float(kept.sum())
    return {"accuracy": float(hit.sum()) / n, "top2": float(top2.sum()) / n}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit_compile"])
def test_sparse_accuracies_skip_padding_in_the_logged_epoch(jit):
    x, y = _padded_data()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    model = torcheras.Model(net)
    # lr 0: the weights the metrics saw are the weights checked below
    model.compile(torch.optim.SGD(net.parameters(), lr=0.0), "sparse_categorical_crossentropy",
                  metrics=["accuracy",
                           metrics.SparseTopKCategoricalAccuracy(k=2, name="top2")],
                  jit_compile=jit, device="cpu")  # fmt: skip
    history = model.fit(x, y, epochs=1, batch_size=32, shuffle=False, verbose=0).history
    with torch.no_grad():
        expected = _expected(net(x), y)
    assert 0 < expected["accuracy"] < expected["top2"] < 1  # the padding changes both
    assert history["accuracy"][0] == pytest.approx(expected["accuracy"], rel=1e-6)
    assert history["top2"][0] == pytest.approx(expected["top2"], rel=1e-6)


def test_a_wrapped_public_accuracy_function_counts_padding_for_nothing():
    x, y = _padded_data()
    logits = x[:, :5]
    m = metrics.MeanMetric(metrics.sparse_categorical_accuracy, "acc")  # (y_pred, y_true)
    m.update(logits[:50], y[:50])
    m.update(logits[50:], y[50:])
    assert float(m.result()) == pytest.approx(_expected(logits, y)["accuracy"], rel=1e-6)


def test_the_pair_reads_as_hits_and_labels_and_survives_pickle():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    labels = torch.tensor([0, 0, -100])
    pair = metrics.sparse_categorical_accuracy(logits, labels)
    hits, kept_labels = pair
    assert hits.tolist() == [True, False, False]
    assert torch.equal(kept_labels, labels)
    assert pair.hits is hits and pair.labels is kept_labels
    again = pickle.loads(pickle.dumps(pair))
    assert type(again) is type(pair)
    assert again.hits.tolist() == hits.tolist()
    assert np.array_equal(again.labels.numpy(), labels.numpy())


def test_the_pair_reads_inside_a_fullgraph_compiled_function():
    """A user's compiled code may read ``.hits`` of the public function's result: the graph
    stays whole (``fullgraph=True`` raises on a break) and the count is the eager one."""
    x, y = _padded_data()
    logits = x[:, :5]

    def hits(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        pair = metrics.sparse_categorical_accuracy(p, t)
        return pair.hits.sum() + 0 * pair.labels.sum()

    compiled = torch.compile(hits, fullgraph=True, backend="eager")
    assert int(compiled(logits, y)) == int(hits(logits, y)) > 0


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "may-pad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_sparse_accuracies_counted_in_one_expression_are_the_reference(padded, dtype):
    """From a metric's third batch of ``(N, C)`` outputs and ``(N,)`` labels the hits are
    counted in one expression (``MeanMetric._counts_argmax_hits``): every form of the sparse
    accuracy gives torch's own count over all batches, a snapshot taken between batches keeps
    its value, outputs that require grad keep no graph, and one-column outputs stay binary."""
    model = torcheras.Model(nn.Linear(4, 5))
    model.compile(
        "sgd",
        "cross_entropy",
        metrics=[
            "accuracy",
            "sparse_categorical_accuracy",
            metrics.SparseCategoricalAccuracy("sca"),
        ],
        device="cpu",
    )
    compiled = model.compiled_metrics
    assert all(m._counts_argmax_hits for m in compiled)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(70, 5, generator=gen).to(dtype).requires_grad_()
    labels = torch.randint(0, 5, (70,), generator=gen).to(torch.int32)
    if padded:
        labels[::6] = -100
    for metric in compiled:
        metric.padded_labels = padded
    snapshots = []
    for i, part in enumerate(torch.arange(70).split(16)):  # 16, 16, 16, 16, 6
        for metric in compiled:
            metric.update(logits[part], labels[part])
        if i == 2:
            snapshots = [m.snapshot() for m in compiled]
            held = labels[:48]
    kept = labels != -100
    want = float(((logits.argmax(1) == labels) & kept).sum()) / float(kept.sum())
    for metric in compiled:
        result = metric.result()
        assert not result.requires_grad
        assert float(result) == pytest.approx(want, rel=1e-7)
    kept_held = held != -100
    want_held = float(((logits[:48].argmax(1) == held) & kept_held).sum()) / float(kept_held.sum())
    assert [float(s()) for s in snapshots] == pytest.approx([want_held] * 3, rel=1e-7)
    binary = model.compiled_metrics[0]  # one column: the auto accuracy thresholds at 0
    binary.reset()
    one = torch.tensor([[0.3], [-0.2], [0.1]])
    for _ in range(3):
        binary.update(one, torch.tensor([1, 1, 0]))
    assert float(binary.result()) == pytest.approx(1 / 3)
