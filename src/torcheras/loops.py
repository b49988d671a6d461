"""The fit / evaluate / predict loops: Keras's hook order, resume positioning, log plumbing.

``Model`` holds the user's API and the steps a user overrides (``train_step``,
``optimizer_step``...); the loops here drive them. Nothing in a loop reads a value back from
the device per batch: logs stay on the device until a callback reads them (see ``logs.py``).
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from torcheras import checkpoint, data, distributed, optimizers, state, tensors
from torcheras.callbacks.callback_list import CallbackList
from torcheras.logs import LogCollector
from torcheras.loop_state import LoopState, StopFit

__all__ = ["evaluate", "fit", "hooks", "predict"]

# Predictions are moved to the host in chunks of about this many bytes (one sync per chunk).
PREDICT_CHUNK_BYTES = 256 * 2**20


@contextlib.contextmanager
def hooks(
    callbacks: CallbackList, phase: str, *, outermost: bool = True
) -> Iterator[dict[str, Any]]:
    """Pair ``on_{phase}_begin`` with ``on_{phase}_end`` (given ``result["logs"]``), or with
    ``on_exception`` when the body raises. The outermost pass also waits for the checkpoints
    still being written in the background: it returns, or its exception leaves, only once the
    last write has landed (a failed write raises here)."""
    result: dict[str, Any] = {}
    try:
        getattr(callbacks, f"on_{phase}_begin")()
        yield result
        getattr(callbacks, f"on_{phase}_end")(result.get("logs"))
    except BaseException as exc:
        if outermost:
            callbacks.on_exception(exc)
            checkpoint.wait_for_writes(during=exc)
        raise
    if outermost:
        checkpoint.wait_for_writes()
        distributed.barrier()  # no rank reads what rank 0 wrote before it has landed


def _should_validate(epoch: int, validation_freq: int | Sequence[int]) -> bool:
    if isinstance(validation_freq, numbers.Integral):  # checked by make_fit_sources
        return (epoch + 1) % validation_freq == 0
    return epoch + 1 in validation_freq


class FitLoop:
    """One ``fit``: epochs of training batches, validation, and resume from a backup."""

    def __init__(
        self,
        model: Any,
        train_source: Any,
        val_source: Any,
        callbacks: CallbackList,
        *,
        epochs: int,
        initial_epoch: int,
        validation_freq: int | Sequence[int],
        validation_steps: int | None,
    ) -> None:
        self.model = model
        self.train_source = train_source
        self.val_source = val_source
        self.callbacks = callbacks
        self.epochs = epochs
        self.initial_epoch = initial_epoch
        self.validation_freq = validation_freq
        self.validation_steps = validation_steps
        self.loop = LoopState()
        self.loop.train_source = train_source
        self.loop.callbacks = callbacks
        self.loop.collector = model._collector()
        rank, ranks = distributed.rank(), distributed.world_size()
        if ranks > 1:  # DataLoaders: each rank loads its own part
            seed = distributed.shared_seed()
            train_source.distribute(rank, ranks, training=True, seed=seed)
            if val_source is not None:
                val_source.distribute(rank, ranks, training=False, seed=seed)
        self.stage = data.DeviceStager(model.device)  # its pinned buffers serve the whole fit
        self.accumulation = getattr(model, "gradient_accumulation_steps", 1)
        self.steps_known = getattr(train_source, "steps", None)
        self.stopped_in_epoch = False  # a batch hook stopped training before the epoch's end

    def run(self) -> Any:
        try:
            return self._run()
        finally:
            self.model._log_to = None

    def _run(self) -> Any:
        model, loop, callbacks = self.model, self.loop, self.callbacks
        model.stop_training = False
        model.stop_reason = None
        model._initial_epoch = None
        model._check_first_batch = True
        model.loop = loop
        if model.optimizer is not None:
            model.optimizer.zero_grad(set_to_none=True)
        model._wrap_for_ranks()
        # A batch hook may stop training: then every rank agrees after each batch. Agreed
        # once, so that ranks whose callbacks differ still make the same collectives.
        self.agree_per_batch = distributed.agree(
            distributed.is_active()
            and (
                callbacks.declares("on_train_batch_begin")
                or callbacks.declares("on_train_batch_end")
            )
        )
        loop.interrupt, loop.on_interrupt = 0, None
        model._log_to = loop.collector  # Model.log's values join the epoch's logs
        with hooks(callbacks, "train") as result:
            # A signal on any rank (BackupAndRestore's) is voted on after every batch, one
            # batch late so that no rank waits. Set up after on_train_begin, which sets the
            # handler; agreed once, so that every rank votes at the same batches.
            votes = distributed.agree(distributed.is_active() and loop.on_interrupt is not None)
            self.vote = distributed.Vote() if votes else None
            initial_epoch, position = self._resume_or_start()
            result["logs"] = dict(loop.last_logs)
            try:
                for epoch in range(initial_epoch, self.epochs):
                    result["logs"] = self._epoch(epoch, position)
                    position = None
                    if loop.pending:
                        loop.run_pending()
                    if self.vote is not None:
                        self.vote.finish()  # superseded by the agreement just below
                    interrupt = distributed.agree_max(loop.interrupt)
                    if interrupt and loop.on_interrupt is not None:
                        loop.on_interrupt(interrupt)
                    model.stop_training = distributed.agree(model.stop_training)  # every rank
                    if model.stop_training:
                        break
            except StopFit:
                model.stop_training = True
            if model.ema is not None and model.ema.updates:  # Keras: fit ends on the average
                model.ema.finalize()
            model.history.stop_reason = self._stop_reason()
        return model.history

    def _stop_reason(self) -> str | None:
        """Why training stopped before its last epoch (None if it did not). Under torchrun,
        the first rank that gave a reason names it."""
        model, loop = self.model, self.loop
        reason = model.stop_reason
        if distributed.is_active():
            reasons = distributed.gather_objects(reason)
            given = [(r, why) for r, why in enumerate(reasons) if why]
            if reason is None and given:
                rank, why = given[0]
                reason = f"{why} (on process {rank})"
        if reason is None and model.stop_training:
            where = f"epoch {loop.epoch + 1}"
            if self.stopped_in_epoch:
                where += f", batch {loop.batch}"
            reason = f"stop_training was set at {where}"
        return reason

    def _resume_or_start(self) -> tuple[int, dict[str, Any] | None]:
        model, loop = self.model, self.loop
        resume = self.callbacks.take_resume_state()  # BackupAndRestore's, after train_begin
        if resume is None:
            if model._initial_epoch is not None:  # Keras's hook for callbacks that set it
                return model._initial_epoch, None
            return self.initial_epoch, None
        position = state.restore_training_state(
            model, self.callbacks, resume, resume.get("path", "backup")
        )
        loop.global_step = position["global_step"]
        loop.optimizer_steps = position.get("optimizer_steps", loop.global_step)
        loop.last_logs = dict(position.get("logs") or {})
        if "data" in position and hasattr(self.train_source, "load_state_dict"):
            self.train_source.load_state_dict(position["data"])
        return position["epoch"], position

    def _start_epoch(self, epoch: int, position: dict[str, Any] | None) -> tuple[Any, int]:
        """The epoch's sample order and first batch: fresh, or where a backup left it."""
        source, loop = self.train_source, self.loop
        source.set_epoch(epoch)  # a DistributedSampler's shuffle
        if position is None or position["epoch"] != epoch:
            return distributed.broadcast(source.new_order()), 0  # one order for every rank
        start = position["batch"]
        state.set_rng_state(position["rng"])
        if start == 0:  # an epoch boundary: draw the order from the restored RNG, as before
            return distributed.broadcast(source.new_order()), 0
        loop.collector.load_state_dict(position["collector"], self.model.device)
        loop.batch_lrs.extend(position.get("batch_lrs", []))
        return position["order"], start

    def _epoch(self, epoch: int, position: dict[str, Any] | None) -> dict[str, Any]:
        model, loop, callbacks = self.model, self.loop, self.callbacks
        collector: LogCollector = loop.collector
        collector.reset()
        loop.batch_lrs.clear()
        loop.epoch, loop.batch, loop.epoch_done = epoch, -1, False
        loop.micro_step, loop.group_size = 0, 1
        callbacks.on_epoch_begin(epoch)
        model.train()
        order, start = self._start_epoch(epoch, position)
        loop.order = order
        last = self._train_batches(self.train_source.batches(order, start), start)
        if last < 0 and start == 0 and not self.train_source.ran_out:
            raise ValueError("The training data yielded no batch: `x` is empty.")
        if loop.micro_step and model._uses_default_train_step():
            model._apply_partial_group()  # the epoch ended inside an accumulation group
            loop.optimizer_steps += 1
            loop.micro_step = 0
        for check in loop.end_of_batches:
            check()
        if self.train_source.ran_out:
            model.stop_training = True
            if model.stop_reason is None:
                model.stop_reason = (
                    f"the training data ran out in epoch {epoch + 1}: it holds fewer batches "
                    "than steps_per_epoch x epochs"
                )
        if distributed.is_active():
            collector.all_reduce(distributed.all_reduce_sum)  # global sums, not means of means
        logs = collector.result()
        if self.val_source is not None and _should_validate(epoch, self.validation_freq):
            val_logs = evaluate(
                model,
                self.val_source,
                callbacks,
                self.validation_steps,
                nested=True,
                stage=self.stage,
            )
            logs.update({f"val_{k}": v for k, v in val_logs.items()})
        if loop.batch_lrs:
            logs["learning_rate"] = float(loop.batch_lrs[-1])
        elif model.optimizer is not None:
            logs["learning_rate"] = optimizers.get_learning_rate(model.optimizer)
        logs = dict(sorted(logs.items()))
        loop.epoch_done, loop.last_logs = True, logs
        callbacks.on_epoch_end(epoch, logs)
        return logs

    def _train_batches(self, batches: Any, start: int) -> int:
        """Run the training batches of one epoch; the last batch index (start - 1 if none)."""
        model, loop, callbacks = self.model, self.loop, self.callbacks
        stage = self.stage
        needs_begin = callbacks.needs("on_train_batch_begin")
        needs_end = callbacks.needs("on_train_batch_end")
        train_step = model.train_step
        collector = loop.collector
        pending = loop.pending
        groups = None if model.optimizer is None else model.optimizer.param_groups
        batch_lrs = loop.batch_lrs
        accumulation = self.accumulation
        last_known = None if self.steps_known is None else self.steps_known - 1
        ranks = 1 if self.train_source.per_rank else distributed.world_size()
        rank = distributed.rank()
        agree_per_batch = self.agree_per_batch
        no_sync = None if model._ddp is None else model._ddp.no_sync
        loop.loss_scale = 1.0
        vote: distributed.Vote | None = self.vote
        interrupt = 0
        step = start - 1
        for step, batch in enumerate(batches, start):
            loop.batch = step
            if ranks > 1:  # this rank's part of the global batch; its loss counts its share
                size = data.batch_size_of(batch[0])
                batch = data.shard(batch, rank, ranks)
                loop.loss_scale = data.batch_size_of(batch[0]) * ranks / size
            if accumulation > 1:
                self._place_in_group(step, last_known)
            if needs_begin:
                callbacks.on_train_batch_begin(step)
            if groups is not None:  # the rate this batch uses (a schedule may have set it)
                lr = groups[0]["lr"]
                batch_lrs.append(lr.detach().clone() if type(lr) is Tensor else lr)
            batch = stage(batch)
            loop.current_batch = batch
            collector.batch_size = size = data.batch_size_of(batch[0])  # for Model.log
            if no_sync is not None and loop.accumulating:  # all-reduce once per group
                with no_sync():
                    logs = train_step(batch)
            else:
                logs = train_step(batch)
            collector.add(logs, size)
            loop.global_step += 1
            if not loop.accumulating:
                loop.optimizer_steps += 1
            if needs_end:
                callbacks.on_train_batch_end(step, collector.snapshot())
            if accumulation > 1:
                loop.micro_step = 0 if not loop.accumulating else loop.micro_step + 1
            if pending and not loop.accumulating:  # backups only between optimizer steps
                loop.run_pending()
            if vote is not None:
                interrupt = max(interrupt, vote.submit(loop.interrupt))
            elif loop.interrupt:
                interrupt = loop.interrupt
            if interrupt and not loop.accumulating:  # a signal: back up and stop, all ranks
                loop.on_interrupt(interrupt)  # type: ignore[misc]
            if agree_per_batch:
                model.stop_training = distributed.agree(model.stop_training)
            if model.stop_training:
                self.stopped_in_epoch = True
                break
        return step

    def _place_in_group(self, step: int, last_known: int | None) -> None:
        """Whether this micro-batch completes its accumulation group (the epoch's last batch
        completes a short one)."""
        loop, n = self.loop, self.accumulation
        closes = loop.micro_step + 1 == n or step == last_known
        loop.accumulating = not closes
        loop.group_size = loop.micro_step + 1 if closes else n


def evaluate(
    model: Any,
    source: Any,
    callbacks: CallbackList,
    steps: int | None,
    *,
    nested: bool = False,
    stage: data.DeviceStager | None = None,
) -> dict[str, float]:
    """One pass over ``source`` with ``test_step``: the loss and metrics as floats.
    ``nested``: validation inside ``fit``, which passes its own ``stage`` (pinned buffers)."""
    was_training = model.training
    model.eval()
    model.stop_evaluating = False
    collector = model._collector()
    collector.reset()
    outer_log_to, model._log_to = model._log_to, collector  # Model.log in test_step
    stage = stage or data.DeviceStager(model.device)
    needs_begin = callbacks.needs("on_test_batch_begin")
    needs_end = callbacks.needs("on_test_batch_end")
    rank, ranks = distributed.rank(), distributed.world_size()
    source.distribute(rank, ranks, training=False, seed=0)
    shard_ranks = 1 if source.per_rank else ranks
    try:
        with hooks(callbacks, "test", outermost=not nested) as result, torch.no_grad():
            for step, batch in enumerate(source.batches(source.new_order())):
                if steps is not None and step >= steps:
                    break
                if needs_begin:
                    callbacks.on_test_batch_begin(step)
                batch = stage(data.shard(batch, rank, shard_ranks))
                collector.batch_size = size = data.batch_size_of(batch[0])
                collector.add(model.test_step(batch), size)
                if needs_end:
                    callbacks.on_test_batch_end(step, collector.snapshot())
                if model.stop_evaluating:
                    break
            if ranks > 1:
                collector.all_reduce(distributed.all_reduce_sum)
            result["logs"] = logs = collector.result()
    finally:
        model.train(was_training)
        model._log_to = outer_log_to
    return logs


def predict(model: Any, source: Any, callbacks: CallbackList, steps: int | None) -> Any:
    """The outputs of ``predict_step`` over ``source``, concatenated on the host.

    Outputs stay on the device and move to the host in chunks (one copy per chunk, not one
    blocking copy per batch), unless a callback reads each batch's outputs.
    """
    was_training = model.training
    model.eval()
    model.stop_predicting = False
    needs_begin = callbacks.needs("on_predict_batch_begin")
    needs_end = callbacks.needs("on_predict_batch_end")
    stage = data.DeviceStager(model.device)
    rank, ranks = distributed.rank(), distributed.world_size()
    source.distribute(rank, ranks, training=False, seed=0)
    shard_ranks = 1 if source.per_rank else ranks
    on_host: list[Any] = []
    on_device: list[Any] = []
    device_bytes = 0
    try:
        with hooks(callbacks, "predict"), torch.no_grad():
            for step, batch in enumerate(source.batches()):
                if steps is not None and step >= steps:
                    break
                if needs_begin:
                    callbacks.on_predict_batch_begin(step)
                batch = data.shard(batch, rank, shard_ranks)
                out = model._predict_output(model.predict_step(stage(batch)))
                if needs_end:
                    out = tensors.to_cpu(out)
                    callbacks.on_predict_batch_end(step, {"outputs": tensors.to_numpy(out)})
                on_device.append(out)
                device_bytes += sum(t.numel() * t.element_size() for t in tensors.leaves(out))
                if device_bytes >= PREDICT_CHUNK_BYTES or ranks > 1:  # ranks: batch by batch
                    on_host.append(tensors.to_cpu(tensors.concat_batches(on_device)))
                    on_device, device_bytes = [], 0
                if model.stop_predicting:
                    break
            if on_device:
                on_host.append(tensors.to_cpu(tensors.concat_batches(on_device)))
    finally:
        model.train(was_training)
    if ranks > 1:  # every rank predicted its part of each batch: put them back in order
        return _gather_in_order(on_host)
    return tensors.concat_batches(on_host)


def _gather_in_order(per_batch: list[Any]) -> Any:
    """Every rank's part of every batch, put back in input order (a batch's parts are
    contiguous slices in rank order); every rank returns the whole result."""
    by_rank = distributed.gather_objects(per_batch)
    ordered = [part for i in range(len(per_batch)) for part in (r[i] for r in by_rank)]
    return tensors.concat_batches(ordered)


def fit(model: Any, train_source: Any, val_source: Any, callbacks: CallbackList, **kw: Any) -> Any:
    """Run :class:`FitLoop`; see ``Model.fit`` for the arguments."""
    return FitLoop(model, train_source, val_source, callbacks, **kw).run()
