"""Ready learning-rate schedules for :class:`~torcheras.callbacks.LearningRateScheduler`.

Each returns ``schedule(epoch, lr=None) -> float`` (0-based epoch), so it also works per batch
with ``interval="batch"`` (then the argument is the global batch index).

Example:
    ```python
    from torcheras import schedules
    LearningRateScheduler(schedules.cosine_annealing(1e-3, total=50, warmup=5))
    ```
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["step_decay", "exponential_decay", "cosine_annealing"]

Schedule = Callable[..., float]


def _check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"`{name}` must be positive; got {value!r}.")


def step_decay(initial_lr: float, drop: float = 0.5, every: int = 10) -> Schedule:
    """``initial_lr * drop ** (epoch // every)``: halve the rate every 10 epochs by default."""
    _check_positive("initial_lr", initial_lr)
    _check_positive("every", every)

    def schedule(epoch: int, lr: float | None = None) -> float:
        return float(initial_lr * drop ** (epoch // every))

    return schedule


def exponential_decay(
    initial_lr: float, decay_rate: float = 0.96, decay_steps: int = 1, staircase: bool = False
) -> Schedule:
    """``initial_lr * decay_rate ** (epoch / decay_steps)``, as Keras's ExponentialDecay."""
    _check_positive("initial_lr", initial_lr)
    _check_positive("decay_steps", decay_steps)

    def schedule(epoch: int, lr: float | None = None) -> float:
        power = epoch // decay_steps if staircase else epoch / decay_steps
        return float(initial_lr * decay_rate**power)

    return schedule


def cosine_annealing(
    initial_lr: float, total: int, warmup: int = 0, min_lr: float = 0.0
) -> Schedule:
    """Linear warm-up over ``warmup`` steps, then a cosine from ``initial_lr`` to ``min_lr``."""
    _check_positive("initial_lr", initial_lr)
    _check_positive("total", total)
    if not 0 <= warmup < total:
        raise ValueError(f"`warmup` must be in [0, total); got warmup={warmup}, total={total}.")

    def schedule(epoch: int, lr: float | None = None) -> float:
        if epoch < warmup:
            return float(initial_lr * (epoch + 1) / warmup)
        progress = min(1.0, (epoch - warmup) / max(1, total - warmup))
        return float(min_lr + 0.5 * (initial_lr - min_lr) * (1 + math.cos(math.pi * progress)))

    return schedule
