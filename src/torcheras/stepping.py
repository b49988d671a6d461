"""The one home of the optimizer step: how the losses of ``fit`` become weight updates.

One :class:`Stepping` per ``fit`` (and one for steps run outside it) owns, in this order:

- wrapping for the ranks under torchrun, once per model: DistributedDataParallel
  (``strategy="auto"`` / ``"ddp"``), or FSDP2's ``fully_shard`` (``strategy="fsdp"``, at
  ``compile``: the optimizer must see the sharded parameters);
- accumulation groups: where a micro-batch falls, the short last group of an epoch, and
  no gradient synchronisation inside a group (DDP's ``no_sync``, FSDP's
  ``set_requires_gradient_sync(False)``) so that ranks reduce once per optimizer step;
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

from torcheras import data, distributed, tensors

__all__ = ["CompiledStep", "Stepping", "reshard", "shard_for_ranks", "wrap_for_ranks"]


def wrap_for_ranks(model: Any) -> nn.Module | None:
    """Under torchrun, wrap what ``forward`` runs in DistributedDataParallel, once per model:
    the wrapped module, or the model itself when it is a subclass with its own ``forward``.
    A custom ``train_step`` gets synchronised gradients as long as it calls
    ``self.call_on(x)`` (or ``self(x)`` on a wrapping Model) rather than submodules."""
    if model._ddp is not None or model._fsdp is not None or not distributed.is_active():
        return model._ddp
    from torch.nn.parallel import DistributedDataParallel

    target = _root(model)
    ids = [model.device.index] if model.device.type == "cuda" else None
    model.__dict__["_ddp"] = DistributedDataParallel(target, device_ids=ids)  # not a submodule
    return model._ddp


def _root(model: Any) -> nn.Module:
    """What ``forward`` runs: the wrapped module, or a subclass with its own ``forward``."""
    module = model._modules.get("module")
    return module if module is not None and not model._has_own_forward() else model


def shard_for_ranks(model: Any, strategy: distributed.FSDP) -> nn.Module | None:
    """``compile(strategy="fsdp")`` under torchrun: ``fully_shard`` the blocks, then what
    ``forward`` runs (see :class:`torcheras.distributed.FSDP`), once per model, before the
    optimizer is made. In one process, nothing (returns None)."""
    if model._fsdp is not None:
        return model._fsdp
    if not distributed.is_active():
        return None
    if model._ddp is not None:
        raise ValueError(
            "This model was already trained with DistributedDataParallel: FSDP shards the "
            "parameters in place, and DDP's buckets point at them. Build the model anew, then "
            "compile(strategy='fsdp') before the first fit."
        )
    root = strategy.shard(_root(model), model.precision.dtype)
    model.__dict__["_fsdp"] = root  # not a submodule: the root is the model or its module
    return root


def reshard(model: Any) -> None:
    """After a pass without backward (evaluate, predict, summary) under FSDP: free the
    gathered parameters that ``reshard_after_forward=False`` (and the root) keep for a
    backward that will not come, so every rank again holds only its shards."""
    if model._fsdp is None:
        return
    for module in model.modules():
        if hasattr(module, "reshard") and hasattr(module, "set_requires_gradient_sync"):
            module.reshard()


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

    The loop calls :meth:`start_epoch` and, after ``on_epoch_begin``, :meth:`choose_path`;
    then per training batch :meth:`place` before it, :meth:`run` for it and
    :meth:`end_batch` after it; and :meth:`end_epoch` after the epoch's last batch. The
    model's seams call :meth:`zero_grad` (``train_step``), :meth:`backward` and
    :meth:`apply` (``optimizer_step``). Counters and position live on ``loop``
    (``model.loop``), which callbacks read.
    """

    def __init__(self, model: Any, loop: Any, callbacks: Any = None) -> None:
        self.model = model
        self.loop = loop
        self.callbacks = callbacks  # for on_after_backward; dropped when fit ends
        self.accumulation: int = model.gradient_accumulation_steps
        self.ddp = model._ddp  # fit wraps the model first (wrap_for_ranks)
        self.fsdp = model._fsdp  # compile sharded it (shard_for_ranks)
        # Under torchrun, this rank's share of the global batch times the number of ranks:
        # DDP averages gradients over ranks, so uneven shards weigh by their sizes.
        self.rank_share = 1.0
        self.group_size = 1  # micro-batches in the current group (fewer for a short last one)
        self.open_group = False  # a backward ran in a group whose update is not applied yet
        self._fsdp_syncs = True  # FSDP reduces gradients in each backward (its default)
        # Nothing between backward and the optimizer's step (chosen per epoch, see
        # choose_path): backward is loss.backward(), the step optimizer.step().
        self.plain = False

    def choose_path(self) -> None:
        """At an epoch's start (after ``on_epoch_begin``): whether this epoch's steps are
        plain. One process, every batch a step, float32 or bfloat16 (no loss scale), no
        clipping, no weight average, no compiled step, no ``on_after_backward``: the step is
        then torch's own two calls, none of the stages above having anything to do. Settings
        are read here, so one changed by a batch hook takes effect from the next epoch."""
        self.plain = self._is_plain()

    def _is_plain(self) -> bool:
        model, precision = self.model, self.model.precision
        callbacks = self.callbacks
        return (
            self.accumulation == 1
            and self.ddp is None
            and self.fsdp is None
            and not distributed.is_active()
            and precision.scaler is None
            and not precision.clips
            and model.ema is None
            and model._compiled is None
            and model.optimizer is not None
            and (callbacks is None or not callbacks.needs("on_after_backward"))
        )

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
        """``train_step(batch)``; inside an accumulation group without the ranks' reduction
        (DDP's all-reduce, FSDP's reduce-scatter)."""
        if self.fsdp is not None:
            self._sync_fsdp(not self.loop.accumulating)
            return train_step(batch)
        if self.ddp is not None and self.loop.accumulating:
            with self.ddp.no_sync():
                return train_step(batch)
        return train_step(batch)

    def _sync_fsdp(self, sync: bool) -> None:
        if self.fsdp is not None and sync != self._fsdp_syncs:
            self.fsdp.set_requires_gradient_sync(sync)  # type: ignore[operator]
            self._fsdp_syncs = sync

    def end_batch(self) -> None:
        # FitLoop._run_plain_batches counts the same inline (no accumulation there): a
        # Python call a batch fewer
        loop = self.loop
        loop.global_step += 1
        if not loop.accumulating:
            loop.optimizer_steps += 1

    def end_epoch(self) -> None:
        """Apply the group the epoch (or a stop) cut short: the mean of its micro-batches."""
        loop = self.loop
        if not loop.accumulating:
            self._sync_fsdp(True)  # as FSDP's default between epochs and after fit
            return
        if self.open_group:
            loop.accumulating = False
            self.group_size = loop.micro_step + 1
            if self.ddp is not None:  # its micro-batches ran under no_sync: reduce them now
                distributed.average_(self._grads())
            if self.fsdp is not None:
                self._reduce_fsdp_group()
            self._scale_grads(self.accumulation / self.group_size)
            self._gradients_ready()
            self.model.optimizer_step()
            loop.optimizer_steps += 1
        loop.micro_step, loop.accumulating = 0, False
        self._sync_fsdp(True)

    # ---- the model's side ---------------------------------------------------------------------
    def zero_grad(self) -> None:
        """At the start of a group (every batch without accumulation); the gradients stay
        readable after the step until then."""
        optimizer = self.model.optimizer
        if optimizer is not None and self.loop.micro_step == 0:
            optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: Tensor) -> None:
        if self.plain:
            loss.backward()
            return
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
        if self.plain and optimizer is not None:
            optimizer.step()
            return
        if optimizer is None or self.loop.accumulating:
            return
        model.precision.clip(optimizer)
        compiled = model._compiled
        model.precision.step(optimizer, None if compiled is None else compiled.optimizer_step)
        if model.ema is not None:
            model.ema.update()
        self.open_group = False

    def _reduce_fsdp_group(self) -> None:
        """A group cut short under FSDP: its gradients wait, unsharded and unreduced, inside
        FSDP, which reduces them only in a backward. Run one that adds nothing: the last
        micro-batch again in eval mode (no dropout, no running statistics, no RNG drawn),
        its outputs times zero, with synchronisation on."""
        model, root = self.model, self.fsdp
        assert root is not None
        self._sync_fsdp(True)
        x, _, _ = data.unpack(self.loop.current_batch)
        was_training = model.training
        model.eval()
        try:
            with model.autocast():
                if isinstance(x, dict):
                    out = root(**x)
                elif isinstance(x, (tuple, list)):
                    out = root(*x)
                else:
                    out = root(x)
            leaves = [t for t in tensors.leaves(out) if t.requires_grad]
            zero = torch.stack([t.float().sum() for t in leaves]).sum() * 0.0
            model.precision.backward(zero)
        finally:
            model.train(was_training)

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
