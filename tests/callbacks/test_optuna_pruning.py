"""OptunaPruning with real Optuna studies: in memory and SQLite, two threads, and one trial
trained by 2 ranks under torchrun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import guide_snippet, launch_script, make_model

from torcheras import callbacks as cb

optuna = pytest.importorskip("optuna")

TOL = 1e-6  # float32 results carried as Python floats: Optuna stores them as they are
SCRIPT = Path(__file__).parent.parent / "distributed" / "optuna_script.py"


@pytest.fixture(autouse=True)
def quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize("storage", ["memory", "sqlite"])
def test_a_study_of_8_trials_in_2_threads_prunes_and_records_what_history_holds(
    blobs, tmp_path, storage
):
    x, y = blobs
    fits = {}  # trial number -> (History, the callback)

    def objective(trial):
        # Two good trials, then six that barely learn; by number, not enqueue_trial: on SQLite
        # two threads can pop the same enqueued trial (optuna#4002).
        lr = 0.05 if trial.number < 2 else 1e-6
        trial.set_user_attr("lr", lr)
        model = make_model(learning_rate=lr)
        pruning = cb.OptunaPruning(trial, monitor="val_loss")
        try:
            model.fit(x, y, epochs=6, batch_size=60, validation_split=0.25, verbose=0,
                      callbacks=[pruning])  # fmt: skip
        finally:
            fits[trial.number] = (model.history, pruning)
        return model.history.history["val_loss"][-1]

    study = optuna.create_study(
        storage=None if storage == "memory" else f"sqlite:///{tmp_path}/study.db",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
    )
    study.optimize(objective, n_trials=8, n_jobs=2)

    trials = study.get_trials()
    states = {t.number: t.state for t in trials}
    assert len(trials) == 8 and set(states.values()) <= {
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.PRUNED,
    }
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and all(t.user_attrs["lr"] == 1e-6 for t in pruned)
    assert states[0] == states[1] == optuna.trial.TrialState.COMPLETE
    for trial in trials:
        history, pruning = fits[trial.number]
        reported = [trial.intermediate_values[e] for e in sorted(trial.intermediate_values)]
        assert sorted(trial.intermediate_values) == history.epoch
        assert reported == pytest.approx(history.history["val_loss"], rel=TOL)
        if trial.state == optuna.trial.TrialState.PRUNED:
            last = history.epoch[-1]
            assert pruning.pruned_epoch == last and last < 5
            assert history.stop_reason == (
                f"OptunaPruning: trial {trial.number} pruned at epoch {last + 1}, "
                f"val_loss={history.history['val_loss'][-1]:.4g}"
            )
        else:
            assert history.epoch == list(range(6)) and history.stop_reason is None
            assert trial.value == pytest.approx(history.history["val_loss"][-1], rel=TOL)


def test_a_pruned_fit_ends_cleanly_then_raises_trial_pruned(blobs, tmp_path):
    x, y = blobs
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    trial = study.ask()  # any positive loss is above the threshold: pruned at the first epoch
    ended = []
    model = make_model()
    with pytest.raises(optuna.TrialPruned, match=r"OptunaPruning: trial 0 pruned at epoch 1"):
        model.fit(
            x, y, epochs=5, verbose=0,
            callbacks=[cb.OptunaPruning(trial, monitor="loss"),
                       cb.ModelCheckpoint(tmp_path / "last.pt"),
                       cb.LambdaCallback(on_train_end=lambda logs: ended.append(logs))],
        )  # fmt: skip
    assert model.history.epoch == [0] and len(ended) == 1  # later callbacks ended too
    assert (tmp_path / "last.pt").exists()
    assert trial.storage.get_trial(trial._trial_id).intermediate_values == {
        0: pytest.approx(model.history.history["loss"][0], rel=TOL)
    }


def test_a_missing_monitor_warns_naming_the_keys_and_reports_nothing(blobs):
    x, y = blobs
    study = optuna.create_study()
    trial = study.ask()
    missing = r"conditioned on metric `val_loss` which is not available.*validation_split"
    with pytest.warns(UserWarning, match=missing):
        make_model().fit(x, y, epochs=2, verbose=0, callbacks=[cb.OptunaPruning(trial)])
    assert study.trials[0].intermediate_values == {}


def test_a_hand_written_loop_raises_at_train_end(model):
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.5))
    pruning = cb.OptunaPruning(study.ask())
    callbacks = cb.CallbackList([pruning], model=model)
    callbacks.on_train_begin()
    for epoch, value in enumerate([0.4, 0.7]):
        callbacks.on_epoch_begin(epoch)
        callbacks.on_epoch_end(epoch, {"val_loss": value})
    assert model.stop_training and pruning.pruned_epoch == 1
    with pytest.raises(optuna.TrialPruned, match="pruned at epoch 2, val_loss=0.7"):
        callbacks.on_train_end()


@pytest.mark.parametrize(
    ("trial", "monitor", "match"),
    [
        (None, "val_loss", r"`trial` is None; pass the optuna Trial"),
        ("trial", "val_loss", r"`trial` must be an optuna Trial.*got str"),
        (optuna.trial.FixedTrial({}), "", r"`monitor` must be a log key.*got ''"),
    ],
)
def test_argument_errors(trial, monitor, match, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match=match):
        cb.OptunaPruning(trial, monitor=monitor)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_under_torchrun_rank_0_decides_and_both_ranks_stop_at_the_same_epoch(tmp_path):
    pytest.importorskip("wandb")
    from wandb_files import offline_runs

    env = {"WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_X_DISABLE_STATS": "true",
           "WANDB_DISABLE_GIT": "true", "WANDB_CACHE_DIR": str(tmp_path / "wandb-home"),
           "WANDB_DATA_DIR": str(tmp_path / "wandb-home"),
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb-home")}  # fmt: skip
    launch_script(SCRIPT, tmp_path, ranks=2, timeout=180, env=env)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["epoch"] == ranks[1]["epoch"] == [0, 1]  # ThresholdPruner: 2nd epoch
    assert ranks[0]["raised"] and ranks[1]["raised"]  # rank 1's FixedTrial never prunes
    assert ranks[0]["history"] == ranks[1]["history"]
    assert ranks[0]["stop_reason"].startswith("OptunaPruning: trial 0 pruned at epoch 2")

    study = optuna.load_study(study_name="ddp", storage=f"sqlite:///{tmp_path}/study.db")
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    reported = [trial.intermediate_values[e] for e in (0, 1)]  # once each: rank 0 alone
    assert reported == pytest.approx(ranks[0]["history"]["val_loss"], rel=TOL)

    (run,) = offline_runs(tmp_path / "wandb")  # rank 0 alone logged
    rows = [row for row in run.rows if "epoch" in row]
    assert [row["val_loss"] for row in rows] == pytest.approx(
        ranks[0]["history"]["val_loss"], rel=TOL
    )
    assert run.summary["stop_reason"] == ranks[0]["stop_reason"]


def test_the_guides_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(guide_snippet("integrations.md", "Optuna"), "integrations.md", "exec"), namespace)
    study = namespace["study"]
    assert len(study.trials) == 8 and set(study.best_params) == {"width", "lr"}
