"""fit(validation_interval=N) where it meets the other features: backups and CSV logs to URLs
with an interrupted and resumed run, gradient accumulation with ModelCheckpoint's best and
ReduceLROnPlateau, Optuna's pruning (which value is reported) with BackupAndRestore."""

from __future__ import annotations

import csv
import io
import warnings

import numpy as np
import pytest
import torch

import torcheras
from torcheras import callbacks as cb

fsspec = pytest.importorskip("fsspec")

# 5 training batches an epoch (80 samples, batches of 16), 20 validation samples
SAMPLES, BATCH = 100, 16


def noisy_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(SAMPLES, 6)).astype(np.float32)
    y = (x[:, 0] + 0.8 * rng.normal(size=SAMPLES) > 0).astype(np.int64)
    return x, y


def build(lr: float = 0.1, **compile_kwargs) -> torcheras.Model:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 2))
    model = torcheras.Model(net)
    model.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"],
                  learning_rate=lr, device="cpu", **compile_kwargs)  # fmt: skip
    return model


class Interrupt(cb.Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_begin(self, batch, logs=None):
        if self.model.loop.global_step == self.at:
            raise KeyboardInterrupt("interrupted by the test")


def read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


# --- URLs: backup, CSV and its .validation.csv beside it, interrupted and resumed ---------------
def url_run(root: str, interrupt_at: int | None = None):
    x, y = noisy_data()
    model = build(lr=0.8)  # high: val_loss goes up and down, so the plateau callbacks act
    callbacks = [
        cb.BackupAndRestore(f"{root}/backup", save_freq=1),
        cb.CSVLogger(f"{root}/log.csv"),
        cb.EarlyStopping(patience=3),
        cb.ReduceLROnPlateau(factor=0.5, patience=1),
    ]
    if interrupt_at is not None:
        callbacks.append(Interrupt(interrupt_at))
    history = model.fit(x, y, epochs=4, batch_size=BATCH, validation_split=0.2,
                        validation_interval=2, verbose=0, callbacks=callbacks)  # fmt: skip
    return model, history


def test_backup_and_csv_to_urls_resume_every_validation_exactly(tmp_path):
    memory = fsspec.filesystem("memory")
    whole_root, cut_root = f"memory://{tmp_path.name}/whole", f"memory://{tmp_path.name}/cut"
    whole, history = url_run(whole_root)
    steps = history.validation_history["step"]
    assert steps[:4] == [2, 4, 5, 6]  # every 2 steps, and epoch 1's end (step 5)
    rates = history.history["learning_rate"]
    assert min(rates) < rates[0]  # ReduceLROnPlateau acted: what the resume must carry over
    cut_at = 13  # epoch 3, batch 3: after validations of steps 10 and 12, before 14
    assert max(steps) > cut_at  # validations after the cut (EarlyStopping stops at 14)
    with pytest.raises(KeyboardInterrupt):
        url_run(cut_root, interrupt_at=cut_at)
    assert memory.exists(f"/{tmp_path.name}/cut/backup/latest.pt")
    resumed, resumed_history = url_run(cut_root)

    for name, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    assert resumed_history.history == history.history
    assert resumed_history.validation_history == history.validation_history
    assert resumed_history.stop_reason == history.stop_reason
    for name in ("log.csv", "log.validation.csv"):
        expected = memory.cat_file(f"/{tmp_path.name}/whole/{name}")
        assert memory.cat_file(f"/{tmp_path.name}/cut/{name}") == expected, name
    # the .validation.csv beside the log holds every validation, as History does
    rows = read_csv(memory.cat_file(f"/{tmp_path.name}/cut/log.validation.csv").decode())
    assert [int(r["step"]) for r in rows] == steps
    assert [int(r["epoch"]) for r in rows] == history.validation_history["epoch"]
    assert [float(r["val_loss"]) for r in rows] == history.validation_history["val_loss"]
    # backups of a clean end are deleted from the store
    assert not memory.exists(f"/{tmp_path.name}/cut/backup/latest.pt")


# --- accumulation + ModelCheckpoint(save_best_only) + ReduceLROnPlateau -----------------------
def keras_plateau(values: list[float], lr: float, factor: float, patience: int) -> list[float]:
    """Keras's ReduceLROnPlateau (min mode, min_delta 1e-4, cooldown 0), one call per
    validation: the rate in force after each."""
    best, wait, out = None, 0, []
    for value in values:
        if best is None or value < best - 1e-4:
            best, wait = value, 0
        else:
            wait += 1
            if wait >= patience:
                lr, wait = lr * factor, 0
        out.append(lr)
    return out


def test_accumulation_validates_whole_groups_and_the_best_checkpoint_is_the_best_validation(
    tmp_path,
):
    x, y = noisy_data()
    model = build(lr=1.5, gradient_accumulation_steps=2)
    seen = []  # (step, rate after the callbacks, the optimizer's step count)
    recorder = cb.LambdaCallback()
    recorder.on_validation_end = lambda step, logs: seen.append(
        (step, model.learning_rate, model.loop.optimizer_steps, model.loop.accumulating)
    )
    best_path = tmp_path / "best.pt"
    history = model.fit(
        x, y, epochs=4, batch_size=BATCH, validation_split=0.2, validation_interval=2,
        verbose=0, callbacks=[
            cb.ModelCheckpoint(best_path, save_best_only=True),
            cb.ReduceLROnPlateau(factor=0.5, patience=1),
            recorder,
        ],
    )  # fmt: skip
    # 5 batches an epoch in groups of 2, 2 and 1: 3 optimizer steps an epoch; every 2 steps
    # and every epoch's end, each step once
    assert history.validation_history["step"] == [2, 3, 4, 6, 8, 9, 10, 12]
    assert history.validation_history["epoch"] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [s for s, *_ in seen] == [o for _, _, o, _ in seen]  # step = optimizer steps done
    assert not any(acc for *_, acc in seen)  # never inside a group
    values = history.validation_history["val_loss"]
    expected_rates = keras_plateau(values, 1.5, 0.5, 1)
    assert [r for _, r, _, _ in seen] == pytest.approx(expected_rates, rel=1e-7)
    assert expected_rates[-1] < 1.5  # it reduced: the check can fail
    # the best checkpoint holds the weights of the best validation (float32: same data, same
    # order, the loss recomputed by evaluate: equal to 1e-6)
    best = build()
    best.load_weights(best_path)
    val_x, val_y = x[80:], y[80:]
    loss = best.evaluate(val_x, val_y, batch_size=BATCH, verbose=0, return_dict=True)["loss"]
    assert loss == pytest.approx(min(values), abs=1e-6)
    assert sorted(values)[1] - min(values) > 1e-4  # another validation's weights would differ


# --- OptunaPruning + validation_interval + BackupAndRestore ------------------------------------
optuna = pytest.importorskip("optuna")


def optuna_fit(trial, backup, interrupt_at=None):
    x, y = noisy_data()
    model = build(lr=0.3)
    callbacks = [
        cb.BackupAndRestore(backup, save_freq=1),
        cb.OptunaPruning(trial, monitor="val_loss"),
    ]
    if interrupt_at is not None:
        callbacks.append(Interrupt(interrupt_at))
    return model.fit(x, y, epochs=4, batch_size=BATCH, validation_split=0.2,
                     validation_interval=3, verbose=0, callbacks=callbacks)  # fmt: skip


def test_optuna_gets_the_epoch_end_validation_and_a_resumed_trial_reports_the_same_values(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    histories = []
    study.optimize(lambda t: histories.append(optuna_fit(t, tmp_path / "a")) or 0.0, n_trials=1)
    (history,) = histories
    (trial,) = study.trials
    # one report an epoch, at step=epoch: the epoch-end val_loss of History, which is the
    # validation at the epoch's last step (mid-epoch validations are not reported)
    assert trial.intermediate_values == dict(enumerate(history.history["val_loss"]))
    at_epoch_end = {e: v for e, v in zip(history.validation_history["epoch"],
                                          history.validation_history["val_loss"])}  # fmt: skip
    assert trial.intermediate_values == at_epoch_end
    assert len(history.validation_history["step"]) > 4  # mid-epoch ones too

    # interrupted in epoch 3 (batch 12), then the study's next trial resumes the backup: it
    # reports the epochs it ran, with the uninterrupted run's values
    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    with pytest.raises(KeyboardInterrupt):
        study.optimize(lambda t: optuna_fit(t, tmp_path / "b", interrupt_at=12), n_trials=1)
    study.optimize(lambda t: optuna_fit(t, tmp_path / "b") and 0.0, n_trials=1)
    resumed = study.trials[-1]
    assert resumed.state == optuna.trial.TrialState.COMPLETE
    assert resumed.intermediate_values == {2: history.history["val_loss"][2],
                                           3: history.history["val_loss"][3]}  # fmt: skip


def test_a_pruned_trial_deletes_its_backup_and_the_next_trial_starts_afresh(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    backup = tmp_path / "backup"
    prune_all = optuna.pruners.ThresholdPruner(upper=0.0)  # any val_loss > 0: pruned
    study = optuna.create_study(pruner=prune_all)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.optimize(lambda t: optuna_fit(t, backup) and 0.0, n_trials=1)
    assert study.trials[0].state == optuna.trial.TrialState.PRUNED
    assert study.trials[0].intermediate_values.keys() == {0}
    assert not (backup / "latest.pt").exists()  # fit ended cleanly: the backup went
    histories = []
    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    study.optimize(lambda t: histories.append(optuna_fit(t, backup)) or 0.0, n_trials=1)
    assert histories[0].epoch == [0, 1, 2, 3]  # from scratch, not the pruned trial's state
