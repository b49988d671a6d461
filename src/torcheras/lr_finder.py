"""The learning-rate range test (Leslie Smith): raise the rate geometrically batch after batch,
watch the loss, suggest a rate; leave the model exactly as it was.

``Model.find_learning_rate`` is the entry point.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from torcheras import data, optimizers, plots, tensors
from torcheras.loop_state import LoopState
from torcheras.state import capture_model_state, restore_model_state, rng_state, set_rng_state
from torcheras.stepping import Stepping

__all__ = ["LearningRateFinderResult", "find_learning_rate"]

RULE = (
    "a tenth of the rate at which the smoothed loss is lowest (Smith's rule: an order of "
    "magnitude below where the loss stops falling; the steepest-slope rule is too sensitive to "
    "batch noise)"
)


@dataclass
class LearningRateFinderResult:
    """What the sweep saw: ``learning_rates`` and the ``losses`` at each (raw and smoothed),
    the ``suggestion`` and the ``rule`` that chose it, and why the sweep ended."""

    learning_rates: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float | None
    rule: str = RULE
    stopped: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def plot(self, path: str | os.PathLike[str] | None = None) -> Any:
        """Loss against learning rate (log axis), the suggestion marked; saved to ``path``
        when given. Returns the matplotlib ``Figure``."""
        from matplotlib.figure import Figure

        figure = Figure(figsize=(6.4, 4.2), layout="constrained")
        ax = figure.subplots()
        ax.plot(self.learning_rates, self.losses, color="tab:blue", alpha=0.35, label="loss")
        ax.plot(self.learning_rates, self.smoothed, color="tab:blue", label="smoothed loss")
        if self.suggestion is not None:
            ax.axvline(self.suggestion, color="tab:green", linestyle=":",
                       label=f"suggested {self.suggestion:.2e}")  # fmt: skip
        ax.set_xscale("log")
        skip = max(1, len(self.smoothed) // 10)
        settled = [v for v in self.smoothed[skip:] if math.isfinite(v)]
        if settled:  # the divergence at the end would squash the interesting part
            low = min(settled)
            high = max(settled[: settled.index(low) + 1])
            pad = 0.15 * (high - low) + 1e-6 * abs(high)
            ax.set_ylim(low - pad, high + 2 * pad)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        ax.set_title("Learning-rate range test\n(suggested: a tenth of the rate at the lowest "
                     "smoothed loss)", fontsize="medium")  # fmt: skip
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
        if path is not None:
            plots.save_figure(figure, path)
        return figure


def suggest(learning_rates: list[float], smoothed: list[float]) -> float | None:
    """A tenth of the rate where the smoothed loss is lowest (the first tenth of the sweep,
    where the smoothing has not settled, is not considered); None when the loss never fell
    below where it started."""
    values = np.asarray(smoothed, dtype=np.float64)
    skip = max(1, len(values) // 10)
    if len(values) - skip < 2 or not np.isfinite(values[skip:]).any():
        return None
    lowest = int(np.nanargmin(np.where(np.isfinite(values), values, np.nan)[skip:])) + skip
    if values[lowest] >= values[skip]:
        return None
    return float(learning_rates[lowest]) / 10


def _passes(source: Any) -> Any:
    """The source's batches, pass after pass (each pass reshuffled), for as long as asked."""
    while True:
        yielded = False
        for batch in source.batches(source.new_order()):
            yielded = True
            yield batch
        if not yielded:
            return


def find_learning_rate(
    model: Any,
    x: Any,
    y: Any = None,
    *,
    batch_size: int | None = None,
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    num_steps: int = 200,
    smoothing: float = 0.98,
    divergence_factor: float = 4.0,
) -> LearningRateFinderResult:
    """See :meth:`torcheras.Model.find_learning_rate`."""
    if model.optimizer is None:
        raise ValueError("find_learning_rate needs an optimizer: compile(optimizer=...) first.")
    if not 0 < min_lr < max_lr:
        raise ValueError(f"Need 0 < min_lr < max_lr; got min_lr={min_lr}, max_lr={max_lr}.")
    num_steps = data.as_int(num_steps, "num_steps", minimum=3)
    source = data.make_source(x, y, batch_size=batch_size, shuffle=True, name="x")
    saved_model = tensors.snapshot(capture_model_state(model))
    saved_rng = rng_state()
    saved_loop, saved_stepping, saved_training = model.loop, model._stepping, model.training
    saved_flags = (model.stop_training, model._check_first_batch)
    saved_grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
    rates = np.geomspace(min_lr, max_lr, num_steps).tolist()
    losses: list[float] = []
    smoothed: list[float] = []
    stopped = f"all {num_steps} steps ran"
    stage = data.DeviceStager(model.device)
    try:
        model.loop = LoopState()
        model._stepping = Stepping(model, model.loop)
        model._check_first_batch = True
        model.train()
        average, best = 0.0, math.inf
        for step, batch in zip(range(num_steps), _passes(source)):
            optimizers.set_learning_rate(model.optimizer, rates[step])
            logs = model.train_step(stage(batch))
            loss = float(logs["loss"].detach())  # the sweep reads each loss: a diagnostic
            losses.append(loss)
            average = smoothing * average + (1 - smoothing) * loss
            smoothed.append(average / (1 - smoothing ** (step + 1)))  # bias-corrected
            if not math.isfinite(loss) or smoothed[-1] > divergence_factor * best:
                stopped = f"the loss diverged at rate {rates[step]:.2e}"
                break
            best = min(best, smoothed[-1])
    finally:
        restore_model_state(model, saved_model, "The state before the sweep", "")
        set_rng_state(saved_rng)
        model.loop, model._stepping = saved_loop, saved_stepping
        model.train(saved_training)
        model.stop_training, model._check_first_batch = saved_flags
        for param, grad in zip(model.parameters(), saved_grads):
            param.grad = grad
        for metric in model.metrics:
            metric.reset()
    tried = rates[: len(losses)]
    return LearningRateFinderResult(
        tried, losses, smoothed, suggest(tried, smoothed), stopped=stopped
    )
