"""GradientMonitor: norms equal torch's, unscaled under AMP, warnings name the layer, a stop."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_model

from torcheras import callbacks as cb


def reference_norms(model):
    """What torch says the gradients are, read in on_after_backward (once per step)."""
    seen: list[dict[str, float]] = []

    def record(batch):
        seen.append(
            {
                n.removeprefix("module."): float(torch.linalg.vector_norm(p.grad))
                for n, p in model.named_parameters()
            }  # fmt: skip
        )

    return seen, cb.LambdaCallback(on_after_backward=record)


def test_norms_are_torchs_own_for_the_sampled_steps(blobs):
    x, y = blobs
    model = make_model()
    seen, record = reference_norms(model)
    weights_before: list[dict[str, torch.Tensor]] = []
    keep = cb.LambdaCallback(
        on_train_batch_begin=lambda b, logs: weights_before.append(
            {n: p.detach().clone() for n, p in model.module.named_parameters()}
        )
    )
    history = model.fit(
        x, y, epochs=2, batch_size=40, verbose=0,
        callbacks=[keep, record, cb.GradientMonitor(every_n_steps=4)],
    )  # fmt: skip
    # 6 steps an epoch; sampled: steps 1, 5 (epoch 1), 9 (epoch 2): running means per epoch
    sampled = {0: [0, 4], 1: [8]}
    for epoch, steps in sampled.items():
        for name in ("0.weight", "2.bias"):
            want = sum(seen[s][name] for s in steps) / len(steps)
            got = history.history[f"grad_norm/{name}"][epoch]
            assert got == pytest.approx(want, rel=1e-5)
        total = sum(sum(v**2 for v in seen[s].values()) ** 0.5 for s in steps) / len(steps)
        assert history.history["grad_norm"][epoch] == pytest.approx(total, rel=1e-5)
    # the last sampled step's update ratio, against the weights before and after it
    after = weights_before[9]["0.weight"]
    before = weights_before[8]["0.weight"]
    ratio = float(torch.linalg.vector_norm(after - before) / torch.linalg.vector_norm(before))
    assert history.history["update_ratio/0.weight"][1] == pytest.approx(ratio, rel=1e-4)


def test_norms_are_unscaled_under_float16_mixed_precision(blobs):
    x, y = blobs
    norms = {}
    for precision in ("32", "16-mixed"):
        torch.manual_seed(0)
        model = make_model(precision=precision)
        history = model.fit(
            x, y, epochs=1, batch_size=240, verbose=0,
            callbacks=[cb.GradientMonitor(every_n_steps=1)],
        )  # fmt: skip
        norms[precision] = history.history["grad_norm"][0]
    assert norms["16-mixed"] == pytest.approx(norms["32"], rel=0.02)  # not x 65536


def test_exploding_gradients_warn_once_naming_the_layer(blobs):
    x, y = blobs
    model = make_model()
    with pytest.warns(RuntimeWarning, match=r"gradient of 0\.weight is exploding") as caught:
        model.fit(
            x * 1e5, y, epochs=2, verbose=0,
            callbacks=[cb.GradientMonitor(every_n_steps=1, explode_threshold=10.0)],
        )  # fmt: skip
    exploding = [w for w in caught if "0.weight is exploding" in str(w.message)]
    assert len(exploding) == 1  # once per layer, not once per step
    assert "compile(global_clipnorm=1.0)" in str(exploding[0].message)


def test_a_dead_layer_is_reported_as_vanishing(blobs):
    x, y = blobs
    model = make_model()
    with torch.no_grad():
        model.module[0].bias.fill_(-1e4)  # every ReLU dead: no gradient reaches layer 0
    with pytest.warns(RuntimeWarning, match=r"gradient of 0\.weight is vanishing"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[cb.GradientMonitor(every_n_steps=1)])


def test_a_nonfinite_gradient_stops_training_with_the_layer_named(blobs):
    x, y = blobs
    x = x.copy()
    x[45] = float("nan")
    history = make_model().fit(
        x, y, epochs=3, batch_size=40, shuffle=False, verbose=0,
        callbacks=[cb.GradientMonitor(every_n_steps=1, stop_on_nonfinite=True)],
    )  # fmt: skip
    assert (
        history.stop_reason
        == "GradientMonitor: the gradient of 0.weight is nan at epoch 1, batch 1"
    )
    assert history.epoch == [0]


def test_norms_reach_tensorboard_through_the_logs(blobs, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = blobs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_model().fit(
            x, y, epochs=2, verbose=0,
            callbacks=[cb.GradientMonitor(every_n_steps=2), cb.TensorBoard(tmp_path)],
        )  # fmt: skip
    events = EventAccumulator(str(tmp_path / "train"))
    events.Reload()
    assert {"epoch_grad_norm", "epoch_grad_norm/0.weight", "epoch_update_ratio/2.weight"} <= set(
        events.Tags()["scalars"]
    )
    assert len(events.Scalars("epoch_grad_norm/0.weight")) == 2
