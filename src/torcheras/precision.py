"""Mixed precision and gradient clipping: autocast, GradScaler, unscale, clip, step.

One :class:`Precision` per compiled model. ``"32"`` does nothing extra; ``"bf16-mixed"``
runs the forward pass and the loss under ``torch.autocast`` in bfloat16; ``"16-mixed"`` in
float16 with a ``torch.amp.GradScaler`` (its state is part of ``model.save`` and of backups).
Clipping has Keras's names and meaning and never reads a value back to the host.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

__all__ = ["PRECISIONS", "Precision"]

PRECISIONS = ("32", "bf16-mixed", "16-mixed")
_NO_AUTOCAST = contextlib.nullcontext()
_ALIASES = {
    32: "32",
    "32-true": "32",
    "float32": "32",
    "bf16": "bf16-mixed",
    "mixed_bfloat16": "bf16-mixed",  # Keras's policy names
    "16": "16-mixed",
    16: "16-mixed",
    "mixed_float16": "16-mixed",
}


def _check_positive(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"`{name}` must be a positive number or None; got {value!r}.")
    return float(value)


class Precision:
    """Autocast, loss scaling and clipping for one device.

    Args:
        precision: ``"32"``, ``"bf16-mixed"`` or ``"16-mixed"`` (Keras's ``"mixed_bfloat16"``
            and ``"mixed_float16"`` are accepted too).
        device: the device the model trains on.
        clipnorm: clip each parameter's gradient to this L2 norm (Keras's ``clipnorm``).
        global_clipnorm: clip all gradients together to this global L2 norm.
        clipvalue: clip every gradient element to ``[-clipvalue, clipvalue]``.

    Example:
        ```python
        precision = Precision("16-mixed", torch.device("cuda"), global_clipnorm=1.0)
        with precision.autocast():
            loss = loss_fn(net(x), y)
        precision.backward(loss)
        precision.unscale(optimizer)
        precision.clip(optimizer)
        precision.step(optimizer)
        ```
    """

    def __init__(
        self,
        precision: str | int = "32",
        device: torch.device | str = "cpu",
        *,
        clipnorm: float | None = None,
        global_clipnorm: float | None = None,
        clipvalue: float | None = None,
    ) -> None:
        mode = _ALIASES.get(precision, precision)
        if mode not in PRECISIONS:
            raise ValueError(
                f"`precision` must be one of {', '.join(repr(p) for p in PRECISIONS)}; "
                f"got {precision!r}."
            )
        given = [n for n, v in (("clipnorm", clipnorm), ("global_clipnorm", global_clipnorm),
                                ("clipvalue", clipvalue)) if v is not None]  # fmt: skip
        if len(given) > 1:
            raise ValueError(
                f"Set one of clipnorm, global_clipnorm and clipvalue; got {' and '.join(given)}. "
                "(Keras would apply only the first and ignore the others silently.)"
            )
        self.mode = mode
        self.device = torch.device(device)
        self.clipnorm = _check_positive("clipnorm", clipnorm)
        self.global_clipnorm = _check_positive("global_clipnorm", global_clipnorm)
        self.clipvalue = _check_positive("clipvalue", clipvalue)
        self.dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(mode)
        self.scaler = torch.amp.GradScaler(self.device.type) if mode == "16-mixed" else None
        self._unscaled: set[int] = set()

    @property
    def mixed(self) -> bool:
        return self.dtype is not None

    @property
    def clips(self) -> bool:
        """Whether gradients are clipped (``clipnorm``, ``global_clipnorm`` or ``clipvalue``)."""
        return (
            self.clipnorm is not None
            or self.global_clipnorm is not None
            or self.clipvalue is not None
        )

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward pass and the loss run in the mixed dtype (nothing happens for ``"32"``)."""
        if self.dtype is None:
            return _NO_AUTOCAST
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: Tensor) -> None:
        """``loss.backward()``, scaled first under ``"16-mixed"``."""
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the loss scale (once per step): hooks and clipping then see
        the true gradients."""
        if self.scaler is not None and id(optimizer) not in self._unscaled:
            self.scaler.unscale_(optimizer)
            self._unscaled.add(id(optimizer))

    def clip(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip the optimizer's gradients as configured, on the device, without a sync."""
        if not self.clips:
            return
        self.unscale(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        if self.clipvalue is not None:
            torch._foreach_clamp_min_(grads, -self.clipvalue)
            torch._foreach_clamp_max_(grads, self.clipvalue)
        elif self.global_clipnorm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.global_clipnorm)
        else:  # Keras's clip_by_norm, each tensor on its own: g * c / max(||g||, c)
            clip = self.clipnorm
            norms = torch._foreach_norm(grads)
            factors = [clip / torch.clamp(n.float(), min=clip) for n in norms]  # type: ignore[operator]
            torch._foreach_mul_(grads, [f.to(g.dtype) for f, g in zip(factors, grads)])

    def step(self, optimizer: torch.optim.Optimizer, step_fn: Any = None) -> None:
        """Apply the gradients: ``optimizer.step()``, or the scaler's step and update."""
        if self.scaler is None:
            (step_fn or optimizer.step)()
            return
        self.scaler.step(optimizer)
        self.scaler.update()
        self._unscaled.discard(id(optimizer))
