"""MLflowLogger against a real local MLflow store (sqlite), read back with MLflow's client."""

from __future__ import annotations

import warnings

import pytest
from conftest import make_model

from torcheras import callbacks as cb

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{folder}/mlflow.db", str(folder / "artifacts")


def test_params_metrics_checkpoint_plot_and_stop_reason_reach_mlflow(blobs, tmp_path, store):
    from mlflow.tracking import MlflowClient

    uri, artifacts = store
    x, y = blobs
    logger = cb.MLflowLogger("tests", run_name="blobs", tracking_uri=uri,
                             artifact_location=artifacts, tags={"team": "torcheras"})  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = make_model().fit(
            x, y, epochs=30, validation_split=0.25, verbose=0,
            callbacks=[
                cb.ModelCheckpoint(tmp_path / "best.pt", save_best_only=True),
                cb.EarlyStopping(patience=1, min_delta=0.05),
                logger,
            ],
        )  # fmt: skip
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "blobs"
    assert run.data.tags["stop_reason"] == history.stop_reason
    assert run.data.tags["team"] == "torcheras"
    assert run.data.params["optimizer"] == "KerasAdam" and run.data.params["epochs"] == "30"
    assert float(run.data.params["lr"]) == pytest.approx(0.02)
    for key, values in history.history.items():
        logged = client.get_metric_history(logger.run_id, key)
        assert [m.step for m in logged] == history.epoch
        assert [m.value for m in logged] == pytest.approx(values)
    files = {a.path for folder in ("checkpoints", "plots")
             for a in client.list_artifacts(logger.run_id, folder)}  # fmt: skip
    assert files == {"checkpoints/best.pt", "plots/curves.png"}


def test_a_failed_fit_closes_its_run_as_failed(blobs, store):
    from mlflow.tracking import MlflowClient

    uri, artifacts = store
    x, y = blobs
    logger = cb.MLflowLogger("tests", tracking_uri=uri, artifact_location=artifacts)

    def boom(batch, logs):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing = cb.LambdaCallback(on_train_batch_end=boom)
        make_model().fit(x, y, epochs=1, verbose=0, callbacks=[logger, failing])
    assert MlflowClient(tracking_uri=uri).get_run(logger.run_id).info.status == "FAILED"


def test_a_checkpoint_at_a_url_is_uploaded_as_the_bytes_in_the_store(blobs, tmp_path, store):
    pytest.importorskip("fsspec")
    from mlflow.tracking import MlflowClient

    from torcheras import checkpoint

    uri, artifacts = store
    x, y = blobs
    url = "memory://mlflow-test/run/best.pt"
    logger = cb.MLflowLogger("tests", tracking_uri=uri, artifact_location=artifacts)
    make_model().fit(x, y, epochs=2, validation_split=0.25, verbose=0,
                     callbacks=[cb.ModelCheckpoint(url, save_best_only=True), logger])  # fmt: skip
    client = MlflowClient(tracking_uri=uri)
    assert [a.path for a in client.list_artifacts(logger.run_id, "checkpoints")] == [
        "checkpoints/best.pt"
    ]
    local = client.download_artifacts(logger.run_id, "checkpoints/best.pt", str(tmp_path))
    with open(local, "rb") as f:
        assert f.read() == checkpoint.read_bytes(url)
