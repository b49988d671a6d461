"""find_learning_rate: a sensible suggestion, and everything left exactly as it was."""

from __future__ import annotations

import copy
import io
import random

import numpy as np
import pytest
import torch
from conftest import make_model


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")
def test_the_sweep_leaves_model_optimizer_scheduler_gradients_and_rng_untouched(blobs):
    x, y = blobs
    model = make_model(optimizer="adam", ema_momentum=0.9)
    model.fit(x, y, epochs=1, verbose=0)  # Adam's moments and the average exist
    model.scheduler = torch.optim.lr_scheduler.StepLR(model.optimizer, step_size=3, gamma=0.5)
    model.scheduler.step()
    before = {
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": copy.deepcopy(model.optimizer.state_dict()),
        "scheduler": model.scheduler.state_dict(),
        "ema": [a.clone() for a in model.ema.average],
        "grads": [p.grad.clone() for p in model.parameters()],
    }
    torch_rng, numpy_rng, python_rng = (
        torch.get_rng_state(),
        np.random.get_state(),
        random.getstate(),
    )
    found = model.find_learning_rate(x, y, batch_size=16, num_steps=60, max_lr=100.0)
    assert len(found.losses) > 10
    for key, value in before["weights"].items():
        assert torch.equal(model.state_dict()[key], value), key
    after = model.optimizer.state_dict()
    assert after["param_groups"] == before["optimizer"]["param_groups"]
    for index, state in before["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(after["state"][index][name], value), (index, name)
    assert model.scheduler.state_dict() == before["scheduler"]
    assert all(torch.equal(a, b) for a, b in zip(model.ema.average, before["ema"]))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before["grads"]))
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert np.array_equal(np.random.get_state()[1], numpy_rng[1])
    assert random.getstate() == python_rng
    assert model.training  # and fit goes on as if nothing happened
    model.fit(x, y, epochs=1, verbose=0)


def regression() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32))[:, None]
    return x, y


def test_the_suggestion_is_where_the_loss_falls_fastest_and_the_plot_shows_it(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    x, y = regression()
    model = make_model(n_in=4, n_out=1, loss="mse", metrics=[], optimizer="sgd")
    found = model.find_learning_rate(x, y, batch_size=16, num_steps=100, max_lr=100.0)
    assert found.stopped.startswith("the loss diverged")  # SGD on MSE: far too much by 100
    assert found.learning_rates[0] == pytest.approx(1e-7)
    lowest = int(np.argmin(found.smoothed[10:])) + 10
    assert found.suggestion == pytest.approx(found.learning_rates[lowest] / 10)
    assert 1e-3 < found.suggestion < 0.5
    assert "a tenth of the rate" in found.rule
    # the suggestion trains well from scratch: better than a rate 100x smaller
    losses = {}
    for rate in (found.suggestion, found.suggestion / 100):
        torch.manual_seed(0)
        trial = make_model(n_in=4, n_out=1, loss="mse", metrics=[], optimizer="sgd",
                           learning_rate=rate)  # fmt: skip
        losses[rate] = trial.fit(x, y, epochs=3, batch_size=16, verbose=0).history["loss"][-1]
    assert losses[found.suggestion] < losses[found.suggestion / 100] / 2
    found.plot(tmp_path / "lr.png")
    assert Image.open(io.BytesIO((tmp_path / "lr.png").read_bytes())).format == "PNG"


def test_bad_ranges_are_refused(blobs):
    x, y = blobs
    with pytest.raises(ValueError, match="min_lr < max_lr"):
        make_model().find_learning_rate(x, y, min_lr=1.0, max_lr=0.1)
