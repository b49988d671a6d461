"""MLflowLogger: parameters, per-epoch metrics, the best checkpoint, the plots and the stop
reason of a fit, in an MLflow tracking store."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from torcheras.callbacks.callback import Callback
from torcheras.callbacks.history import hyperparameters
from torcheras.callbacks.model_checkpoint import files_written

__all__ = ["MLflowLogger"]


class MLflowLogger(Callback):
    """Track a ``fit`` in MLflow, through MLflow's own client (no global state touched).

    - at the start: a run in ``experiment_name`` (created if needed) with the
      hyper-parameters as params (compile settings, optimizer settings, parameter count,
      ``epochs``) and ``tags``;
    - after each epoch: every log value as a metric at ``step=epoch`` (0-based, as Keras's
      History);
    - at the end: the checkpoints that ModelCheckpoint callbacks of this fit wrote (the best
      one with ``save_best_only``) and the training curves (``curves.png``, with the ``plot``
      extra) as artifacts, and the stop reason as the ``stop_reason`` tag; the run is closed
      FINISHED, or FAILED / KILLED if ``fit`` raised.

    Args:
        experiment_name: the MLflow experiment (default ``"torcheras"``).
        run_name: the run's name.
        tracking_uri: where the store is (``"sqlite:///mlflow.db"``, an HTTP server...);
            default: MLflow's own (``MLFLOW_TRACKING_URI``).
        artifact_location: for a new experiment, where its artifacts go.
        tags: extra run tags.
        log_checkpoints: upload the checkpoints as artifacts.
        log_plots: upload the curves as an artifact.
        run_id: log into this existing run instead of creating one (left open at the end).

    Under torchrun, rank 0 alone logs. ``self.run_id`` names the run.

    Example:
        ```python
        model.fit(x, y, epochs=10, callbacks=[
            ModelCheckpoint("best.pt", save_best_only=True),
            MLflowLogger("digits", tracking_uri="sqlite:///mlflow.db")])
        ```
    """

    rank_zero_only = True
    state_key_attributes = ("experiment_name",)

    def __init__(
        self,
        experiment_name: str = "torcheras",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        artifact_location: str | None = None,
        tags: dict[str, str] | None = None,
        log_checkpoints: bool = True,
        log_plots: bool = True,
        run_id: str | None = None,
    ) -> None:
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.tracking_uri = tracking_uri
        self.artifact_location = artifact_location
        self.tags = dict(tags or {})
        self.log_checkpoints = log_checkpoints
        self.log_plots = log_plots
        self.run_id = run_id
        self._own_run = run_id is None
        self._client: Any = None

    def _connect(self) -> Any:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ImportError(
                "MLflowLogger needs MLflow: pip install 'torcheras[mlflow]'."
            ) from None
        return MlflowClient(tracking_uri=self.tracking_uri)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        client = self._client = self._connect()
        if self._own_run:  # a new run for each fit
            experiment = client.get_experiment_by_name(self.experiment_name)
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else client.create_experiment(
                    self.experiment_name, artifact_location=self.artifact_location
                )
            )
            tags = {"framework": "torcheras", **self.tags}
            self.run_id = client.create_run(
                experiment_id, run_name=self.run_name, tags=tags
            ).info.run_id
        self._log_params()

    def _log_params(self) -> None:
        from mlflow.entities import Param

        params = {**hyperparameters(self.model), "epochs": self.params.get("epochs")}
        existing = self._client.get_run(self.run_id).data.params
        fresh = [
            Param(k, str(v)[:6000])
            for k, v in params.items()
            if v is not None and k not in existing
        ]
        if fresh:
            self._client.log_batch(self.run_id, params=fresh)

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resumed fit (BackupAndRestore) goes on logging into the run it started."""
        previous = state.get("run_id")
        if not previous or previous == self.run_id or not self._own_run or self._client is None:
            return
        self._client.delete_run(self.run_id)  # the empty run this process had just opened
        self.run_id = previous
        self._client.update_run(previous, status="RUNNING")

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), now, epoch)
            for key, value in (logs or {}).items()
            if isinstance(value, (int, float))
        ]
        if metrics and self._client is not None:
            self._client.log_batch(self.run_id, metrics=metrics)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        client = self._client
        if client is None:
            return
        history = getattr(self.model, "history", None)
        reason = getattr(history, "stop_reason", None)
        client.set_tag(self.run_id, "stop_reason", reason or "all epochs ran")
        if self.log_checkpoints:
            with files_written(self.model) as files:
                for path in files:
                    client.log_artifact(self.run_id, str(path), "checkpoints")
        if self.log_plots and history is not None and history.history:
            try:
                with tempfile.TemporaryDirectory() as folder:
                    curves = Path(folder) / "curves.png"
                    history.plot(curves)
                    client.log_artifact(self.run_id, str(curves), "plots")
            except ImportError:
                pass  # no matplotlib: the metrics are in MLflow anyway
        self._finish("FINISHED")

    def on_exception(self, exception: BaseException) -> None:
        killed = isinstance(exception, (KeyboardInterrupt, SystemExit))
        self._finish("KILLED" if killed else "FAILED")

    def _finish(self, status: str) -> None:
        if self._client is not None and self._own_run:
            self._client.set_terminated(self.run_id, status=status)
        self._client = None
