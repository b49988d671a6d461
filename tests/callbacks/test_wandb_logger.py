"""WandbLogger with W&B's own client in offline mode, read back from the run's ``.wandb``
file (W&B's protobuf records) and compared with History."""

from __future__ import annotations

import base64
import hashlib
import sys
import warnings

import pytest
from conftest import guide_snippet, make_model
from wandb_files import offline_runs

from torcheras import callbacks as cb

wandb = pytest.importorskip("wandb")

TOL = 1e-6  # the values are float32 results carried as Python floats: JSON keeps them exactly


@pytest.fixture(autouse=True, scope="module")
def offline(tmp_path_factory):
    """No network, nothing written outside the tests' folders, no console capture or system
    stats. W&B reads its environment once per process: each test passes its own ``dir``."""
    home = str(tmp_path_factory.mktemp("wandb-home"))
    settings = {
        **{f"WANDB_{name}": home for name in ("DIR", "CACHE_DIR", "DATA_DIR", "CONFIG_DIR")},
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_X_DISABLE_STATS": "true",
        "WANDB_DISABLE_GIT": "true",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in settings.items():
            patch.setenv(name, value)
        patch.delenv("WANDB_API_KEY", raising=False)
        yield


def epoch_rows(run):
    return [row for row in run.rows if "epoch" in row]


def test_config_epochs_batches_stop_reason_and_best_checkpoint_reach_the_run(blobs, tmp_path):
    x, y = blobs  # 180 training samples in batches of 32: 6 batches per epoch
    seen = {}  # the batch logs another callback receives, by global step
    record = cb.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.__setitem__(
            logger.model.loop.global_step, dict(logs)
        )
    )
    logger = cb.WandbLogger("tests", "blobs", dir=tmp_path, log_freq=4, log_checkpoints=True,
                            config={"team": "torcheras"}, tags=["unit"])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = make_model().fit(
            x, y, epochs=30, batch_size=32, validation_split=0.25, verbose=0,
            callbacks=[
                cb.ModelCheckpoint(tmp_path / "best.pt", save_best_only=True),
                cb.EarlyStopping(patience=1, min_delta=0.05),
                logger, record,
            ],
        )  # fmt: skip
    assert "tensorflow" not in sys.modules
    assert history.stop_reason.startswith("EarlyStopping") and len(history.epoch) < 30
    (run,) = offline_runs(tmp_path)
    assert run.id == logger.run_id and run.exit_code == 0 and not run.resumed
    assert run.config["optimizer"] == "KerasAdam" and run.config["lr"] == pytest.approx(0.02)
    assert run.config["epochs"] == 30 and run.config["steps"] == 6
    assert run.config["loss"] == "sparse_categorical_crossentropy"
    assert run.config["team"] == "torcheras"
    assert run.summary["stop_reason"] == history.stop_reason

    rows = epoch_rows(run)
    assert [row["epoch"] for row in rows] == history.epoch
    assert [row["_step"] for row in rows] == [6 * (e + 1) for e in history.epoch]
    for key, values in history.history.items():
        assert [row[key] for row in rows] == pytest.approx(values, rel=TOL), key

    batch_rows = [row for row in run.rows if "batch/loss" in row]
    steps = [row["_step"] for row in batch_rows]
    assert steps == list(range(4, 6 * len(history.epoch) + 1, 4))
    for row in batch_rows:
        logs = seen[row["_step"]]
        assert row["batch/loss"] == pytest.approx(logs["loss"], rel=TOL)
        assert row["batch/accuracy"] == pytest.approx(logs["accuracy"], rel=TOL)
        assert row["batch/learning_rate"] == pytest.approx(0.02)

    (artifact,) = run.artifacts
    assert artifact.type == "model" and artifact.name == f"model-{run.id}"
    (entry,) = artifact.manifest.contents
    best = (tmp_path / "best.pt").read_bytes()
    assert entry.path == "best.pt" and entry.size == len(best)
    assert entry.digest == base64.b64encode(hashlib.md5(best).digest()).decode()


def test_a_crashed_fit_fails_its_run_and_the_resumed_fit_continues_it(blobs, tmp_path):
    x, y = blobs  # 240 samples in batches of 40: 6 batches per epoch

    def crash(batch, logs):
        if logger.model.loop.epoch == 1 and batch == 2:
            raise RuntimeError("boom")

    backup = tmp_path / "backup"
    logger = cb.WandbLogger("tests", dir=tmp_path / "first")
    with pytest.raises(RuntimeError, match="boom"):
        make_model().fit(
            x, y, epochs=3, batch_size=40, verbose=0,
            callbacks=[cb.BackupAndRestore(backup), logger,
                       cb.LambdaCallback(on_train_batch_end=crash)],
        )  # fmt: skip
    (failed,) = offline_runs(tmp_path / "first")
    assert failed.exit_code == 1  # FAILED in W&B
    assert [row["epoch"] for row in epoch_rows(failed)] == [0]

    resumed_logger = cb.WandbLogger("tests", dir=tmp_path / "second")
    history = make_model().fit(
        x, y, epochs=3, batch_size=40, verbose=0,
        callbacks=[cb.BackupAndRestore(backup), resumed_logger],
    )  # fmt: skip
    (resumed,) = offline_runs(tmp_path / "second")
    assert resumed.id == failed.id == resumed_logger.run_id and resumed.resumed
    assert resumed.exit_code == 0 and resumed.summary["stop_reason"] == "all epochs ran"
    rows = epoch_rows(failed) + epoch_rows(resumed)
    assert [row["epoch"] for row in rows] == history.epoch == [0, 1, 2]
    assert [row["_step"] for row in rows] == [6, 12, 18]  # one axis across both processes
    for key, values in history.history.items():
        assert [row[key] for row in rows] == pytest.approx(values, rel=TOL), key


def test_a_fit_resumed_from_a_backup_taken_before_the_first_row_continues_the_run(blobs, tmp_path):
    x, y = blobs  # 6 batches per epoch, backups every 2 batches, a crash at batch 4

    def crash(batch, logs):
        if batch == 4:
            raise RuntimeError("boom")

    backup, first = tmp_path / "backup", cb.WandbLogger("tests", dir=tmp_path / "first")
    with pytest.raises(RuntimeError, match="boom"):
        make_model().fit(
            x, y, epochs=2, batch_size=40, verbose=0,
            callbacks=[cb.BackupAndRestore(backup, save_freq=2), first,
                       cb.LambdaCallback(on_train_batch_end=crash)],
        )  # fmt: skip
    second = cb.WandbLogger("tests", dir=tmp_path / "second")
    history = make_model().fit(
        x, y, epochs=2, batch_size=40, verbose=0,
        callbacks=[cb.BackupAndRestore(backup, save_freq=2), second],
    )  # fmt: skip
    (failed,) = offline_runs(tmp_path / "first")
    (resumed,) = offline_runs(tmp_path / "second")
    assert failed.exit_code == 1 and epoch_rows(failed) == [] and not failed.resumed
    assert resumed.id == failed.id == second.run_id and resumed.resumed
    assert [row["_step"] for row in epoch_rows(resumed)] == [6, 12]
    assert [row["loss"] for row in epoch_rows(resumed)] == pytest.approx(
        history.history["loss"], rel=TOL
    )


def test_a_run_of_your_own_is_logged_into_and_left_open(blobs, tmp_path):
    x, y = blobs
    run = wandb.init(project="tests", dir=tmp_path, settings=wandb.Settings(reinit="create_new"))
    try:
        history = make_model().fit(x, y, epochs=2, verbose=0, callbacks=[cb.WandbLogger(run=run)])
        run.log({"after": 1.0}, step=100)  # still open
    finally:
        run.finish()
    (read,) = offline_runs(tmp_path)
    assert read.id == run.id and read.config["epochs"] == 2
    rows = epoch_rows(read)
    assert [row["loss"] for row in rows] == pytest.approx(history.history["loss"], rel=TOL)
    assert read.rows[-1]["after"] == 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"log_freq": -1}, r"`log_freq` must be a non-negative integer.*got -1"),
        ({"log_freq": 2.5}, r"`log_freq` must be a non-negative integer.*got 2\.5"),
        ({"mode": "offlne"}, r"`mode` must be 'online', 'offline' or 'disabled'.*'offlne'"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cb.WandbLogger("tests", **kwargs)


def test_the_guides_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(
        compile(guide_snippet("integrations.md", "Weights & Biases"), "integrations.md", "exec"),
        namespace,
    )
    assert namespace["model"].history.epoch == [0, 1, 2, 3, 4]
    assert (tmp_path / "best.pt").exists()
