"""ModelCheckpoint: save the model (or the best one so far) as training goes."""

from __future__ import annotations

import contextlib
import datetime
import string
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torcheras import checkpoint, state
from torcheras.callbacks.callback import Callback
from torcheras.callbacks.monitor import Monitor
from torcheras.callbacks.save_schedule import ACCEPTED, SaveTimer, parse_save_freq

__all__ = ["ModelCheckpoint"]


class ModelCheckpoint(Callback):
    """Save the model every epoch (or every ``save_freq`` batches), or only when it improves.

    Args:
        filepath: any file name; formatted with ``epoch`` (1-based), ``batch`` and any log key,
            e.g. ``"ckpt/{epoch:02d}-{val_loss:.2f}.pt"``. Folders are created. A
            ``.safetensors`` name needs ``save_weights_only=True``. A URL such as
            ``"s3://bucket/run/best.pt"`` is written through fsspec, whole, by one PUT.
        monitor: the log key for ``save_best_only``. Default ``"val_loss"``.
        verbose: 1 prints each save.
        save_best_only: save only when ``monitor`` improves; if it is missing from the logs,
            warn and do **not** save (Keras saves anyway, which can overwrite a good model).
        save_weights_only: the state_dict alone; otherwise a saved model, as ``model.save``
            writes it (weights, every optimizer, the schedulers, the scaler, the weight
            average, the compile names) with the epoch and its logs.
        mode: ``"auto"``, ``"min"`` or ``"max"``.
        save_freq: ``"epoch"``, a number of batches (counted across epochs), or an amount of
            training time, a ``datetime.timedelta`` or a string such as ``"30min"``, ``"2h"``,
            ``"90s"``, ``"1h30min"``: a save once that much time has passed since the last
            one (checked after each batch, with the batch logs; see ``save_schedule``).
        initial_value_threshold: a value the first saved model must beat.
        sharded: a full checkpoint (not ``save_weights_only``) as a folder of
            ``torch.distributed.checkpoint`` shards at ``filepath``: each process writes its
            own, in the background, and the folder appears under its name once complete;
            ``model.load(folder)`` reads it on any number of processes. ``None`` (the
            default): sharded when the model's parameters are (FSDP); a weights-only file of
            a sharded model is gathered into one file, which one process loads.

    Files are written atomically and load with ``torch.load(weights_only=True)``,
    ``model.load_weights(path)``, or (full files) ``model.load(path)``, which continues
    training from them. ``best`` is kept across fits, as in Keras.

    With ``fit(validation_interval=N)``, ``save_best_only=True``, ``save_freq="epoch"`` and a
    ``val_*`` monitor, it compares after every validation (``on_validation_end``), mid-epoch
    ones included, instead of at epoch ends: the best validation is the one saved (``{batch}``
    in the name is then the batch it followed, 1-based; the logs hold the ``val_*`` keys).

    Example:
        ```python
        ckpt = ModelCheckpoint("ckpt/best.pt", monitor="val_accuracy", save_best_only=True)
        model.fit(x, y, epochs=20, validation_split=0.2, callbacks=[ckpt])
        model.load_weights("ckpt/best.pt")
        ```
    """

    state_key_attributes = ("filepath", "monitor")

    def __init__(
        self,
        filepath: str,
        monitor: str = "val_loss",
        verbose: int = 0,
        save_best_only: bool = False,
        save_weights_only: bool = False,
        mode: str = "auto",
        save_freq: str | int | datetime.timedelta = "epoch",
        initial_value_threshold: float | None = None,
        sharded: bool | None = None,
    ) -> None:
        filepath = str(filepath)
        if not filepath:
            raise ValueError(
                "ModelCheckpoint: `filepath` is empty; pass a file name such as 'ckpt/best.pt'."
            )
        schedule = parse_save_freq(save_freq)
        if schedule is None:
            raise ValueError(
                f"Unrecognized save_freq: {save_freq!r}. Expected save_freq are {ACCEPTED}."
            )
        _check_template(filepath)
        if checkpoint.is_safetensors(filepath) and not save_weights_only:
            raise ValueError(
                f"ModelCheckpoint: {filepath!r} is a .safetensors file, which holds weights only; "
                "pass save_weights_only=True, or use a '.pt' name for a full checkpoint."
            )
        if sharded is not None and not isinstance(sharded, bool):
            raise ValueError(
                f"ModelCheckpoint: invalid sharded={sharded!r}. Expected True, False or None "
                "(sharded when the model is)."
            )
        if sharded and save_weights_only:
            raise ValueError(
                "ModelCheckpoint: sharded=True writes a full checkpoint folder; with "
                "save_weights_only=True the weights are one consolidated file. Pass one of them."
            )
        if sharded:
            checkpoint.local_only(checkpoint.location(filepath), "ModelCheckpoint(sharded=True)")
        self.sharded = sharded
        self.monitor_state = Monitor("ModelCheckpoint", monitor, mode)
        self.monitor = monitor
        self.filepath = filepath
        self.verbose = verbose
        self.save_best_only = save_best_only
        self.save_weights_only = save_weights_only
        self.save_freq = save_freq
        self._timer = schedule if isinstance(schedule, SaveTimer) else None
        self.best: float | None = initial_value_threshold
        self.last_saved: str | None = None
        self._batches_seen_since_last_saving = 0
        self._last_batch_seen = 0
        self._current_epoch = 0
        if save_freq == "epoch":
            self.unused_hooks = ("on_train_batch_end",)

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._current_epoch = epoch

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self._timer is not None:
            self._timer.start()

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self.save_freq == "epoch":
            return
        if self._timer is not None:
            if self._timer.due():
                self._save(self._current_epoch, batch, logs or {})
            return
        if batch <= self._last_batch_seen:  # a new epoch started
            self._batches_seen_since_last_saving += batch + 1
        else:
            self._batches_seen_since_last_saving += batch - self._last_batch_seen
        self._last_batch_seen = batch
        if self._batches_seen_since_last_saving >= self.save_freq:
            self._batches_seen_since_last_saving = 0
            self._save(self._current_epoch, batch, logs or {})

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        checkpoint.wait_for_writes()  # the last save has landed (or raises) when fit returns

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.monitor_state.resolve(self.model, logs)  # as Keras: even when saving every epoch
        if self.save_freq == "epoch" and not self._per_validation():
            self._save(epoch, None, logs or {})

    def _per_validation(self) -> bool:
        """The best of every validation (fit's ``validation_interval``), not of epochs."""
        return self.save_best_only and self.monitor_state.per_validation(self.params)

    def on_validation_end(self, step: int, logs: dict[str, Any] | None = None) -> None:
        if self.save_freq == "epoch" and self._per_validation():
            loop = self.model.loop
            self._save(loop.epoch, max(loop.batch, 0), logs or {})

    def _format(self, epoch: int, batch: int | None, logs: Any) -> str:
        values = dict(logs)
        if batch is not None and "batch" not in values:
            values["batch"] = batch + 1
        try:
            return self.filepath.format(epoch=epoch + 1, **values)
        except KeyError as exc:
            raise KeyError(
                f'Failed to format this callback filepath: "{self.filepath}". Reason: {exc}. '
                f"Available keys: epoch, {', '.join(values)}."
            ) from exc
        except (ValueError, TypeError, IndexError) as exc:  # a format spec the value refuses
            raise ValueError(
                f'Failed to format this callback filepath: "{self.filepath}". Reason: {exc}. '
                "Give each field a spec its value takes, e.g. {epoch:02d} or {val_loss:.2f}."
            ) from exc

    def _save(self, epoch: int, batch: int | None, logs: Any) -> None:
        path = self._format(epoch, batch, logs)
        if self.save_best_only:
            monitor = self.monitor_state
            value = logs.get(self.monitor)
            if value is None:
                warnings.warn(
                    monitor.missing_message(
                        "ModelCheckpoint(save_best_only=True) did not save: it is conditioned on "
                        "metric",
                        logs,
                    ),
                    stacklevel=2,
                )
                return
            try:
                current = float(value)
            except (TypeError, ValueError):
                warnings.warn(
                    "Can save best model only when `monitor` is a scalar value. "
                    f"Received: {value}. Falling back to `save_best_only=False`.",
                    stacklevel=2,
                )
            else:
                monitor.resolve(self.model, logs)
                best = "None" if self.best is None else f"{self.best:.5f}"
                if not monitor.is_improvement(current, self.best):
                    if self.verbose > 0:
                        print(f"\nEpoch {epoch + 1}: {self.monitor} did not improve from {best}")
                    return
                if self.verbose > 0:
                    print(
                        f"\nEpoch {epoch + 1}: {self.monitor} improved from {best} to "
                        f"{current:.5f}, saving model to {path}"
                    )
                self.best = current
        elif self.verbose > 0:
            print(f"\nEpoch {epoch + 1}: saving model to {path}")
        state.save_model(
            self.model,
            path,
            weights_only=self.save_weights_only,
            epoch=epoch,
            logs=dict(logs),
            background=True,
            sharded=not self.save_weights_only
            and (self.sharded if self.sharded is not None else state.is_sharded(self.model)),
        )
        self.last_saved = path

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "last_saved": self.last_saved,
            "batches_since_save": self._batches_seen_since_last_saving,
            "last_batch_seen": self._last_batch_seen,
            "current_epoch": self._current_epoch,
            "monitor": self.monitor_state.state_dict(),
            **({"timer": self._timer.state_dict()} if self._timer is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.last_saved = state["best"], state["last_saved"]
        self._batches_seen_since_last_saving = state["batches_since_save"]
        self._last_batch_seen = state["last_batch_seen"]
        self._current_epoch = state["current_epoch"]
        self.monitor_state.load_state_dict(state.get("monitor", {}))
        if self._timer is not None and "timer" in state:
            self._timer.load_state_dict(state["timer"])


def _check_template(filepath: str, part: str | None = None) -> None:
    """Refuse, before training starts, a filepath template that can never be formatted: a
    positional field (``run {}/best.pt``, ``{val_loss:{}}``) or broken braces."""
    fix = (
        "Name a log key in each field, e.g. 'ckpt/{epoch:02d}-{val_loss:.2f}.pt', and double "
        "braces meant literally ('{{' and '}}')."
    )
    try:
        fields = list(string.Formatter().parse(filepath if part is None else part))
    except ValueError as exc:
        raise ValueError(
            f"ModelCheckpoint: the filepath {filepath!r} is malformed ({exc}). {fix}"
        ) from None
    for _, field, spec, _ in fields:
        if field is None:
            continue
        if field == "" or field.split(".")[0].split("[")[0].isdigit():
            raise ValueError(
                f"ModelCheckpoint: the filepath {filepath!r} has a positional field "
                f"{{{field}}}, which no log fills. {fix}"
            )
        if spec and "{" in spec:
            _check_template(filepath, spec)


@contextlib.contextmanager
def files_written(model: Any) -> Iterator[list[Path]]:
    """The files the ModelCheckpoint callbacks of ``model``'s fit wrote last, as local paths
    for the trackers that upload them (MLflowLogger, WandbLogger): a checkpoint at a URL is
    copied into a temporary folder that lasts as long as the ``with`` block."""
    callbacks = getattr(getattr(getattr(model, "loop", None), "callbacks", None), "callbacks", [])
    saved = [
        cb.last_saved
        for cb in callbacks
        if isinstance(cb, ModelCheckpoint) and getattr(cb, "last_saved", None) is not None
    ]
    with tempfile.TemporaryDirectory() as folder:
        found = []
        for path in saved:
            where = checkpoint.location(path)
            if isinstance(where, Path):
                if where.exists():
                    found.append(where)
            elif checkpoint.exists(where):
                local = Path(folder) / str(len(found)) / where.rstrip("/").rsplit("/", 1)[-1]
                local.parent.mkdir()
                local.write_bytes(checkpoint.read_bytes(where))
                found.append(local)
        yield found
