"""BackupAndRestore: never lose training; resume at the exact batch after a crash or a kill."""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import threading
import warnings
from pathlib import Path
from typing import Any

from torcheras import checkpoint, distributed, state, tensors
from torcheras.callbacks.callback import Callback
from torcheras.callbacks.save_schedule import ACCEPTED, SaveTimer, parse_save_freq
from torcheras.loop_state import TIME_UP, StopFit

__all__ = ["BackupAndRestore", "Preempted"]


class Preempted(SystemExit):
    """Raised by ``fit`` after SIGTERM, once the backup is written: the process exits cleanly."""


class BackupAndRestore(Callback):
    """Back up the whole training state; a restarted script resumes exactly where it stopped.

    Args:
        backup_dir: where the backups live (``latest.pt``, and ``previous.pt`` with
            ``double_checkpoint``): a folder, or a URL such as ``s3://bucket/run/backup``
            (through fsspec; each backup is one object, written whole by one PUT).
        save_freq: ``"epoch"`` (after every epoch), N: every N training batches, or an
            amount of training time, a ``datetime.timedelta`` or a string such as ``"30min"``,
            ``"2h"``, ``"90s"``, ``"1h30min"``: a backup once that much time has passed since
            the last one (checked between optimizer steps; a resumed run counts on from the
            time recorded in its backup).
        double_checkpoint: keep the previous backup too, to fall back on if the newest is
            unreadable.
        delete_checkpoint: delete the backups when training ends normally. Default True.
        sharded: write each backup as a sharded folder (``torch.distributed.checkpoint``):
            every process writes its own shard in the background, and the folder appears
            under its final name (``sharded-e<epoch>-b<batch>``) only once every shard is
            written. ``None`` (the default): sharded when the model's parameters are
            (FSDP), one file otherwise. Either format resumes on another number of
            processes where that is exact (see below); the sharded one never gathers the
            whole model on one process.

    Unlike Keras, which restarts the interrupted epoch from its start with the weights alone,
    a backup holds the model, every optimizer, the epoch and batch, the data order of the epoch,
    the running metrics, the torch / numpy / Python RNG states and every callback's state
    (EarlyStopping's wait, ReduceLROnPlateau's cooldown, ModelCheckpoint's best, CSVLogger's
    and TensorBoard's positions, the History). A resumed run ends with the same weights, the
    same History and the same files as one that was never interrupted. Backups are written
    atomically: a kill during a save leaves the previous backup intact (to a URL: each backup
    is one object, sent in one PUT, which the store replaces whole).

    SIGTERM (a preemption) and Ctrl-C make ``fit`` finish the current batch, write a backup
    and stop: SIGTERM raises :class:`Preempted` (a ``SystemExit``, exit code 143),
    Ctrl-C ``KeyboardInterrupt``; a second Ctrl-C interrupts at once. Exactness needs the same
    script, device and thread count; with a ``DataLoader``, ``num_workers`` must not change.

    A backup taken on N processes resumes on M (``torchrun --nproc_per_node=M``): the global
    batch (``batch_size``) stays, each process takes 1/M of it, and the next batch holds the
    samples it would have held on N. Refused, saying why, where it cannot be exact: when
    training drew random numbers (dropout, random augmentation: each process has its own
    random stream) or a DataLoader brings its own ``DistributedSampler`` (its batch is per
    process).

    Example:
        ```python
        backup = BackupAndRestore("runs/backup", save_freq=100)
        model.fit(x, y, epochs=50, callbacks=[backup, CSVLogger("log.csv")])
        # killed? run the same script again: it resumes at the last backup
        ```
    """

    state_key_attributes = ("backup_dir",)

    def __init__(
        self,
        backup_dir: str | os.PathLike[str],
        save_freq: str | int | datetime.timedelta = "epoch",
        double_checkpoint: bool = False,
        delete_checkpoint: bool = True,
        sharded: bool | None = None,
    ) -> None:
        if not backup_dir:
            raise ValueError("Empty `backup_dir` argument passed")
        schedule = parse_save_freq(save_freq)
        if schedule is None:
            raise ValueError(
                f"Invalid value for argument `save_freq`. Received: save_freq="
                f"{save_freq!r}. Expected {ACCEPTED}."
            )
        self.backup_dir = checkpoint.location(backup_dir)
        if sharded is not None and not isinstance(sharded, bool):
            raise ValueError(
                f"Invalid value for argument `sharded`. Received: sharded={sharded!r}. "
                "Expected True, False or None (sharded when the model is)."
            )
        if sharded:
            checkpoint.local_only(self.backup_dir, "BackupAndRestore(sharded=True)")
        self.sharded = sharded
        self.save_freq = save_freq
        self._timer = schedule if isinstance(schedule, SaveTimer) else None
        self.double_checkpoint = double_checkpoint
        self.delete_checkpoint = delete_checkpoint
        self.latest_path = checkpoint.join(self.backup_dir, "latest.pt")
        self.previous_path = checkpoint.join(self.backup_dir, "previous.pt")
        self.resumed_from: Path | str | None = None
        self._resume_state: dict[str, Any] | None = None
        self._batches_since_save = 0
        self._old_handlers: dict[int, Any] = {}
        self._signal: int | None = None
        self._keep = False
        if save_freq == "epoch":
            self.unused_hooks = ("on_train_batch_end",)

    # --- loading --------------------------------------------------------------------------------
    def _is_sharded(self) -> bool:
        if self.sharded is not None:
            return self.sharded
        if state.is_sharded(self.model):
            checkpoint.local_only(self.backup_dir, "BackupAndRestore of a sharded model")
            return True
        return False

    def _load(self) -> dict[str, Any] | None:
        folders = checkpoint.sharded_folders(self.backup_dir)
        files = [p for p in (self.latest_path, self.previous_path) if checkpoint.exists(p)]
        candidates: list[Path | str] = (
            [*folders, *files] if self._is_sharded() else [*files, *folders]
        )
        if not candidates:
            return None
        errors = []
        for path in candidates:
            try:
                is_folder = path in folders
                saved = checkpoint.load(Path(path) / checkpoint.SHARDED_META if is_folder else path)
                if is_folder:
                    saved["sharded"] = str(path)
                if saved.get("kind") != "training_state":
                    raise checkpoint.CheckpointError(
                        22, f"{str(path)!r} is not a training-state backup."
                    )
            except checkpoint.CheckpointError as exc:
                errors.append((path, exc))
                continue
            if errors:
                bad = "; ".join(f"{p}: {e.strerror or e}" for p, e in errors)
                warnings.warn(
                    f"BackupAndRestore: the newest backup is unusable ({bad}). "
                    f"Resuming from the previous backup {path} instead.",
                    stacklevel=3,
                )
            self.resumed_from = path
            saved["path"] = str(path)
            return saved
        details = "; ".join(f"{p}: {e.strerror or e}" for p, e in errors)
        raise checkpoint.CheckpointError(
            5,
            f"BackupAndRestore cannot resume: no usable backup in {str(self.backup_dir)!r} "
            f"({details}). Training was not started over silently: move or delete that "
            "folder to start from scratch.",
        )

    def take_resume_state(self) -> dict[str, Any] | None:
        resume, self._resume_state = self._resume_state, None
        return resume

    # --- saving ---------------------------------------------------------------------------------
    def _request_save(self) -> None:
        self.model.loop.at_step_boundary(self._save)

    def _save(self) -> None:
        if self._is_sharded():
            self._save_sharded()
            return
        snap = tensors.snapshot(self.model.loop.training_state())

        def write() -> None:
            if (  # rank 0 alone: another rank would move rank 0's new backup
                self.double_checkpoint
                and distributed.is_main()
                and checkpoint.exists(self.latest_path)
            ):
                checkpoint.copy_over(self.latest_path, self.previous_path)
            checkpoint.save(snap, self.latest_path)

        checkpoint.save_in_background(write, str(self.latest_path))

    def _save_sharded(self) -> None:
        """Every rank writes its shard of the weights and optimizers (DCP, in the background);
        rank 0 adds the rest (position, RNG of every rank, callbacks) and names the folder."""
        folder = checkpoint.local_only(self.backup_dir, "BackupAndRestore(sharded=True)")
        meta = tensors.snapshot(self.model.loop.training_state(sharded=True))
        checkpoint.save_sharded(
            state.sharded_tensors(self.model),
            meta,
            folder,
            checkpoint.sharded_name(meta["epoch"], meta["batch"]),
            keep=2 if self.double_checkpoint else 1,
            group=distributed.checkpoint_group(),
        )

    # --- hooks ----------------------------------------------------------------------------------
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if not hasattr(self.model, "loop"):
            raise RuntimeError("BackupAndRestore works inside torcheras Model.fit only.")
        self._batches_since_save = 0
        if self._timer is not None:
            self._timer.start()
        self.resumed_from = None
        self._resume_state = self._load()
        self._install_signal_handlers()
        self._keep = False  # a Timer's stop keeps the backup for the next run
        self.model.loop.interrupt_handler = self._save_and_stop

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self.model.loop.accumulating:  # save_freq counts optimizer steps
            return
        if self._timer is not None:
            if self._timer.due():
                self._request_save()
            return
        self._batches_since_save += 1
        if self._batches_since_save >= self.save_freq:  # type: ignore[operator]
            self._batches_since_save = 0
            self._request_save()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.save_freq == "epoch":
            self._request_save()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._restore_signal_handlers()
        checkpoint.wait_for_writes()  # a backup still being written would come back
        if self.delete_checkpoint and not self._keep and distributed.is_main():  # rank 0's
            for path in (self.latest_path, self.previous_path):
                checkpoint.remove(path)
            if isinstance(self.backup_dir, str):  # a URL: no folder to remove
                return
            checkpoint.remove_sharded(self.backup_dir)
            for stale in self.backup_dir.glob(f"{checkpoint.TEMP_PREFIX}*"):
                with contextlib.suppress(OSError):
                    stale.unlink()
            with contextlib.suppress(OSError):
                self.backup_dir.rmdir()  # only if nothing else is in it

    def on_exception(self, exception: BaseException) -> None:
        self._restore_signal_handlers()

    # --- preemption -----------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        self._signal = None
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[signum] = signal.signal(signum, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self._signal = signum
        # acted on at the next step boundary, on every rank at once
        self.model.loop.request_interrupt(signum)

    def _save_and_stop(self, signum: int) -> None:
        """Every rank at the same batch (a signal may have reached one rank only). A spent
        time budget (Timer) keeps the backup and ends ``fit`` cleanly."""
        self._signal = signum
        self._save()
        checkpoint.wait_for_writes()  # exit only once the backup has landed
        if signum == TIME_UP:
            self._keep = True
            raise StopFit
        if self._signal == signal.SIGTERM:
            raise Preempted(128 + signal.SIGTERM)
        raise KeyboardInterrupt

    def state_dict(self) -> dict[str, Any]:
        timer = {} if self._timer is None else {"timer": self._timer.state_dict()}
        return {"batches_since_save": self._batches_since_save, **timer}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: A002 - the module's name
        self._batches_since_save = state["batches_since_save"]
        if self._timer is not None and "timer" in state:
            self._timer.load_state_dict(state["timer"])
