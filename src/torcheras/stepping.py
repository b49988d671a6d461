"""The one home of the optimizer step: how the losses of ``fit`` become weight updates.

One :class:`Stepping` per ``fit`` (and one for steps run outside it) owns, in this order:

- wrapping for the ranks (DistributedDataParallel under torchrun, once per model);
- accumulation groups: where a micro-batch falls, the short last group of an epoch, and
  ``no_sync`` inside a group so that ranks all-reduce once per optimizer step;
- loss scaling: a rank's share of an uneven global batch, the group's mean, the AMP scale;
- backward -> unscale -> ``on_after_backward`` -> clipping -> the optimizer step (eager or
  compiled) -> the weight average (EMA).

``Model.backward`` and ``Model.optimizer_step`` are thin public seams over it: a user who
overrides ``optimizer_step`` sees exactly one call per real optimizer step. ``jit_compile``
runs the forward pass and the loss through the same seams as the eager step
(``Model.call_on``, ``Model.compute_loss``), so DDP and a user's overrides hold there too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from torcheras import distributed

__all__ = ["CompiledStep", "Stepping", "wrap_for_ranks"]


def wrap_for_ranks(model: Any) -> nn.Module | None:
    """Under torchrun, wrap what ``forward`` runs in DistributedDataParallel, once per model:
    the wrapped module, or the model itself when it is a subclass with its own ``forward``.
    A custom ``train_step`` gets synchronised gradients as long as it calls
    ``self.call_on(x)`` (or ``self(x)`` on a wrapping Model) rather than submodules."""
    if model._ddp is not None or not distributed.is_active():
        return model._ddp
    from torch.nn.parallel import DistributedDataParallel

    module = model._modules.get("module")
    target = module if module is not None and not model._has_own_forward() else model
    ids = [model.device.index] if model.device.type == "cuda" else None
    model.__dict__["_ddp"] = DistributedDataParallel(target, device_ids=ids)  # not a submodule
    return model._ddp


class _LogBuffer:
    """Stands in for the epoch's log collector while the compiled step runs: what
    ``compute_loss`` logs (each output's loss, ``Model.log``) is kept here and handed to the
    collector after the call, so the graph never reads the collector's running sums (a guard
    on them would recompile it every batch)."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, Any, Any]] = []

    def log(self, name: str, value: Any, weight: Any = None) -> None:
        self.entries.append((name, value, weight))


class CompiledStep:
    """``compile(jit_compile=True)``: the train step through ``torch.compile``. The forward
    pass and the loss (``call_on`` and ``compute_loss``, whatever overrides them) are one
    graph, whose backward AOTAutograd compiles with it; the optimizer step is a second graph,
    with the learning rates kept as tensors so that a schedule changing them does not
    recompile it. ``forward`` is the model compiled alone, for evaluation and prediction."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.forward = torch.compile(model)
        self._compiled_forward_loss = torch.compile(self._forward_loss)
        self._logged = _LogBuffer()
        self._step: Callable[[], Any] | None = None
        self._step_of: torch.optim.Optimizer | None = None

    def _forward_loss(self, x: Any, y: Any, sample_weight: Any) -> tuple[Any, Tensor]:
        model = self.model
        with model.autocast():
            y_pred = model.call_on(x)
            loss = model.compute_loss(x, y, y_pred, sample_weight)
        return y_pred, loss

    def forward_loss(self, x: Any, y: Any, sample_weight: Any) -> tuple[Any, Tensor]:
        """The outputs and the loss of one batch, compiled. The first batch's check of the
        labels and outputs (the built-in ``compute_loss``'s) runs here, outside the graph."""
        model = self.model
        check, model._check_first_batch = model._check_first_batch, False
        collector, model._log_to = model._log_to, self._logged
        try:
            y_pred, loss = self._compiled_forward_loss(x, y, sample_weight)
        finally:
            model._log_to = collector
        entries, self._logged.entries = self._logged.entries, []
        if collector is not None:
            for name, value, weight in entries:
                collector.log(name, value, weight)
        if check and model.compiled_loss is not None and not model._overrides_compute_loss():
            model.compiled_loss.check(y_pred, y)
        return y_pred, loss

    def optimizer_step(self) -> None:
        optimizer = self.model.optimizer
        if optimizer is None:
            return
        if not getattr(optimizer, "compilable_step", True):
            # A Keras optimizer that adjusts its groups each step (KerasAdam's epsilon,
            # KerasSGD's momentum on a changed rate): compiled, it would recompile every step.
            optimizer.step()
            return
        if self._step_of is not optimizer:
            for group in optimizer.param_groups:
                if type(group["lr"]) is not Tensor:
                    group["lr"] = torch.tensor(float(group["lr"]))
            self._step, self._step_of = torch.compile(optimizer.step), optimizer
        self._step()  # type: ignore[misc]


class Stepping:
    """How one ``fit`` turns losses into optimizer steps (see the module's docstring).

    The loop calls :meth:`start_epoch`, then per training batch :meth:`place` before it,
    :meth:`run` for it and :meth:`end_batch` after it, and :meth:`end_epoch` after the
    epoch's last batch. The model's seams call :meth:`zero_grad` (``train_step``),
    :meth:`backward` and :meth:`apply` (``optimizer_step``). Counters and position live on
    ``loop`` (``model.loop``), which callbacks read.
    """

    def __init__(self, model: Any, loop: Any, callbacks: Any = None) -> None:
        self.model = model
        self.loop = loop
        self.callbacks = callbacks  # for on_after_backward; dropped when fit ends
        self.accumulation: int = model.gradient_accumulation_steps
        self.ddp = model._ddp  # fit wraps the model first (wrap_for_ranks)
        # Under torchrun, this rank's share of the global batch times the number of ranks:
        # DDP averages gradients over ranks, so uneven shards weigh by their sizes.
        self.rank_share = 1.0
        self.group_size = 1  # micro-batches in the current group (fewer for a short last one)
        self.open_group = False  # a backward ran in a group whose update is not applied yet

    # ---- the loop's side ----------------------------------------------------------------------
    def start_epoch(self) -> None:
        loop = self.loop
        loop.micro_step, loop.accumulating = 0, False
        self.group_size, self.open_group = 1, False

    def place(self, step: int, last_step: int | None) -> None:
        """Before a batch (with accumulation): its place in its group (``micro_step``), and
        whether it completes the group. The epoch's last batch (``last_step``, when the
        number of batches is known) completes a short one."""
        loop, n = self.loop, self.accumulation
        loop.micro_step = loop.micro_step + 1 if loop.accumulating else 0
        closes = loop.micro_step + 1 == n or step == last_step
        loop.accumulating = not closes
        self.group_size = loop.micro_step + 1 if closes else n

    def run(self, train_step: Callable[[Any], Any], batch: Any) -> Any:
        """``train_step(batch)``; inside an accumulation group without DDP's all-reduce."""
        if self.ddp is not None and self.loop.accumulating:
            with self.ddp.no_sync():
                return train_step(batch)
        return train_step(batch)

    def end_batch(self) -> None:
        loop = self.loop
        loop.global_step += 1
        if not loop.accumulating:
            loop.optimizer_steps += 1

    def end_epoch(self) -> None:
        """Apply the group the epoch (or a stop) cut short: the mean of its micro-batches."""
        loop = self.loop
        if not loop.accumulating:
            return
        if self.open_group:
            loop.accumulating = False
            self.group_size = loop.micro_step + 1
            if self.ddp is not None:  # its micro-batches ran under no_sync: reduce them now
                distributed.average_(self._grads())
            self._scale_grads(self.accumulation / self.group_size)
            self._gradients_ready()
            self.model.optimizer_step()
            loop.optimizer_steps += 1
        loop.micro_step, loop.accumulating = 0, False

    # ---- the model's side ---------------------------------------------------------------------
    def zero_grad(self) -> None:
        """At the start of a group (every batch without accumulation); the gradients stay
        readable after the step until then."""
        optimizer = self.model.optimizer
        if optimizer is not None and self.loop.micro_step == 0:
            optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: Tensor) -> None:
        loop, n = self.loop, self.accumulation
        if self.rank_share != 1.0:
            loss = loss * self.rank_share
        self.model.precision.backward(loss / n if n > 1 else loss)
        self.open_group = True
        if not loop.accumulating:
            if self.group_size < n:  # a short last group: the mean of its own micro-batches
                self._scale_grads(n / self.group_size)
            self._gradients_ready()

    def apply(self) -> None:
        """Clip, step (compiled or eager), update the weight average: one optimizer step."""
        model = self.model
        optimizer = model.optimizer
        if optimizer is None or self.loop.accumulating:
            return
        model.precision.clip(optimizer)
        compiled = model._compiled
        model.precision.step(optimizer, None if compiled is None else compiled.optimizer_step)
        if model.ema is not None:
            model.ema.update()
        self.open_group = False

    def _gradients_ready(self) -> None:
        optimizer = self.model.optimizer
        if optimizer is not None:
            self.model.precision.unscale(optimizer)
        callbacks = self.callbacks
        if callbacks is not None and callbacks.needs("on_after_backward"):
            callbacks.on_after_backward(self.loop.batch)

    def _grads(self) -> list[Tensor]:
        return [p.grad for p in self.model.parameters() if p.grad is not None]

    def _scale_grads(self, factor: float) -> None:
        grads = self._grads()
        if grads and factor != 1.0:
            torch._foreach_mul_(grads, factor)
