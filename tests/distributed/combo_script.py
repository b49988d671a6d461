"""Issue 23's pieces together, for tests/combinations/test_fsdp_combinations.py.

    torchrun --standalone --nproc_per_node=2 combo_script.py OUT   # phase 1: 2 processes
    python combo_script.py OUT                                      # phase 2: alone

Each case trains the same small MLP (no dropout: a backup reshards exactly). Under torchrun
each case runs unbroken, and again cut by an exception at step 7 (a crash after the backup
at step 6, mid-epoch), leaving its backup in OUT/<case>/backup. Alone, each case runs unbroken (the
reference) and then resumes the 2-process backup. Each run's full weights, History,
validation history and files are saved to OUT/<case>/<run><rank>.pt.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
import torcheras  # noqa: E402
from torcheras import callbacks as cb  # noqa: E402
from torcheras import checkpoint, state  # noqa: E402

out = sys.argv[1]
rank = int(os.environ.get("RANK", "0"))
ranks = int(os.environ.get("WORLD_SIZE", "1"))
torch.set_num_threads(1)
rng = np.random.default_rng(0)
x = rng.normal(size=(96, 6)).astype("float32")
y = ((x[:, 0] + x[:, 1] > 0).astype("int64") + (x[:, 2] > 1).astype("int64")).astype("int64")
train, val = (x[:64], y[:64]), (x[64:], y[64:])  # 4 steps an epoch of 16, 3 epochs

CASES = {  # name: (strategy under torchrun, compile settings, fit settings)
    # the weight average is sharded as the weights are: backups and model.save gather it
    "ema": ("fsdp", {"ema_momentum": 0.9}, {}),
    # the best epoch (val_loss at its highest: epoch 1) kept by both callbacks
    "best": ("fsdp", {}, {"best": True}),
    # mid-epoch validations with a one-file (DDP) backup resumed alone
    "interval": ("ddp", {}, {"validation_interval": 3}),
}


class Crash(Exception):
    pass


def run(name: str, run_name: str, crash: bool) -> None:
    strategy, settings, fit = CASES[name]
    folder = os.path.join(out, name)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    model = torcheras.Model(net)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"],
                  device="cpu", learning_rate=0.02, strategy=strategy, **settings)  # fmt: skip
    backup = os.path.join(folder, "backup" if run_name != "unbroken" else f"unbroken{ranks}")
    callbacks: list[cb.Callback] = [cb.BackupAndRestore(backup, save_freq=2)]
    if fit.get("best"):  # the cut run and its resumption: the same file, as a rerun has
        best_file = os.path.join(
            folder, f"best-unbroken{ranks}.pt" if run_name == "unbroken" else "best-job.pt"
        )
        callbacks += [
            cb.EarlyStopping(monitor="val_loss", mode="max", patience=5, restore_best_weights=True),
            cb.ModelCheckpoint(best_file,
                               monitor="val_loss", mode="max", save_best_only=True,
                               save_weights_only=True),
        ]  # fmt: skip

    def crash_at_7(batch, logs):
        if crash and model.loop.global_step == 7:
            checkpoint.wait_for_writes()
            raise Crash

    callbacks.append(cb.LambdaCallback(on_train_batch_end=crash_at_7))
    torch.manual_seed(1)
    try:
        history = model.fit(*train, batch_size=16, epochs=3, shuffle=True, verbose=0,
                            validation_data=val, callbacks=callbacks,
                            validation_interval=fit.get("validation_interval"))  # fmt: skip
    except Crash:
        return
    result = {
        "weights": state.own_weights(model),
        "history": history.history,
        "validation_history": getattr(model, "validation_history", None),
        "predict": torch.as_tensor(model.predict(val[0], verbose=0)),
    }
    if model.ema is not None:
        result["ema"] = model.ema.state_dict()["average"]
        model.save(os.path.join(folder, f"saved-{run_name}{ranks}.pt"))  # every rank calls it
    if strategy == "fsdp" and ranks > 1:
        try:
            model.export(os.path.join(folder, "model.pt2"), input_example=val[0][:2])
        except ValueError as exc:
            result["export_error"] = str(exc)
    torch.save(result, os.path.join(folder, f"{run_name}{ranks}-{rank}.pt"))


for case in CASES:
    os.makedirs(os.path.join(out, case), exist_ok=True)
    run(case, "unbroken", crash=False)
    if ranks > 1:
        run(case, "cut", crash=True)
    else:
        run(case, "resumed", crash=False)
