"""Training runs for test_combinations.py: one process, or each rank under torchrun.

    python combo_script.py OUT CONFIGS [--kill-at N]
    python -m torch.distributed.run --standalone --nproc_per_node=2 combo_script.py OUT CONFIGS

CONFIGS is a JSON list of configurations (or ``@file`` holding one), run one after another in
this process; each names its settings (see ``FACTORS``) and a ``name``. Every run trains a tiny
network on the same 40 samples in global batches of 8 (5 batches an epoch, 2 epochs, in order)
and writes, per rank, ``OUT/<name>/rank<r>/weights.pt`` (the initial and final weights) and
``result.json`` (History, the optimizer_step calls, the optimizer updates, the batches run).

With ``backup`` in a configuration the run has ``BackupAndRestore(OUT/<name>/backup,
save_freq=1)``; ``--kill-at N`` SIGKILLs the process when batch N (0-based, over the epochs) is
about to start, once the backups written so far have landed, after writing the counts of what
it did to ``OUT/<name>/killed.json``. Running the same command without ``--kill-at`` resumes.

The test module imports the data, the plain network and the hyperparameters from here, so its
hand-written reference starts from the same weights and sees the same batches.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
import torcheras  # noqa: E402
from torcheras import callbacks as cb  # noqa: E402
from torcheras import checkpoint  # noqa: E402

# The binary factors, each level 0 / 1, in the order of the covering array's columns.
FACTORS = ("jit", "ranks2", "accum3", "bf16", "two_outputs", "ema", "clip", "subclass")

SAMPLES, BATCH, EPOCHS = 40, 8, 2  # 5 batches an epoch: with accumulation 3, groups of 3 and 2
LEARNING_RATE, MOMENTUM = 0.1, 0.9  # high: a missing average or an extra step shows plainly
LOSS_WEIGHTS = (1.0, 0.5)  # the two outputs' weights in the summed loss
EMA_MOMENTUM = 0.8
CLIPNORM = 2.0  # the gradients' global norm is 1-4.5: some steps are clipped, not all
PENALTY = 0.3  # the subclass's compute_loss adds PENALTY * (body.weight ** 2).sum()
SEED = 0


def make_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` (40, 4); the first output's targets (40, 1), the second's (40, 2)."""
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(SAMPLES, 4, generator=gen)
    y1 = x[:, :1] * 1.5 - x[:, 1:2] + 0.3 * torch.randn(SAMPLES, 1, generator=gen)
    y2 = torch.stack([x[:, 2] * x[:, 3], torch.sin(2 * x[:, 0])], dim=1)
    return x, y1, y2


def add_layers(module: nn.Module, two_outputs: bool) -> None:
    """The layers, created in this order (the same initial weights after ``manual_seed``)."""
    module.body = nn.Linear(4, 16)
    module.head = nn.Linear(16, 1)
    module.extra = nn.Linear(16, 2) if two_outputs else None


def run_layers(module: nn.Module, x: torch.Tensor) -> Any:
    h = torch.tanh(module.body(x))
    out = module.head(h)
    return out if module.extra is None else (out, module.extra(h))


class Net(nn.Module):
    """The plain network: wrapped in ``torcheras.Model(net)``, and the reference's."""

    def __init__(self, two_outputs: bool) -> None:
        super().__init__()
        add_layers(self, two_outputs)

    def forward(self, x: torch.Tensor) -> Any:
        return run_layers(self, x)


class Subclassed(torcheras.Model):
    """The subclassing API: its own layers and forward, a penalty added in ``compute_loss``,
    and a count of ``optimizer_step`` calls (one per real optimizer step is the contract)."""

    def __init__(self, two_outputs: bool) -> None:
        super().__init__()
        add_layers(self, two_outputs)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> Any:
        return run_layers(self, x)

    def compute_loss(self, x, y, y_pred, sample_weight=None):
        loss = super().compute_loss(x, y, y_pred, sample_weight)
        return loss + PENALTY * (self.body.weight**2).sum()

    def optimizer_step(self) -> None:
        self.calls += 1
        super().optimizer_step()


def build(config: dict[str, Any]) -> torcheras.Model:
    """The model of a configuration, compiled.

    The non-subclass level is ``torcheras.Model(net)`` as users write it, overriding nothing:
    a subclass overriding ``optimizer_step`` alone would be a subclass again, and would miss
    any path torcheras keeps for models that do not override it. So both levels count the
    real updates with an optimizer step hook, and the subclass its ``optimizer_step`` calls.
    """
    two = bool(config["two_outputs"])
    torch.manual_seed(SEED)
    model = Subclassed(two) if config["subclass"] else torcheras.Model(Net(two))
    # The subclass level trains with Keras's SGD (``"sgd"``'s class): at a constant rate its
    # momentum is torch's, so the same reference holds, and every other factor meets it.
    sgd = torcheras.optimizers.KerasSGD if config["subclass"] else torch.optim.SGD
    model.compile(
        lambda params: sgd(params, lr=LEARNING_RATE, momentum=MOMENTUM),
        ["mse", "mse"] if two else "mse",
        loss_weights=list(LOSS_WEIGHTS) if two else None,
        device="cpu",
        precision="bf16-mixed" if config["bf16"] else "32",
        jit_compile=bool(config["jit"]),
        gradient_accumulation_steps=3 if config["accum3"] else 1,
        global_clipnorm=CLIPNORM if config["clip"] else None,
        ema_momentum=EMA_MOMENTUM if config["ema"] else None,
    )
    return model


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights by the plain network's names (``module.body.weight`` -> ``body.weight``)."""
    return {k.removeprefix("module."): v.detach().clone() for k, v in model.state_dict().items()}


class Counter(cb.Callback):
    """Counts the batches this process trained; ``kill_at``: the kill of ``--kill-at``."""

    def __init__(self, counts: dict[str, Any], kill_at: int | None, killed_file: Path) -> None:
        super().__init__()
        self.counts, self.kill_at, self.killed_file = counts, kill_at, killed_file

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if self.kill_at is not None and self.model.loop.global_step == self.kill_at:
            checkpoint.wait_for_writes()  # the backups written so far have landed
            self.counts["calls"] = getattr(self.model, "calls", None)
            self.killed_file.write_text(json.dumps(self.counts))
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.counts["batches"] += 1


def run(config: dict[str, Any], out: Path, rank: int, kill_at: int | None) -> None:
    torch._dynamo.reset()  # every configuration compiles its own graphs, as a fresh process
    model = build(config)
    initial = plain_state(model)
    counts: dict[str, Any] = {"updates": 0, "batches": 0}

    def count_update(optimizer: Any, args: Any, kwargs: Any) -> None:
        counts["updates"] += 1

    model.optimizer.register_step_post_hook(count_update)
    folder = out / config["name"]
    folder.mkdir(parents=True, exist_ok=True)
    callbacks: list[cb.Callback] = []
    if config.get("backup"):
        callbacks.append(cb.BackupAndRestore(folder / "backup", save_freq=1))
    callbacks.append(Counter(counts, kill_at, folder / "killed.json"))
    x, y1, y2 = make_data()
    history = model.fit(
        x,
        (y1, y2) if config["two_outputs"] else y1,
        batch_size=BATCH,
        epochs=EPOCHS,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    mine = folder / f"rank{rank}"
    mine.mkdir(exist_ok=True)
    torch.save({"initial": initial, "final": plain_state(model)}, mine / "weights.pt")
    result = {
        "history": history.history,
        "calls": getattr(model, "calls", None),
        "updates": counts["updates"],
        "batches": counts["batches"],
    }
    (mine / "result.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("configs", help="a JSON list of configurations, or @file")
    parser.add_argument("--kill-at", type=int, default=None)
    args = parser.parse_args()
    text = args.configs
    configs = json.loads(Path(text[1:]).read_text() if text.startswith("@") else text)
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    for config in configs:
        run(config, Path(args.out), rank, args.kill_at)


if __name__ == "__main__":
    main()
