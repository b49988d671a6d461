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
