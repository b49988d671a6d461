"""WandbLogger: the configuration, metrics, learning rate, best checkpoints and stop reason of
a fit, in a Weights & Biases run (W&B's own client; no TensorFlow)."""

from __future__ import annotations

import os
import secrets
import string
from typing import Any

from torcheras.callbacks.callback import Callback
from torcheras.callbacks.history import hyperparameters
from torcheras.callbacks.model_checkpoint import files_written

__all__ = ["WandbLogger"]


class WandbLogger(Callback):
    """Track a ``fit`` in Weights & Biases, through W&B's own client.

    - at the start: a run (``wandb.init``) whose config holds the compile settings, the
      optimizer's settings, the parameter count, ``fit``'s ``epochs`` and ``steps`` per epoch,
      and ``config``;
    - after each epoch: every log value (``loss``, ``val_*``, ``learning_rate``...) and
      ``epoch`` (0-based, as ``History.epoch``);
    - with ``log_freq=N``: every N training batches, the batch logs (running means over the
      epoch so far) and the batch's learning rate as ``batch/<key>``;
    - with ``fit(validation_interval=N)``: every validation's ``val_*`` keys, mid-epoch ones
      included, at the global batch step where it ran;
    - at the end: the stop reason as the summary's ``stop_reason``, and with
      ``log_checkpoints=True`` the files the ModelCheckpoint callbacks of this fit wrote last
      (the best one with ``save_best_only``) as a ``model`` artifact; the run is finished with
      exit code 0, or 1 (FAILED) if ``fit`` raised.

    Steps: every row is logged at the global batch step (``model.loop.global_step``, the
    training batches run so far), so epoch rows and batch rows share one increasing axis and a
    resumed fit goes on where it stopped. The run id is part of the callback's state: a fit
    resumed by BackupAndRestore continues the same run (``resume="allow"``).

    Under torchrun, rank 0 alone logs. ``self.run`` is the W&B run while ``fit`` runs,
    ``self.run_id`` its id.

    Args:
        project: the W&B project.
        name: the run's display name.
        config: extra config entries (they win over the collected ones).
        tags: run tags.
        mode: ``"online"``, ``"offline"`` or ``"disabled"`` (default: W&B's, ``WANDB_MODE``).
        dir: where W&B writes its files (default: W&B's, ``WANDB_DIR``).
        log_freq: log the batch logs every ``log_freq`` training batches (0: epochs only).
        log_checkpoints: log the checkpoints of this fit's ModelCheckpoint callbacks.
        run_id: the id of the run to create or continue.
        run: log into this W&B run, created by you (left open at the end).
        settings: a ``wandb.Settings`` (default: one that leaves ``wandb.run`` alone).
        **init_kwargs: passed on to ``wandb.init`` (``entity``, ``group``, ``notes``...).

    Example:
        ```python
        model.fit(x, y, epochs=10, validation_split=0.2, callbacks=[
            ModelCheckpoint("best.pt", save_best_only=True),
            WandbLogger("digits", log_freq=50, log_checkpoints=True)])
        ```
    """

    rank_zero_only = True
    state_key_attributes = ("project",)

    def __init__(
        self,
        project: str | None = None,
        name: str | None = None,
        *,
        config: dict[str, Any] | None = None,
        tags: list[str] | None = None,
        mode: str | None = None,
        dir: str | os.PathLike[str] | None = None,
        log_freq: int = 0,
        log_checkpoints: bool = False,
        run_id: str | None = None,
        run: Any = None,
        settings: Any = None,
        **init_kwargs: Any,
    ) -> None:
        if not isinstance(log_freq, int) or isinstance(log_freq, bool) or log_freq < 0:
            raise ValueError(
                "WandbLogger: `log_freq` must be a non-negative integer (0: epochs only); "
                f"got {log_freq!r}."
            )
        if mode not in (None, "online", "offline", "disabled"):
            raise ValueError(
                "WandbLogger: `mode` must be 'online', 'offline' or 'disabled' (or None for "
                f"W&B's default); got {mode!r}."
            )
        self.project = project
        self.name = name
        self.config = dict(config or {})
        self.tags = list(tags or [])
        self.mode = mode
        self.dir = None if dir is None else str(dir)
        self.log_freq = log_freq
        self.log_checkpoints = log_checkpoints
        self.run_id = run_id if run is None else run.id
        self.settings = settings
        self.init_kwargs = init_kwargs
        self.run: Any = run
        self._own_run = run is None
        self._given_id = run_id
        self._resume = False
        self._config: dict[str, Any] = {}
        if log_freq == 0:
            self.unused_hooks = ("on_train_batch_end",)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._config = {
            **hyperparameters(self.model),
            "epochs": self.params.get("epochs"),
            "steps": self.params.get("steps"),
            **self.config,
        }
        if self._own_run:
            self.run = None  # opened at the first log: a resumed fit loads its id first
            self.run_id = self._given_id or _new_id()  # in every backup, even before a row
            self._resume = self._given_id is not None
        else:
            self.run.config.update(self._config, allow_val_change=True)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resumed fit (BackupAndRestore) goes on logging into the run it started."""
        if self._own_run and self.run is None and state.get("run_id"):
            self.run_id, self._resume = state["run_id"], True

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def _open(self) -> Any:
        if self.run is not None:
            return self.run
        try:
            import wandb
        except ImportError:
            raise ImportError("WandbLogger needs wandb: pip install 'torcheras[wandb]'.") from None
        settings = self.settings or wandb.Settings(reinit="create_new")
        if self.dir is not None:
            os.makedirs(self.dir, exist_ok=True)
        kwargs = {"resume": "allow"} if self._resume else {}
        self.run = wandb.init(
            project=self.project,
            name=self.name,
            config=self._config,
            tags=self.tags or None,
            mode=self.mode,
            dir=self.dir,
            id=self.run_id,
            settings=settings,
            **{**kwargs, **self.init_kwargs},
        )
        self.run_id = self.run.id
        return self.run

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        loop = self.model.loop
        if loop.global_step % self.log_freq:
            return
        row = {f"batch/{k}": float(v) for k, v in (logs or {}).items() if _is_number(v)}
        rates = loop.batch_learning_rates
        if rates:
            row["batch/learning_rate"] = float(rates[-1])
        self._open().log(row, step=loop.global_step)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        row = {k: float(v) for k, v in (logs or {}).items() if _is_number(v)}
        row["epoch"] = epoch
        self._open().log(row, step=self.model.loop.global_step)

    def on_validation_end(self, step: int, logs: dict[str, Any] | None = None) -> None:
        row = {k: float(v) for k, v in (logs or {}).items() if _is_number(v)}
        self._open().log(row, step=self.model.loop.global_step)  # an epoch end's: one row

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        run = self._open()
        history = getattr(self.model, "history", None)
        run.summary["stop_reason"] = getattr(history, "stop_reason", None) or "all epochs ran"
        if self.log_checkpoints:
            self._log_checkpoints(run)
        self._finish(0)

    def on_exception(self, exception: BaseException) -> None:
        if self._own_run and self.run is None and self._config:
            self._open()  # failed before its first row: the run still says FAILED
        self._finish(1)

    def _finish(self, exit_code: int) -> None:
        if self.run is not None and self._own_run:
            self.run.finish(exit_code=exit_code)
            self.run = None
        self._config = {}

    def _log_checkpoints(self, run: Any) -> None:
        import wandb

        with files_written(self.model) as files:
            if not files:
                return
            artifact = wandb.Artifact(f"model-{run.id}", type="model")
            for path in files:
                artifact.add_file(str(path), name=path.name)  # copied into W&B's staging
            run.log_artifact(artifact, aliases=["latest"])


def _new_id() -> str:
    """A run id as W&B draws them: 8 base-36 digits."""
    return "".join(secrets.choice(string.digits + string.ascii_lowercase) for _ in range(8))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
