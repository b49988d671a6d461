"""A hyper-parameter search with Optuna: the learning rate and the width of an MLP on
scikit-learn's digits, with OptunaPruning stopping the unpromising trials after a few epochs.

    python examples/optuna_search.py [OUT_DIR] [--trials N] [--smoke]

The study is kept in OUT_DIR/study.db (SQLite): run the script again to add trials to it.
"""

from __future__ import annotations

import argparse
import os

import optuna
import torch
from sklearn.datasets import load_digits

import torcheras
from torcheras.callbacks import OptunaPruning

parser = argparse.ArgumentParser()
parser.add_argument("out", nargs="?", default="runs/optuna-digits")
parser.add_argument("--trials", type=int, default=30)
parser.add_argument("--smoke", action="store_true", help="a few short trials (CI)")
args = parser.parse_args()
epochs = 3 if args.smoke else 20
trials = min(args.trials, 5) if args.smoke else args.trials

digits = load_digits()
samples = 600 if args.smoke else len(digits.target)
x = torch.tensor(digits.data[:samples] / 16.0, dtype=torch.float32)
y = torch.tensor(digits.target[:samples])


def objective(trial: optuna.Trial) -> float:
    torch.manual_seed(trial.number)
    width = trial.suggest_int("width", 16, 128, log=True)
    lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, 10)
    )
    model = torcheras.Model(net)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"],
                  learning_rate=lr, device="cpu")  # fmt: skip
    history = model.fit(
        x, y, epochs=epochs, batch_size=64, validation_split=0.2, verbose=0,
        callbacks=[OptunaPruning(trial, monitor="val_loss")],  # raises TrialPruned if pruned
    )  # fmt: skip
    return history.history["val_loss"][-1]


os.makedirs(args.out, exist_ok=True)
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study(
    study_name="digits-mlp",
    storage=f"sqlite:///{os.path.join(args.out, 'study.db')}",
    load_if_exists=True,
    sampler=optuna.samplers.TPESampler(seed=0),
    pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
)
study.optimize(objective, n_trials=trials)

states = [t.state for t in study.trials]
done = states.count(optuna.trial.TrialState.COMPLETE)
pruned = states.count(optuna.trial.TrialState.PRUNED)
print(f"trials: {len(states)} ({done} complete, {pruned} pruned)")
print(f"best val_loss: {study.best_value:.4f} with {study.best_params}")
