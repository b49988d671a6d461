"""The fit / evaluate / predict loops: Keras's hook order, resume positioning, log plumbing.

``Model`` holds the user's API and the steps a user overrides (``train_step``,
``optimizer_step``...); the loops here drive them. Nothing in a loop reads a value back from
the device per batch: logs stay on the device until a callback reads them (see ``logs.py``).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from torcheras import checkpoint, data, distributed, optimizers, state, stepping, tensors
from torcheras.callbacks.callback_list import CallbackList
from torcheras.logs import LogCollector, LossWatch
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
    """One ``fit``: epochs of training batches, validation, and resume from a backup.

    It holds what lives only while ``fit`` runs (the data, the callbacks, the epoch's order
    and running logs, the batch on the device, the work callbacks asked for) and lets go of
    all of it when ``fit`` returns or raises; ``model.loop`` keeps the counters."""

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
        validation_interval: int | None = None,
    ) -> None:
        self.model = model
        self.train_source = train_source
        self.val_source = val_source
        self.callbacks = callbacks
        self.epochs = epochs
        self.initial_epoch = initial_epoch
        self.validation_freq = validation_freq
        self.validation_steps = validation_steps
        # Validate every N optimizer steps besides the epochs' ends (0: off); the last pass's
        # step and results, so that no step is validated twice (the epoch's end reuses it).
        self.validation_interval = validation_interval or 0
        self.validated: tuple[int, dict[str, float]] | None = None
        self.train_labels_may_pad = True
        self.loop = LoopState()
        self.collector = model._collector()
        self.current_batch: Any = None
        self.order: Tensor | None = None  # the epoch's sample order
        self.batch_lrs: list[Any] = []  # the rate each batch of the epoch used
        self.boundary_work: list[Callable[[], None]] = []  # LoopState.at_step_boundary
        self.after_fit: list[Callable[[], None]] = []  # LoopState.after_fit
        self.interrupt_handler: Callable[[int], None] | None = None
        rank, ranks = distributed.rank(), distributed.world_size()
        if ranks > 1:  # DataLoaders: each rank loads its own part
            seed = distributed.shared_seed()
            train_source.distribute(rank, ranks, training=True, seed=seed)
            check_ranks_agree(train_source)
            if val_source is not None:
                val_source.distribute(rank, ranks, training=False, seed=seed)
                check_ranks_agree(val_source)
        self.stage = data.DeviceStager(model.device)  # its pinned buffers serve the whole fit
        self.steps_known = getattr(train_source, "steps", None)
        self.stopped_in_epoch = False  # a batch hook stopped training before the epoch's end
        self.rng_mark: list[Tensor] | None = None  # the RNG once the epoch's order was drawn

    def run(self) -> Any:
        try:
            return self._run()
        finally:
            self._release()

    def _release(self) -> None:
        """Let go of everything but the counters: data (a DataLoader's workers stop), the
        callbacks, the last batch (two samples of it stay for ``summary()``'s shapes). Runs
        when fit returns or raises: nothing here may hide the error leaving fit."""
        model = self.model
        model._log_to = None
        model._stepping.callbacks = None
        model._stepping.plain = False  # steps run outside fit take every stage
        model._expect_padded_labels(True)  # steps run outside fit see any labels
        self.loop._fit = None
        batch, sources = self.current_batch, (self.train_source, self.val_source)
        self.train_source = self.val_source = self.callbacks = self.collector = None
        self.current_batch = self.order = self.stage = self.vote = None
        self.batch_lrs, self.boundary_work, self.interrupt_handler = [], [], None
        self.after_fit = []
        for source in sources:
            if source is not None:
                with contextlib.suppress(Exception):  # cleanup: the fit's outcome stands
                    source.close()
        if batch is not None:
            x = data.unpack(batch)[0]
            model._example_input = tensors.map_tensors(
                lambda t: t.detach().cpu(), tensors.head(x, 2)
            )

    def training_state(self, sharded: bool = False) -> dict[str, Any]:
        """Everything an exact resume needs, as it stands now (``LoopState.training_state``);
        ``sharded``: without the weights and optimizers (a sharded backup saves those)."""
        loop = self.loop
        return state.capture_training_state(
            self.model,
            self.callbacks,
            rng_since=self.rng_mark,
            sharded=sharded,
            data_position=getattr(self.train_source, "state_dict", dict)(),
            epoch_position=None
            if loop.epoch_done
            else {
                "order": self.order,
                "collector": self.collector.state_dict(),
                "batch_lrs": list(self.batch_lrs),
                "pass": self._pass_shape(),
                "validated": self._validated_now(),
            },
        )

    def _pass_shape(self) -> dict[str, Any]:
        """What a resumed epoch must find unchanged to go on at the same batch: the number of
        samples, the batch size, the batches of a pass and the number of processes."""
        source = self.train_source
        iterable = getattr(source, "iterable", None)
        return {
            "samples": getattr(source, "num_samples", None)
            or data._safe_len(getattr(iterable, "dataset", None)),
            "batch_size": getattr(source, "batch_size", None)
            or getattr(source, "global_batch_size", None)
            or getattr(iterable, "batch_size", None),
            "batches": source.steps,
            "world_size": distributed.world_size(),
        }

    def _check_pass(self, saved: Mapping[str, Any] | None, path: str) -> None:
        """Refuse a mid-epoch resume whose data or processes changed: the saved position
        (batch N of this order) would skip or repeat samples."""
        if not saved:
            return  # a backup of an earlier release: nothing recorded to compare
        now = self._pass_shape()
        changed = [
            f"{key.replace('_', ' ')} {saved[key]} -> {now[key]}"
            for key in ("samples", "batch_size", "batches")  # processes: restore's check
            if saved.get(key) is not None and now[key] is not None and saved[key] != now[key]
        ]
        if changed:
            raise ValueError(
                f"BackupAndRestore cannot resume the epoch saved in {path!r} exactly: since "
                f"the backup, {', '.join(changed)}. The backup's position (a batch of that "
                "epoch) would skip or repeat samples. Rerun with the same data, batch_size and "
                f"number of processes to resume, or delete {str(Path(path).parent)!r} to start "
                "over."
            )

    def watch_loss(
        self, callback: Any, every: int, on_bad: Callable[[int, float], None]
    ) -> LossWatch | None:
        """``LoopState.watch_loss``: a loss watch in place of ``callback``'s batch hook."""
        callbacks = self.callbacks
        if (
            callbacks.needs("on_train_batch_end", besides=callback)
            or distributed.is_active()
            or self.collector.watch is not None
        ):
            return None
        watch = self.collector.watch = LossWatch(self.collector, self.loop, "loss", every, on_bad)
        callbacks.skip("on_train_batch_end", callback)
        return watch

    def _run_boundary_work(self) -> None:
        work = self.boundary_work
        while work:
            work.pop(0)()

    def _run(self) -> Any:
        model, loop, callbacks = self.model, self.loop, self.callbacks
        model.stop_training = False
        model.stop_reason = None
        model._initial_epoch = None
        model._check_first_batch = True
        loop._fit = self
        model.loop = loop
        if model.optimizer is not None:
            model.optimizer.zero_grad(set_to_none=True)
        stepping.wrap_for_ranks(model)
        self.stepping = model._stepping = stepping.Stepping(model, loop, callbacks)
        # A batch hook may stop training: then every rank agrees after each batch. Agreed
        # once, so that ranks whose callbacks differ still make the same collectives.
        self.agree_per_batch = distributed.agree(
            distributed.is_active()
            and (
                callbacks.declares("on_train_batch_begin")
                or callbacks.declares("on_train_batch_end")
            )
        )
        loop.interrupt = 0
        model._log_to = self.collector  # Model.log's values join the epoch's logs
        with hooks(callbacks, "train") as result:
            # A signal on any rank (BackupAndRestore's) is voted on after every batch, one
            # batch late so that no rank waits. Set up after on_train_begin, which sets the
            # handler; agreed once, so that every rank votes at the same batches.
            votes = distributed.agree(
                distributed.is_active() and self.interrupt_handler is not None
            )
            self.vote = distributed.Vote() if votes else None
            initial_epoch, position = self._resume_or_start()
            if model.ema is not None and model.ema.swapped:  # a file saved on the average
                model.ema.swap()  # (SwapEMAWeights): train on the weights
            result["logs"] = dict(loop.last_logs)
            try:
                for epoch in range(initial_epoch, self.epochs):
                    result["logs"] = self._epoch(epoch, position)
                    position = None
                    self._run_boundary_work()
                    if self.vote is not None:
                        self.vote.finish()  # superseded by the agreement just below
                    interrupt = distributed.agree_max(loop.interrupt)
                    if interrupt and self.interrupt_handler is not None:
                        self.interrupt_handler(interrupt)
                        loop.interrupt = 0
                    model.stop_training = distributed.agree(model.stop_training)  # every rank
                    if model.stop_training:
                        break
            except StopFit:
                model.stop_training = True
            if model.ema is not None and model.ema.updates:  # Keras: fit ends on the average
                model.ema.finalize()
            model.history.stop_reason = self._stop_reason()
        for work in self.after_fit:  # fit ended cleanly: every on_train_end has run
            work()
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
        check_ranks_resume_alike(resume)
        if resume is None:
            if model._initial_epoch is not None:  # Keras's hook for callbacks that set it
                return model._initial_epoch, None
            return self.initial_epoch, None
        path = resume.get("path", "backup")
        if resume.get("world_size", 1) != distributed.world_size():  # refused first, saying why
            state.reshard_position(resume, distributed.world_size(), path, Path(path).parent)
            self._reshard_data(resume, path)
        if resume.get("batch", 0) > 0:  # inside an epoch
            self._check_pass(resume.get("pass"), path)
        position = state.restore_training_state(model, self.callbacks, resume, path)
        loop.global_step = position["global_step"]
        loop.optimizer_steps = position.get("optimizer_steps", loop.global_step)
        loop.last_logs = dict(position.get("logs") or {})
        validated = position.get("validated")  # a validation at the backup's very step
        if validated is not None:
            self.validated = (validated["step"], dict(validated["logs"]))
        if "data" in position and hasattr(self.train_source, "load_state_dict"):
            self.train_source.load_state_dict(position["data"])
        return position["epoch"], position

    def _reshard_data(self, resume: Mapping[str, Any], path: str) -> None:
        """A DataLoader resumed on another number of processes goes on with the sampler the
        backup's processes used (seeded alike), so that batch k holds the same samples: a
        ``DistributedSampler`` over every process, the batch split among them (one process
        too). Refused where the order was another sampler's (a shuffled DataLoader in one
        process draws a ``RandomSampler``'s order)."""
        source, saved = self.train_source, resume.get("data") or {}
        if not isinstance(getattr(source, "iterable", None), torch.utils.data.DataLoader):
            return
        if "sampler_seed" in saved and source.sampler is None:  # several, resumed alone
            source.distribute(0, 1, training=True, seed=saved["sampler_seed"], force=True)
            self.steps_known = source.steps
        shuffled = source.sampler is not None and source.sampler.shuffle
        if "sampler_seed" not in saved and (shuffled or saved.get("shuffle")):
            raise ValueError(
                f"The backup {path!r} was written by a run of {resume.get('world_size', 1)} "
                f"process(es); this run has {distributed.world_size()}. Its shuffled "
                "DataLoader drew its order from a RandomSampler in one process, which "
                "a DistributedSampler over several cannot continue. Resume with "
                f"{resume.get('world_size', 1)} process(es), or move {str(Path(path).parent)!r} "
                "away to start over."
            )

    def _start_epoch(self, epoch: int, position: dict[str, Any] | None) -> tuple[Any, int]:
        """The epoch's sample order and first batch: fresh, or where a backup left it."""
        source = self.train_source
        source.set_epoch(epoch)  # a DistributedSampler's shuffle
        if position is None or position["epoch"] != epoch:
            return distributed.broadcast(source.new_order()), 0  # one order for every rank
        start = position["batch"]
        state.set_rng_state(position["rng"])
        if start == 0:  # an epoch boundary: draw the order from the restored RNG, as before
            return distributed.broadcast(source.new_order()), 0
        self.collector.load_state_dict(position["collector"], self.model.device)
        self.batch_lrs.extend(position.get("batch_lrs", []))
        return position["order"], start

    def _epoch(self, epoch: int, position: dict[str, Any] | None) -> dict[str, Any]:
        model, loop, callbacks = self.model, self.loop, self.callbacks
        collector: LogCollector = self.collector
        collector.reset()
        self.batch_lrs.clear()
        loop.epoch, loop.batch, loop.epoch_done = epoch, -1, False
        self.stepping.start_epoch()
        callbacks.on_epoch_begin(epoch)
        self.stepping.choose_path()  # after on_epoch_begin, which may change the settings
        model.train()
        order, start = self._start_epoch(epoch, position)
        self.order = order
        # a custom train_step may make labels of -100 itself
        self.train_labels_may_pad = (
            self.train_source.labels_may_pad or not model._uses_default_train_step()
        )
        model._expect_padded_labels(self.train_labels_may_pad)
        batches = self.train_source.batches(order, start)
        self.rng_mark = state.rng_mark()  # did training draw random numbers? (resharding)
        last = self._train_batches(batches, start)
        if last < 0 and start == 0 and not self.train_source.ran_out:
            raise ValueError("The training data yielded no batch: `x` is empty.")
        self.stepping.end_epoch()  # a group the epoch (or a stop) cut short
        if collector.watch is not None:
            collector.watch.check()  # the last batches, where a batch hook would check them
        if callbacks.needs("on_train_batches_end"):
            callbacks.on_train_batches_end(epoch)
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
            done = self._validated_now()  # the last batch's interval validation: reused
            val_logs = self._validate() if done is None else done["logs"]
            logs.update({f"val_{k}": v for k, v in val_logs.items()})
        elif self._validation_due():  # the step of a short last accumulation group
            self._validate()
        if self.batch_lrs:
            logs["learning_rate"] = float(self.batch_lrs[-1])
        elif model.optimizer is not None:
            logs["learning_rate"] = optimizers.get_learning_rate(model.optimizer)
        logs = dict(sorted(logs.items()))
        loop.epoch_done, loop.last_logs = True, logs
        callbacks.on_epoch_end(epoch, logs)
        return logs

    def _validation_due(self) -> bool:
        """``validation_interval``: the step just taken is one of its multiples, and was not
        validated yet."""
        interval, loop = self.validation_interval, self.loop
        return (
            interval > 0
            and self.val_source is not None
            and loop.optimizer_steps % interval == 0
            and self._validated_now() is None
        )

    def _validated_now(self) -> dict[str, Any] | None:
        """The validation run at the current optimizer step, if one was (None otherwise)."""
        validated = self.validated
        if validated is None or validated[0] != self.loop.optimizer_steps:
            return None
        return {"step": validated[0], "logs": validated[1]}

    def _validate(self) -> dict[str, float]:
        """One validation pass (``on_test_*`` as Keras's); with ``validation_interval`` it is
        remembered at its step and told to ``on_validation_end``, ``val_``-prefixed."""
        model, loop = self.model, self.loop
        val_logs = evaluate(
            model,
            self.val_source,
            self.callbacks,
            self.validation_steps,
            nested=True,
            stage=self.stage,
        )
        model._expect_padded_labels(self.train_labels_may_pad)  # evaluate's were its own
        if self.validation_interval:
            self.validated = (loop.optimizer_steps, dict(val_logs))
            prefixed = {f"val_{k}": v for k, v in sorted(val_logs.items())}
            self.callbacks.on_validation_end(loop.optimizer_steps, prefixed)
        return val_logs

    def _validate_within_epoch(self) -> None:
        """A ``validation_interval`` pass after a training batch. A callback that stops
        training on it (EarlyStopping) ends the epoch after this batch, on every rank. The
        metric objects are the training's too: their running state is put back after it, so
        the epoch's training metrics count every batch of the epoch."""
        kept = copy.deepcopy(self.collector.state_dict())
        self._validate()
        self.collector.load_state_dict(kept)
        if distributed.is_active():
            self.model.stop_training = distributed.agree(self.model.stop_training)

    def _train_batches(self, batches: Any, start: int) -> int:
        """Run the training batches of one epoch; the last batch index (start - 1 if none)."""
        try:
            return self._run_batches(batches, start)
        finally:
            batches.close()  # a stop mid-epoch: the pass's iterator is let go of now

    def _run_batches(self, batches: Any, start: int) -> int:
        model, loop, callbacks = self.model, self.loop, self.callbacks
        stepper = self.stepping
        stage = None if model.device.type == "cpu" else self.stage  # on the CPU: nothing to move
        needs_begin = callbacks.needs("on_train_batch_begin")
        needs_end = callbacks.needs("on_train_batch_end")
        default_train_step = model._uses_default_train_step()
        boundary_work = self.boundary_work
        interval = self.validation_interval  # 0: off (one integer test per batch)
        train_step = model.train_step
        guarded = bool(needs_begin or needs_end or interval or boundary_work)
        # no synchronisation inside groups
        run_step = stepper.run if stepper.ddp is not None or stepper.fsdp is not None else None
        accumulating = stepper.accumulation > 1
        ranks = 1 if self.train_source.per_rank else distributed.world_size()
        stepper.rank_share = 1.0
        vote: distributed.Vote | None = self.vote
        agree_per_batch = self.agree_per_batch
        if not (
            guarded
            or run_step is not None
            or accumulating
            or ranks > 1
            or vote is not None
            or agree_per_batch
            or self.interrupt_handler is not None
        ):
            return self._run_plain_batches(batches, start, train_step, stage, default_train_step)
        if default_train_step and stepper.plain:  # the seams inlined where nothing can tell
            # guarded: a callback may run between batches, and replace what the step uses
            train_step = model._inlined_train_step(guarded) or train_step
        collector = self.collector
        watch = collector.watch
        batch_lrs = self.batch_lrs
        last_known = None if self.steps_known is None else self.steps_known - 1
        rank = distributed.rank()
        # The epoch's known last batch leaves a validation due to the epoch's end when that
        # validates anyway: once, in Keras's place (after on_train_batches_end).
        at_epoch_end = last_known if _should_validate(loop.epoch, self.validation_freq) else None
        interrupt = 0
        step = start - 1
        first = True
        for step, batch in enumerate(batches, start):
            loop.batch = step
            if first:
                first = False
                check_input_rank(model, batch, self.train_source, default_train_step)
            if ranks > 1:  # this rank's part of the global batch; its loss counts its share
                size = data.batch_size_of(batch[0])
                batch = data.shard(batch, rank, ranks)
                stepper.rank_share = data.batch_size_of(batch[0]) * ranks / size
            if accumulating:
                stepper.place(step, last_known)
            if needs_begin:
                callbacks.on_train_batch_begin(step)
            optimizer = model.optimizer  # (a callback may have replaced it)
            if optimizer is not None:  # the rate this batch uses (a schedule may have set it)
                lr = optimizer.param_groups[0]["lr"]
                batch_lrs.append(lr.detach().clone() if type(lr) is Tensor else lr)
            if stage is not None:
                batch = stage(batch)
            self.current_batch = batch
            collector.batch_size = size = data.batch_size_of(batch[0])  # for Model.log
            logs = train_step(batch) if run_step is None else run_step(train_step, batch)
            if type(logs) is Tensor:  # the loss alone (the inlined step; a custom one too)
                collector.add_loss(logs, size)
            else:
                collector.add(logs, size)
            stepper.end_batch()
            if needs_end:
                callbacks.on_train_batch_end(step, collector.snapshot())
            if watch is not None:  # where the watching callback's batch hook would run
                watch.end_batch()
            if (
                interval
                and not loop.accumulating
                and loop.optimizer_steps % interval == 0
                and step != at_epoch_end
            ):
                self._validate_within_epoch()  # before a backup, which then holds its outcome
            if boundary_work and not loop.accumulating:  # backups only between steps
                self._run_boundary_work()
                if not guarded:  # work that came after an unguarded step was made may
                    train_step = model.train_step  # replace what it uses: the step itself
            if vote is not None:
                interrupt = max(interrupt, vote.submit(loop.interrupt))
            elif loop.interrupt:
                interrupt = loop.interrupt
            if interrupt and not loop.accumulating and self.interrupt_handler is not None:
                self.interrupt_handler(interrupt)  # a signal: back up and stop, all ranks
                interrupt = loop.interrupt = 0  # handled (a handler that returns)
                if not guarded:  # which may have replaced what an unguarded step uses
                    train_step = model.train_step
                if vote is not None:
                    vote.finish()  # the round still open carries the code just handled
            if agree_per_batch:
                model.stop_training = distributed.agree(model.stop_training)
            if model.stop_training:
                self.stopped_in_epoch = True
                break
        return step

    def _run_plain_batches(
        self, batches: Any, start: int, train_step: Any, stage: Any, default_step: bool
    ) -> int:
        """:meth:`_run_batches` where nothing runs between two batches: one process, every
        batch a step, no batch hook, no validation inside the epoch, no interrupt handler.
        The same bookkeeping per batch (the rate used, the batch, the counters, the loss)
        without the checks that cannot fire here. On ``Stepping.plain`` the default step's
        body runs here with its seams inlined (``Model._inlined_train_parts``, whose
        docstring says which batches take ``train_step`` itself), its loss added to the
        running total in place (``LogCollector.loss_in_place``): the same torch calls and
        additions as ``train_step`` and ``add_loss``, without a Python call a batch for
        either."""
        model, loop = self.model, self.loop
        collector = self.collector
        watch = collector.watch
        groups = None if model.optimizer is None else model.optimizer.param_groups
        batch_lrs = self.batch_lrs
        boundary_work = self.boundary_work  # empty unless the step or a signal handler asks
        plain_step = default_step and self.stepping.plain
        parts = model._inlined_train_parts(guarded=False) if plain_step else None
        if parts is not None:
            module, loss_fn, fused, optimizer, metrics = parts
        may_add_in_place = "loss" not in collector.tracked
        note = watch.note if watch is not None and watch.key == "loss" else None
        # LogCollector.loss_in_place's, fetched after an add_loss; whatever else changes the
        # loss's total between two batches (a step's logs, Model.log, work between batches,
        # the watch keeping it) fails the in-place check below, not a reset here
        totals: Any = None
        total: Any = None
        weights: Any = None
        unshared: Any = None
        step = start - 1
        first = True
        for step, batch in enumerate(batches, start):
            loop.batch = step
            if first:
                first = False
                check_input_rank(model, batch, self.train_source, default_step)
            if groups is not None:  # the rate this batch uses
                lr = groups[0]["lr"]
                batch_lrs.append(lr.detach().clone() if type(lr) is Tensor else lr)
            if stage is not None:
                batch = stage(batch)
            self.current_batch = batch
            if (
                parts is not None
                and (type(batch) is tuple or type(batch) is list)
                and len(batch) == 2
                and type(batch[0]) is Tensor
                and batch[1] is not None
                and not model._check_first_batch
            ):  # the default train_step, inlined
                x, y = batch
                collector.batch_size = size = x.shape[0] if x.ndim else 1  # batch_size_of
                optimizer.zero_grad(set_to_none=True)  # Stepping.zero_grad
                y_pred = module(x)  # call_on
                if fused is not None and y_pred.dtype is torch.float32:  # compute_loss
                    loss = fused(y_pred, y)  # a float32 scalar, as loss_fn(y_pred, y) gives
                    scalar32 = True
                else:
                    loss = loss_fn(y_pred, y)
                    scalar32 = loss.dtype is torch.float32 and not loss.ndim
                loss.backward()  # backward -> Stepping.backward, plain
                optimizer.step()  # optimizer_step -> Stepping.apply, plain
                for metric in metrics:  # update_metrics
                    metric.update(y_pred, y)
                if (  # while loss_in_place's total is the running total, unshared
                    scalar32
                    and total is not None
                    and size
                    and totals.get("loss") is total  # not replaced (a float64 Model.log)
                    and "loss" in unshared  # not kept (a snapshot, the watch's end_batch)
                ):  # add_loss's addition, without the call
                    value = loss.detach()
                    if note is not None:  # as add_loss tells a watch of the loss
                        note(total, weights["loss"], value, size)
                    total.add_(value, alpha=size)
                    weights["loss"] += size
                else:
                    collector.add_loss(loss, size)
                    if may_add_in_place:
                        totals, total, weights, unshared = collector.loss_in_place()
            else:
                collector.batch_size = size = data.batch_size_of(batch[0])  # for Model.log
                logs = train_step(batch)
                if type(logs) is Tensor:  # the loss alone (a custom step may return it)
                    collector.add_loss(logs, size)
                else:
                    collector.add(logs, size)
            loop.global_step += 1  # Stepping.end_batch's counters, without the call
            loop.optimizer_steps += 1  # (every batch is a step here)
            if watch is not None:
                watch.end_batch()
            if boundary_work:
                self._run_boundary_work()  # it may replace the step, the optimizer, the parts
                train_step = model.train_step
                groups = None if model.optimizer is None else model.optimizer.param_groups
                if parts is not None:
                    parts = model._inlined_train_parts(guarded=False)
                    if parts is not None:
                        module, loss_fn, fused, optimizer, metrics = parts
            if model.stop_training:
                self.stopped_in_epoch = True
                break
        return step


def check_input_rank(model: Any, batch: Any, source: Any, default_step: bool) -> None:
    """At the first batch of a pass: a Dataset whose items are already batches, batched again
    by the DataLoader torcheras made for it, gives inputs of one rank more than the model was
    given before, which layers such as ``nn.Linear`` accept silently. Refused then, naming
    ``PyDataset``. Only the default steps' inputs are compared (a custom step's batch need not
    be the model's input), only inputs of the same structure, and not items of one leading
    element (torchvision's ``(1, 28, 28)`` images); other changes of rank (a model that
    flattens what it gets) are the user's to make."""
    if not default_step:
        return
    x = data.unpack(batch)[0]
    ranks = tensors.map_tensors(lambda t: t.dim(), x)
    expected = model._first_input_ranks
    if expected is None:
        model._first_input_ranks = ranks
        return
    if not getattr(source, "batches_items", False) or not _one_rank_more(ranks, expected):
        return
    found = [t.shape for t in tensors.leaves(x)]
    if any(shape[1] == 1 for shape in found):  # items of (1, ...): a channel, not a batch
        return
    raise ValueError(
        f"`{source.name}` gives inputs of shape {', '.join(str(tuple(s)) for s in found)}: one "
        "rank more than the inputs fit / evaluate / predict gave this model before. Each item "
        "of this Dataset looks like a whole batch, which its DataLoader batched again: make it "
        "a torcheras.data.PyDataset (one batch per item), or pass DataLoader(dataset, "
        "batch_size=None)."
    )


def _one_rank_more(ranks: Any, expected: Any) -> bool:
    """Whether two structures of ranks match except that every rank of ``ranks`` is one more."""
    if isinstance(ranks, int) and isinstance(expected, int):
        return ranks == expected + 1
    if isinstance(ranks, dict) and isinstance(expected, dict):
        return ranks.keys() == expected.keys() and all(
            _one_rank_more(ranks[k], expected[k]) for k in ranks
        )
    if isinstance(ranks, (tuple, list)) and isinstance(expected, (tuple, list)):
        return len(ranks) == len(expected) and all(map(_one_rank_more, ranks, expected))
    return False


def check_ranks_agree(source: Any) -> None:
    """Under torchrun, every process must see data of the same size (each takes its part of
    every batch, or its sampler's share): refuse, on every rank at once, what would otherwise
    abort inside a collective with a size mismatch. Checked once per source."""
    if not distributed.is_active() or getattr(source, "ranks_checked", False):
        return
    source.ranks_checked = True
    mine = (getattr(source, "num_samples", None), source.steps)
    every = distributed.gather_objects(mine)
    if len(set(every)) > 1:
        sizes = ", ".join(
            f"rank {rank}: " + (f"{samples} samples" if samples is not None else f"{steps} batches")
            for rank, (samples, steps) in enumerate(every)
        )
        raise ValueError(
            f"Under torchrun every process must be given the same `{source.name}`, but they "
            f"differ ({sizes}). Each process takes its own part of every batch: give every "
            "process the whole data (not a per-rank shard), or a DataLoader over the whole "
            "Dataset (torcheras adds the DistributedSampler)."
        )


def check_ranks_resume_alike(resume: Mapping[str, Any] | None) -> None:
    """Under torchrun, every process must resume from the same backup (or none): a backup
    folder on a node's own disk is seen by that node alone (rank 0 writes it), and ranks
    resuming at different steps would hang or diverge. Refused on every rank at once."""
    if not distributed.is_active():
        return
    mine = None
    if resume is not None:
        mine = (resume.get("global_step"), resume.get("created"), resume.get("path"))
    every = distributed.gather_objects(mine)
    if len({seen and seen[:2] for seen in every}) > 1:
        found = ", ".join(
            f"rank {rank}: " + ("no backup" if seen is None else f"step {seen[0]} in {seen[2]}")
            for rank, seen in enumerate(every)
        )
        raise checkpoint.CheckpointError(
            errno.EINVAL,
            f"BackupAndRestore found different backups on different processes ({found})."
            " Every process must read the backup rank 0 wrote: on several nodes, put "
            "`backup_dir` on storage every node shares (a network filesystem, or a URL such "
            "as 's3://bucket/run/backup'), not on a node's local disk.",
        )


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
    if model.device.type == "cpu":
        stage = None  # nothing to move
    elif stage is None:
        stage = data.DeviceStager(model.device)
    needs_begin = callbacks.needs("on_test_batch_begin")
    needs_end = callbacks.needs("on_test_batch_end")
    outputs: list[Any] = []  # the model's outputs in test_step, for on_test_batch_outputs
    capture = None
    rank, ranks = distributed.rank(), distributed.world_size()
    try:
        source.distribute(rank, ranks, training=False, seed=0)
        check_ranks_agree(source)
        shard_ranks = 1 if source.per_rank else ranks
        model._expect_padded_labels(source.labels_may_pad or not model._uses_default_test_step())
        if callbacks.needs("on_test_batch_outputs"):
            capture = model.register_forward_hook(lambda module, args, out: outputs.append(out))
        with hooks(callbacks, "test", outermost=not nested) as result, torch.no_grad():
            # made after on_test_begin (which may add a forward hook or replace the module);
            # guarded: a callback may run between batches, and replace what the step uses
            inlined = model._inlined_test_step(bool(needs_begin or needs_end or capture))
            test_step = model.test_step if inlined is None else inlined
            for step, batch in enumerate(source.batches(source.new_order())):
                if steps is not None and step >= steps:
                    break
                if step == 0:
                    check_input_rank(model, batch, source, model._uses_default_test_step())
                if needs_begin:
                    callbacks.on_test_batch_begin(step)
                if shard_ranks > 1:
                    batch = data.shard(batch, rank, shard_ranks)
                if stage is not None:
                    batch = stage(batch)
                collector.batch_size = size = data.batch_size_of(batch[0])
                logs = test_step(batch)
                if type(logs) is Tensor:  # the loss alone (the inlined step; a custom one too)
                    collector.add_loss(logs, size)
                else:
                    collector.add(logs, size)
                if outputs:
                    x, y, _ = data.unpack(batch)
                    callbacks.on_test_batch_outputs(step, x, y, outputs[-1])
                    outputs.clear()
                if needs_end:
                    callbacks.on_test_batch_end(step, collector.snapshot())
                if model.stop_evaluating:
                    break
            if ranks > 1:
                collector.all_reduce(distributed.all_reduce_sum)
            result["logs"] = logs = collector.result()
    finally:
        stepping.reshard(model)  # FSDP: only the shards again
        model.train(was_training)
        model._log_to = outer_log_to
        model._expect_padded_labels(True)
        if capture is not None:
            capture.remove()
    return logs


def predict(model: Any, source: Any, callbacks: CallbackList, steps: int | None) -> Any:
    """The outputs of ``predict_step`` over ``source``, concatenated on the host.

    On an accelerator, outputs stay on the device and move to the host in chunks (one copy
    per chunk, not one blocking copy per batch), unless a callback reads each batch's
    outputs; on the CPU they are joined once at the end.
    """
    was_training = model.training
    model.eval()
    model.stop_predicting = False
    needs_begin = callbacks.needs("on_predict_batch_begin")
    needs_end = callbacks.needs("on_predict_batch_end")
    stage = None if model.device.type == "cpu" else data.DeviceStager(model.device)
    rank, ranks = distributed.rank(), distributed.world_size()
    chunked = _outputs_move_in_chunks(model, ranks)
    mixed = model.precision.mixed  # half-precision outputs come back as float32
    on_host: list[Any] = []
    on_device: list[Any] = []
    device_bytes = 0
    try:
        source.distribute(rank, ranks, training=False, seed=0)
        check_ranks_agree(source)
        shard_ranks = 1 if source.per_rank else ranks
        with hooks(callbacks, "predict"), torch.no_grad():
            # made after on_predict_begin (which may add a forward hook or replace the
            # module); guarded: a callback may run between batches, and do so too
            inlined = model._inlined_predict_step(bool(needs_begin or needs_end))
            for step, batch in enumerate(source.batches()):
                if steps is not None and step >= steps:
                    break
                if step == 0:
                    check_input_rank(model, batch, source, model._uses_default_predict_step())
                if needs_begin:
                    callbacks.on_predict_batch_begin(step)
                if shard_ranks > 1:
                    batch = data.shard(batch, rank, shard_ranks)
                if stage is not None:
                    batch = stage(batch)
                out = model.predict_step(batch) if inlined is None else inlined(batch)
                if mixed:
                    out = model._predict_output(out)
                if needs_end:
                    out = tensors.to_cpu(out)
                    callbacks.on_predict_batch_end(step, {"outputs": tensors.to_numpy(out)})
                on_device.append(out)
                if chunked:
                    device_bytes += sum(t.numel() * t.element_size() for t in tensors.leaves(out))
                    if device_bytes >= PREDICT_CHUNK_BYTES or ranks > 1:  # ranks: per batch
                        on_host.append(tensors.to_cpu(tensors.concat_batches(on_device)))
                        on_device, device_bytes = [], 0
                if model.stop_predicting:
                    break
            if not chunked:  # the CPU: one join of every batch's outputs
                return tensors.to_cpu(tensors.concat_batches(on_device))
            if on_device:
                on_host.append(tensors.to_cpu(tensors.concat_batches(on_device)))
    finally:
        stepping.reshard(model)  # FSDP: only the shards again
        model.train(was_training)
    if ranks > 1:  # every rank predicted its part of each batch: put them back in order
        return _gather_in_order(on_host)
    return tensors.concat_batches(on_host)


def _outputs_move_in_chunks(model: Any, ranks: int) -> bool:
    """Whether predict moves its outputs to the host chunk by chunk: they are on an
    accelerator, or the ranks gather them batch by batch. On the CPU alone they are on the
    host already: nothing to count per batch, one join at the end."""
    return model.device.type != "cpu" or ranks > 1


def _gather_in_order(per_batch: list[Any]) -> Any:
    """Every rank's part of every batch, put back in input order (a batch's parts are
    contiguous slices in rank order); every rank returns the whole result."""
    by_rank = distributed.gather_objects(per_batch)
    ordered = [part for i in range(len(per_batch)) for part in (r[i] for r in by_rank)]
    return tensors.concat_batches(ordered)


def fit(model: Any, train_source: Any, val_source: Any, callbacks: CallbackList, **kw: Any) -> Any:
    """Run :class:`FitLoop`; see ``Model.fit`` for the arguments."""
    return FitLoop(model, train_source, val_source, callbacks, **kw).run()
