"""Keras's optimizers on torch: each Keras name (``"adam"``, ``"rmsprop"``, ``"sgd"``, ...) is
a ``torch.optim.Optimizer`` that follows Keras 3's update formula and defaults; a
``torch.optim`` instance passed to ``compile`` keeps torch's meaning."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from torcheras.registry import lookup

__all__ = [
    "OPTIMIZERS",
    "KerasAdadelta",
    "KerasAdagrad",
    "KerasAdam",
    "KerasAdamW",
    "KerasAdamax",
    "KerasLion",
    "KerasNadam",
    "KerasRMSprop",
    "KerasSGD",
    "get",
    "get_learning_rate",
    "set_learning_rate",
]


def _rate(group: dict[str, Any]) -> float:
    lr = group["lr"]
    return float(lr.item() if isinstance(lr, torch.Tensor) else lr)


def _zero_as_int(value: float) -> float:
    """0 for a zero setting: torch's steps run measurably slower with a float 0.0 momentum or
    weight decay than with torch's own int 0 default (~1% of a small network's SGD step)."""
    return value if value else 0


def _buckets(params: Iterable[torch.Tensor], owner: str) -> list[list[torch.Tensor]]:
    """The parameters that have a gradient, by device and dtype (one foreach call each)."""
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(f"{owner} does not support sparse gradients.")
        buckets.setdefault((p.device, p.dtype), []).append(p)
    return list(buckets.values())


@torch.no_grad()
def _decay(optimizer: torch.optim.Optimizer) -> list[float]:
    """Keras's weight decay, decoupled and before the update: ``w -= w * wd * lr``. Returns
    each group's ``weight_decay`` and sets it to 0 for torch's step (torch's is L2)."""
    saved = []
    for group in optimizer.param_groups:
        saved.append(wd := group["weight_decay"])
        if wd:
            for ps in _buckets(group["params"], type(optimizer).__name__):
                torch._foreach_mul_(ps, 1 - _rate(group) * wd)
        group["weight_decay"] = 0.0
    return saved


def _torch_step(cls: type[torch.optim.Optimizer]) -> Callable[..., Any]:
    """torch's ``cls.step`` without the profiling wrapper torch puts on each optimizer class
    it builds: our subclass's own step is wrapped already, and a second wrapper would add a
    record_function and the hooks' bookkeeping to every step (~10 us)."""
    step = cls.step
    return step.__wrapped__ if getattr(step, "hooked", False) else step  # type: ignore[attr-defined]


# torch's steps, unwrapped once (our subclasses' steps carry the profiling wrapper)
_ADAM_STEP = _torch_step(torch.optim.Adam)
_SGD_STEP = _torch_step(torch.optim.SGD)
_ADAGRAD_STEP = _torch_step(torch.optim.Adagrad)
_ADADELTA_STEP = _torch_step(torch.optim.Adadelta)


def _decayed_torch_step(
    optimizer: torch.optim.Optimizer, step: Callable[..., Any], closure: Callable[[], Any] | None,
    eps: float | None = None,
) -> Any:  # fmt: skip
    """torch's ``step`` after Keras's decoupled weight decay, each group's epsilon set to
    ``eps`` for torch's step only (Adagrad's 0). Without weight decay it is torch's step
    itself, closure included, plus a loop over the groups."""
    groups = optimizer.param_groups
    decays = None
    for group in groups:
        if group["weight_decay"]:  # the gradients first, then the decay, then the update
            loss, closure = _closure_loss(closure), None
            decays = _decay(optimizer)
            break
    epsilons = None
    if eps is not None:
        epsilons = [group["eps"] for group in groups]
        for group in groups:
            group["eps"] = eps
    try:
        result = step(optimizer, closure)
    finally:
        if decays is not None:
            for group, wd in zip(groups, decays):
                group["weight_decay"] = wd
        if epsilons is not None:
            for group, kept in zip(groups, epsilons):
                group["eps"] = kept
    return result if decays is None else loss


def _closure_loss(closure: Callable[[], Any] | None) -> Any:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class KerasAdam(torch.optim.Adam):
    """Adam with Keras's update formula: epsilon added to ``sqrt(v)`` before the bias
    correction, ``w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``, where torch
    adds it after (``sqrt(v / (1 - b2^t)) + eps``). The two differ by ~1e-3 in the weights
    after 100 steps with Keras's ``eps=1e-7``; a Keras program ported with this one follows
    Keras's numbers. Keras's defaults, and torch's Adam otherwise (foreach, fused, amsgrad):
    each step runs torch's update with ``eps / sqrt(1 - b2^t)``, which is Keras's formula.
    ``weight_decay`` is Keras's, decoupled (``w -= w * wd * lr`` before the update: torch's
    ``decoupled_weight_decay=True``). Steps are counted per param group, as Keras counts
    iterations. ``"adam"`` by name is this class.

    Example:
        ```python
        model.compile(optimizer=torcheras.optimizers.KerasAdam(model.parameters()), loss="mse")
        ```
    """

    loads_state_of = ("Adam",)  # its state is torch's

    compilable_step = False  # jit_compile steps it eagerly (it changes its groups)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-7,
        weight_decay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("decoupled_weight_decay", True)
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=_zero_as_int(weight_decay), **kwargs
        )

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        # Keras's iteration count, per group, as a plain number (saved with the groups): no
        # read of torch's step tensor, which fused / capturable Adam keeps on the device.
        keras_eps = []
        for group in self.param_groups:
            keras_eps.append(group["eps"])
            if "keras_steps" not in group:  # new, or torch's Adam state loaded: its count
                steps = [self.state[p]["step"] for p in group["params"] if "step" in self.state[p]]
                group["keras_steps"] = int(max(steps)) if steps else 0
            group["keras_steps"] = t = group["keras_steps"] + 1
            group["eps"] = group["eps"] / math.sqrt(1 - group["betas"][1] ** t)
        try:
            return _ADAM_STEP(self, closure)
        finally:
            for group, eps in zip(self.param_groups, keras_eps):
                group["eps"] = eps


class KerasAdamW(KerasAdam):
    """Keras's AdamW: :class:`KerasAdam` with ``weight_decay=0.004``, decoupled. ``"adamw"``
    by name."""

    loads_state_of = ("AdamW",)  # its state is torch's

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.004,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(params, lr=lr, weight_decay=weight_decay, **kwargs)


class KerasSGD(torch.optim.SGD):
    """Keras's SGD: ``m = momentum * m - lr * g; w += m`` (nesterov: ``w += momentum * m -
    lr * g``), decoupled ``weight_decay``, ``lr=0.01``. ``"sgd"`` by name.

    torch keeps ``buf = momentum * buf + g; w -= lr * buf``: the same while the rate is
    constant, but a changed rate scales the whole history in torch and only the new gradient
    in Keras. This class runs torch's step (foreach, fused) and, when a group's rate changes,
    rescales its buffers once so that ``buf = -m / lr`` stays Keras's momentum; a rate of 0
    (where Keras's weights still coast on ``m``) is stepped here, in Keras's form.
    """

    loads_state_of = ("SGD",)  # its state is torch's

    compilable_step = False  # jit_compile steps it eagerly (it changes its groups)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            momentum=_zero_as_int(momentum),
            nesterov=nesterov and momentum > 0,
            weight_decay=_zero_as_int(weight_decay),
            **kwargs,
        )

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        # torch's step is Keras's update while no group decays and no momentum group's rate
        # changed since the last step (``keras_lr`` is the very float object of ``lr`` then:
        # an identity test, no value read, so a tensor rate always takes the full path).
        for group in self.param_groups:
            if group["weight_decay"] or (
                group["momentum"] and group["lr"] is not group.get("keras_lr")
            ):
                return self._keras_step(closure)
        return _SGD_STEP(self, closure)

    @torch.no_grad()
    def _keras_step(self, closure: Callable[[], Any] | None) -> Any:
        loss = _closure_loss(closure)
        decays = _decay(self)
        coasting = []  # groups at rate 0: stepped here, hidden from torch's step
        try:
            for group in self.param_groups:
                if not group["momentum"]:
                    continue
                lr, ref = _rate(group), group.get("keras_lr")
                if lr == 0:
                    coasting.append((group, group["params"]))
                    self._coast(group, ref)
                    group["params"] = []
                    continue
                if ref is not None and ref != lr:  # only when the rate changed
                    bufs = [
                        self.state[p]["momentum_buffer"]
                        for p in group["params"]
                        if self.state[p].get("momentum_buffer") is not None
                    ]
                    if bufs:
                        torch._foreach_mul_(bufs, ref / lr)
                group["keras_lr"] = lr
            _SGD_STEP(self)
        finally:
            for group, params in coasting:
                group["params"] = params
            for group, wd in zip(self.param_groups, decays):
                group["weight_decay"] = wd
        return loss

    def _coast(self, group: dict[str, Any], ref: float | None) -> None:
        momentum = group["momentum"]
        for ps in _buckets(group["params"], type(self).__name__):
            for p in ps:
                if self.state[p].get("momentum_buffer") is None:  # Keras's m = 0 - 0 * g
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in ps]
            torch._foreach_mul_(bufs, momentum)
            if ref:  # m = -ref * buf; w += m (nesterov: w += momentum * m)
                scale = ref * (momentum if group["nesterov"] else 1.0)
                torch._foreach_add_(ps, bufs, alpha=-scale)


class _KerasForeach(torch.optim.Optimizer):
    """A Keras update written with torch's foreach ops, one call per device and dtype.
    Per-parameter state under Keras's names, saved by ``state_dict``."""

    compilable_step = False  # jit_compile steps it eagerly (it changes its groups)

    def _state(self, p: torch.Tensor, name: str, fill: float = 0.0) -> torch.Tensor:
        state = self.state[p]
        if name not in state:
            state[name] = torch.full_like(p, fill, memory_format=torch.preserve_format)
        return state[name]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = _closure_loss(closure)
        for group in self.param_groups:
            group["keras_steps"] = group.get("keras_steps", 0) + 1
            lr, wd = _rate(group), group["weight_decay"]
            for ps in _buckets(group["params"], type(self).__name__):
                if wd:
                    torch._foreach_mul_(ps, 1 - lr * wd)
                self._update(group, ps, [p.grad for p in ps], lr)
        return loss

    def _update(self, group: dict[str, Any], ps: list, grads: list, lr: float) -> None:
        raise NotImplementedError


class KerasRMSprop(_KerasForeach):
    """Keras's RMSprop: ``v = rho * v + (1 - rho) * g^2; w -= lr * g / sqrt(v + eps)``, with
    epsilon inside the square root (torch adds it outside: a step of a 1e-4 gradient is ten
    times Keras's). ``centered`` subtracts the squared mean gradient inside the root;
    ``momentum`` keeps ``b = momentum * b + lr * g / sqrt(...)``, ``w -= b``. torch's argument
    names (``alpha`` is Keras's ``rho``), Keras's defaults. ``"rmsprop"`` by name.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        alpha: float = 0.9,
        eps: float = 1e-7,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
    ) -> None:
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                        momentum=momentum, centered=centered)  # fmt: skip
        super().__init__(params, defaults)

    def _update(self, group: dict[str, Any], ps: list, grads: list, lr: float) -> None:
        rho, eps, momentum = group["alpha"], group["eps"], group["momentum"]
        vs = [self._state(p, "velocity") for p in ps]
        torch._foreach_mul_(vs, rho)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - rho)
        if group["centered"]:
            avgs = [self._state(p, "average_gradient") for p in ps]
            torch._foreach_lerp_(avgs, grads, 1 - rho)
            denom = torch._foreach_addcmul(vs, avgs, avgs, value=-1)
            torch._foreach_add_(denom, eps)
        else:
            denom = torch._foreach_add(vs, eps)
        torch._foreach_sqrt_(denom)
        if momentum > 0:
            bufs = [self._state(p, "momentum") for p in ps]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_addcdiv_(bufs, grads, denom, value=lr)
            torch._foreach_sub_(ps, bufs)
        else:
            torch._foreach_addcdiv_(ps, grads, denom, value=-lr)


class KerasAdamax(_KerasForeach):
    """Keras's Adamax: ``u = max(b2 * u, |g|); w -= lr / (1 - b1^t) * m / (u + eps)`` (torch
    puts epsilon inside the max). Keras's defaults. ``"adamax"`` by name."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-7,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _update(self, group: dict[str, Any], ps: list, grads: list, lr: float) -> None:
        (b1, b2), t = group["betas"], group["keras_steps"]
        ms = [self._state(p, "m") for p in ps]
        us = [self._state(p, "u") for p in ps]
        torch._foreach_lerp_(ms, grads, 1 - b1)
        torch._foreach_mul_(us, b2)
        torch._foreach_maximum_(us, torch._foreach_abs(grads))
        denom = torch._foreach_add(us, group["eps"])
        torch._foreach_addcdiv_(ps, ms, denom, value=-lr / (1 - b1**t))


class KerasLion(_KerasForeach):
    """Keras's Lion (torch has none): ``w -= lr * sign(b1 * m + (1 - b1) * g); m = b2 * m +
    (1 - b2) * g``, ``lr=1e-3``, ``betas=(0.9, 0.99)``. ``"lion"`` by name."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    def _update(self, group: dict[str, Any], ps: list, grads: list, lr: float) -> None:
        b1, b2 = group["betas"]
        ms = [self._state(p, "momentum") for p in ps]
        update = torch._foreach_lerp(ms, grads, 1 - b1)
        torch._foreach_sign_(update)
        torch._foreach_add_(ps, update, alpha=-lr)
        torch._foreach_lerp_(ms, grads, 1 - b2)


class KerasAdagrad(torch.optim.Adagrad):
    """Keras's Adagrad: ``a += g^2; w -= lr * g / sqrt(a + eps)``, ``a`` from 0.1 (torch adds
    epsilon outside the root). torch's step (foreach, fused) keeps ``a + eps`` as its ``sum``
    and runs with epsilon 0, which is Keras's formula. Decoupled ``weight_decay``. ``"adagrad"``
    by name."""

    compilable_step = False  # jit_compile steps it eagerly (it changes its groups)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        initial_accumulator_value: float = 0.1,
        eps: float = 1e-7,
        weight_decay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            initial_accumulator_value=initial_accumulator_value + eps,
            eps=eps,
            weight_decay=_zero_as_int(weight_decay),
            **kwargs,
        )
        for group in self.param_groups:
            group["initial_accumulator_value"] = initial_accumulator_value

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        return _decayed_torch_step(self, _ADAGRAD_STEP, closure, eps=0.0)


class KerasAdadelta(torch.optim.Adadelta):
    """Keras's Adadelta, which is torch's formula, with Keras's defaults (``lr=1e-3``,
    ``rho=0.95``, ``eps=1e-7``) and decoupled ``weight_decay``. ``"adadelta"`` by name."""

    loads_state_of = ("Adadelta",)  # its state is torch's

    compilable_step = False  # jit_compile steps it eagerly (it changes its groups)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        rho: float = 0.95,
        eps: float = 1e-7,
        weight_decay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params, lr=lr, rho=rho, eps=eps, weight_decay=_zero_as_int(weight_decay), **kwargs
        )

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        return _decayed_torch_step(self, _ADADELTA_STEP, closure)


class KerasNadam(torch.optim.NAdam):
    """Keras's Nadam: torch's NAdam with Keras's momentum schedule ``mu_t = b1 * (1 - 0.5 *
    0.96^t)`` (torch's default is ``0.96^(0.004 t)``: ``momentum_decay=1``), ``eps=1e-7``,
    ``lr=1e-3`` and decoupled ``weight_decay``. ``"nadam"`` by name."""

    loads_state_of = ("NAdam",)  # its state is torch's

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-7,
        weight_decay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("momentum_decay", 1.0)
        kwargs.setdefault("decoupled_weight_decay", True)
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=_zero_as_int(weight_decay), **kwargs
        )


# name -> (class, Keras's defaults expressed in the class's argument names). Each Keras name
# follows Keras's update formula; "radam" is not a Keras optimizer and stays torch's.
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "adam": (KerasAdam, {}),
    "adamw": (KerasAdamW, {}),
    "sgd": (KerasSGD, {}),
    "rmsprop": (KerasRMSprop, {}),
    "adagrad": (KerasAdagrad, {}),
    "adadelta": (KerasAdadelta, {}),
    "adamax": (KerasAdamax, {}),
    "nadam": (KerasNadam, {}),
    "lion": (KerasLion, {}),
    "radam": (torch.optim.RAdam, {"lr": 1e-3}),
}


def _accepts_fused(cls: type) -> bool:
    return any(
        "fused" in inspect.signature(k.__init__).parameters
        for k in cls.__mro__
        if isinstance(k, type) and issubclass(k, torch.optim.Optimizer)
    )


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
    'KerasAdam'
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
        if fused and _accepts_fused(cls):
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
