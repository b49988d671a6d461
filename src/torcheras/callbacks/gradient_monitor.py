"""GradientMonitor: per-layer gradient health, computed on the device, named when it fails."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from torcheras import distributed
from torcheras.callbacks.callback import Callback

__all__ = ["GradientMonitor"]


class GradientMonitor(Callback):
    """Gradient norms per layer (and weight norms, update / weight ratios) every
    ``every_n_steps`` optimizer steps, added to the logs and so to History, CSVLogger,
    TensorBoard and the progress bar; warnings that name the layer when its gradients explode,
    vanish or stop being finite; optionally a stop.

    Norms are taken where the gradients are complete: after the last backward of an
    accumulation group, unscaled under ``"16-mixed"``, and (under torchrun) after DDP's
    all-reduce, so every rank sees the same values. They are computed on the device in one
    batched call; the checks read them back once per sampled step (one synchronisation every
    ``every_n_steps`` steps, none in between).

    Logs (running means over the sampled steps of each epoch): ``grad_norm`` (all
    parameters), and per parameter tensor ``grad_norm/<name>``, ``weight_norm/<name>`` and
    ``update_ratio/<name>`` (``|w_after - w_before| / |w_before|`` of the step; around 1e-3 is
    the usual healthy order).

    Args:
        every_n_steps: sample every N optimizer steps (the first step of a fit included).
        per_layer: log each parameter tensor (``False``: the overall ``grad_norm`` only).
        weights: also log weight norms and update ratios.
        explode_threshold: warn when a layer's gradient norm exceeds it.
        vanish_threshold: warn when a layer's gradient norm falls below it (exactly zero
            included: a dead layer).
        stop_on_nonfinite: stop training (``History.stop_reason`` names the layer) when a
            gradient is NaN or infinite; otherwise warn.

    Example:
        ```python
        model.fit(x, y, epochs=10, callbacks=[GradientMonitor(every_n_steps=20)])
        ```
    """

    state_key_attributes = ("every_n_steps",)

    def __init__(
        self,
        every_n_steps: int = 50,
        per_layer: bool = True,
        weights: bool = True,
        explode_threshold: float = 1e3,
        vanish_threshold: float = 1e-7,
        stop_on_nonfinite: bool = False,
    ) -> None:
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(
                f"GradientMonitor: `every_n_steps` must be a positive integer; got "
                f"{every_n_steps!r}."
            )
        self.every_n_steps = every_n_steps
        self.per_layer = per_layer
        self.weights = weights
        self.explode_threshold = explode_threshold
        self.vanish_threshold = vanish_threshold
        self.stop_on_nonfinite = stop_on_nonfinite
        self._steps = 0
        self._warned: set[tuple[str, str]] = set()
        self._before: list[torch.Tensor] | None = None
        self._weight_norms: list[torch.Tensor] = []
        self._sampled: list[tuple[str, torch.nn.Parameter]] = []
        if not (weights and per_layer):  # no update ratios: no batch hook (none to agree on)
            self.unused_hooks = ("on_train_batch_end",)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._steps, self._warned, self._before = 0, set(), None
        self._named = [
            (name.removeprefix("module."), p)
            for name, p in self.model.named_parameters()
            if p.requires_grad
        ]

    def on_after_backward(self, batch: int) -> None:
        self._steps += 1
        if (self._steps - 1) % self.every_n_steps:
            return
        sampled = [(name, p) for name, p in self._named if p.grad is not None]
        if not sampled:
            return
        self._sampled = sampled
        grads = [p.grad.detach() for _, p in sampled]  # type: ignore[union-attr]
        norms = torch.stack(distributed.norms(grads))  # FSDP: over the whole parameters
        log = self.model.log
        log("grad_norm", torch.linalg.vector_norm(norms), 1)
        if self.per_layer:
            for (name, _), norm in zip(sampled, norms.unbind()):
                log(f"grad_norm/{name}", norm, 1)
        if self.weights and self.per_layer:  # weight norms now, update ratios after the step
            params = [p.detach() for _, p in sampled]
            self._before = [t.clone() for t in params]
            self._weight_norms = distributed.norms(params)
            for (name, _), norm in zip(sampled, self._weight_norms):
                log(f"weight_norm/{name}", norm, 1)
        self._check(sampled, norms.tolist(), batch)  # the one read per sampled step

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        before, self._before = self._before, None
        if before is None:
            return
        after = [p.detach() for _, p in self._sampled]
        changes = distributed.norms(torch._foreach_sub(after, before))
        for (name, _), change, size in zip(self._sampled, changes, self._weight_norms):
            self.model.log(f"update_ratio/{name}", (change / size.clamp_min(1e-12)).float(), 1)

    def _check(self, sampled: list[tuple[str, Any]], norms: list[float], batch: int) -> None:
        loop = getattr(self.model, "loop", None)
        where = f"epoch {loop.epoch + 1}, batch {batch}" if loop is not None else f"batch {batch}"
        clip = "Lower the learning rate or clip gradients (compile(global_clipnorm=1.0))"
        for (name, _), norm in zip(sampled, norms):
            if not math.isfinite(norm):
                message = f"the gradient of {name} is {norm} at {where}"
                if self.stop_on_nonfinite:
                    self.stop_training(message)
                    return
                self._warn(name, "nonfinite", f"{message}. {clip}, or look for NaN in the data.")
            elif norm > self.explode_threshold:
                limit = f"norm {norm:.3g} > {self.explode_threshold:g}"
                self._warn(name, "explode", f"the gradient of {name} is exploding: {limit} at "
                           f"{where}. {clip}.")  # fmt: skip
            elif norm < self.vanish_threshold:
                limit = f"norm {norm:.3g} < {self.vanish_threshold:g}"
                hint = "A dead activation (ReLU), saturation or a detached branch?"
                self._warn(name, "vanish", f"the gradient of {name} is vanishing: {limit} at "
                           f"{where}. {hint}")  # fmt: skip

    def _warn(self, name: str, kind: str, message: str) -> None:
        if (name, kind) not in self._warned:  # once per layer and kind in a fit
            self._warned.add((name, kind))
            warnings.warn(f"GradientMonitor: {message}", RuntimeWarning, stacklevel=3)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self._steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._steps = state["steps"]
