"""Optimizer names to ``torch.optim`` optimizers, with Keras's default hyperparameters."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from torcheras.registry import lookup

__all__ = ["OPTIMIZERS", "KerasAdam", "get", "get_learning_rate", "set_learning_rate"]


class KerasAdam(torch.optim.Adam):
    """Adam with Keras's update formula: epsilon added to ``sqrt(v)`` before the bias
    correction, ``w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``, where torch
    adds it after (``sqrt(v / (1 - b2^t)) + eps``). The two differ by ~1e-3 in the weights
    after 100 steps with Keras's ``eps=1e-7``; a Keras program ported with this one follows
    Keras's numbers. Keras's defaults, and torch's Adam otherwise (foreach, fused, amsgrad):
    each step runs torch's update with ``eps / sqrt(1 - b2^t)``, which is Keras's formula.
    ``weight_decay`` is torch's (L2, added to the gradient); Keras's decay is decoupled, as
    ``decoupled_weight_decay=True`` gives (torch 2.7 and later). Steps are counted per param
    group, as Keras counts iterations.

    Example:
        ```python
        model.compile(optimizer=torcheras.optimizers.KerasAdam(model.parameters()), loss="mse")
        ```
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-7,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, **kwargs)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        # Keras's iteration count, per group, as a plain number (saved with the groups): no
        # read of torch's step tensor, which fused / capturable Adam keeps on the device.
        keras_eps = []
        for group in self.param_groups:
            keras_eps.append(group["eps"])
            group["keras_steps"] = t = group.get("keras_steps", 0) + 1
            group["eps"] = group["eps"] / math.sqrt(1 - group["betas"][1] ** t)
        try:
            return super().step(closure)
        finally:
            for group, eps in zip(self.param_groups, keras_eps):
                group["eps"] = eps


# name -> (class, Keras's defaults expressed in torch's argument names)
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "adam": (torch.optim.Adam, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-7}),
    "adamw": (
        torch.optim.AdamW,
        {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-7, "weight_decay": 0.004},
    ),
    "sgd": (torch.optim.SGD, {"lr": 0.01}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 1e-3, "alpha": 0.9, "eps": 1e-7}),
    "adagrad": (torch.optim.Adagrad, {"lr": 1e-3, "initial_accumulator_value": 0.1}),
    "adadelta": (torch.optim.Adadelta, {"lr": 1e-3, "rho": 0.95, "eps": 1e-7}),
    "adamax": (torch.optim.Adamax, {"lr": 1e-3, "eps": 1e-7}),
    "nadam": (torch.optim.NAdam, {"lr": 1e-3, "eps": 1e-7}),
    "radam": (torch.optim.RAdam, {"lr": 1e-3}),
}


def get(
    optimizer: str | torch.optim.Optimizer | Callable[[Iterable[Any]], torch.optim.Optimizer],
    parameters: Iterable[torch.nn.Parameter],
    learning_rate: float | None = None,
    *,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """An optimizer from a name, an instance, or a factory called with the parameters.

    ``fused``: a named optimizer uses torch's fused implementation where it has one (one
    kernel for all parameters; on CUDA).

    >>> net = torch.nn.Linear(2, 1)
    >>> type(get("adam", net.parameters())).__name__
    'Adam'
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        if learning_rate is not None:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate
        return optimizer
    if isinstance(optimizer, str):
        cls, defaults = lookup(
            OPTIMIZERS,
            optimizer,
            "optimizer",
            "a torch.optim.Optimizer instance or a callable taking the parameters "
            "(functools.partial(torch.optim.SGD, lr=0.1))",
        )
        kwargs = dict(defaults)
        if learning_rate is not None:
            kwargs["lr"] = learning_rate
        if fused and "fused" in inspect.signature(cls).parameters:
            kwargs["fused"] = True
        return cls(parameters, **kwargs)
    if callable(optimizer):
        result = optimizer(parameters)
        if not isinstance(result, torch.optim.Optimizer):
            raise TypeError(
                "`optimizer` was called with the model's parameters and returned "
                f"{type(result).__name__}, not a torch.optim.Optimizer."
            )
        if learning_rate is not None:
            for group in result.param_groups:
                group["lr"] = learning_rate
        return result
    raise TypeError(
        "`optimizer` must be a name such as 'adam', a torch.optim.Optimizer, or a callable taking "
        f"the parameters; got {type(optimizer).__name__}."
    )


def get_learning_rate(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the optimizer's first param group, as a float."""
    return float(optimizer.param_groups[0]["lr"])


def set_learning_rate(optimizer: torch.optim.Optimizer, value: float) -> None:
    """Set the learning rate, keeping the ratios between param groups.

    The one rule every setter follows (``model.learning_rate = ...``, ReduceLROnPlateau,
    LearningRateScheduler): the first group gets ``value`` and each other group is scaled by
    the same factor, so a backbone at a tenth of the head's rate stays at a tenth. When the
    first group's rate is 0 the ratios are unknown and every group gets ``value``. A rate
    kept as a tensor stays a tensor (filled in place).

    >>> net = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD([{"params": [net.weight], "lr": 1.0},
    ...                        {"params": [net.bias], "lr": 0.1}])
    >>> set_learning_rate(opt, 0.5); [g["lr"] for g in opt.param_groups]
    [0.5, 0.05]
    """
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"A learning rate must be a finite number >= 0; got {value!r}.")
    groups = optimizer.param_groups
    first = float(groups[0]["lr"])
    for i, group in enumerate(groups):
        new = value if i == 0 or first == 0 else float(group["lr"]) * (value / first)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(new)
        else:
            group["lr"] = new
