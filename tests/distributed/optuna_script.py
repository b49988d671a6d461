"""One Optuna trial trained by 2 ranks under torchrun, run by test_optuna_pruning.py.

    torchrun --standalone --nproc_per_node=2 optuna_script.py OUT

Rank 0 runs the study (SQLite in OUT) and shares the trial's learning rate; rank 1 trains with
an ``optuna.trial.FixedTrial`` that would never prune, so it stops only if rank 0's decision
reaches it. A ``ThresholdPruner(upper=0)`` prunes at the second epoch. Both ranks log to W&B
offline (rank 0 alone writes a run). Each rank writes OUT/rank<r>.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import optuna
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
import torcheras  # noqa: E402
from torcheras import callbacks as cb  # noqa: E402

out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
torch.manual_seed(0)
torch.set_num_threads(1)
optuna.logging.set_verbosity(optuna.logging.WARNING)
dist.init_process_group("gloo")  # before fit: the trial's settings are shared first

rng = np.random.default_rng(0)
x = rng.normal(size=(256, 6)).astype("float32")
y = (x[:, 0] + x[:, 1] > 0).astype("int64")


def train(trial: object, lr: float) -> dict:
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    model = torcheras.Model(net)
    model.compile("adam", "sparse_categorical_crossentropy", learning_rate=lr, device="cpu")
    pruning = cb.OptunaPruning(trial, monitor="val_loss")
    logger = cb.WandbLogger("ddp", dir=out / "wandb", mode="offline")
    record = {"rank": rank, "raised": False}
    try:
        model.fit(x, y, epochs=6, batch_size=32, validation_split=0.25, verbose=0,
                  callbacks=[pruning, logger])  # fmt: skip
    except optuna.TrialPruned as pruned:
        record.update(raised=True, message=str(pruned))
    history = model.history
    record.update(epoch=history.epoch, history=history.history, stop_reason=history.stop_reason)
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    if record["raised"]:
        raise optuna.TrialPruned(record["message"])
    return record


if rank == 0:

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 0.001, 0.01, log=True)
        dist.broadcast_object_list([lr], src=0)
        return train(trial, lr)["history"]["val_loss"][-1]

    study = optuna.create_study(
        study_name="ddp", storage=f"sqlite:///{out}/study.db",
        pruner=optuna.pruners.ThresholdPruner(upper=0.0, n_warmup_steps=1),
    )  # fmt: skip
    study.optimize(objective, n_trials=1)
else:
    shared: list = [None]
    dist.broadcast_object_list(shared, src=0)
    with contextlib.suppress(optuna.TrialPruned):  # rank 0 reports the pruning
        train(optuna.trial.FixedTrial({"lr": shared[0]}), shared[0])

dist.barrier()  # the group is the script's: it ends it, once every rank is done
dist.destroy_process_group()
