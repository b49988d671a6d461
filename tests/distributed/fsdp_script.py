"""Many small fits under torchrun (2 or 4 processes, gloo) and alone, by test_fsdp.py.

    python fsdp_script.py OUT [--cases a,b,...]
    torchrun --standalone --nproc_per_node=2 fsdp_script.py OUT [--cases a,b,...]

One launch runs every case one after the other (each launch costs seconds of start-up). A case
is a network, a strategy and compile settings; under torchrun each case runs with
``strategy="fsdp"`` (and the cases of ``WITH_DDP`` with ``"ddp"`` too), alone with ``"auto"``
(one process, the reference). Each
rank saves, per case and strategy, what a user would look at: the final weights (gathered
whole), History, evaluate, predict, the summary's text, and the bytes of parameters,
gradients and optimizer state this rank holds, to OUT/result<rank>.pt.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
import torcheras  # noqa: E402
from torcheras import callbacks as cb  # noqa: E402
from torcheras.distributed import FSDP  # noqa: E402

CASES = {
    # name: (network, compile settings, fit settings)
    "mlp": ("mlp", {}, {}),
    "transformer": ("transformer", {}, {}),
    # the blocks named by a policy, kept gathered between forward and backward
    "policy": (
        "transformer",
        {
            "fsdp": FSDP(
                blocks=lambda m: isinstance(m, torch.nn.Linear), reshard_after_forward=False
            )
        },
        {},
    ),
    # a torcheras.Model subclass with its own forward: the model itself is the root
    "subclass": ("subclass", {}, {}),
    # 7 batches in groups of 3: 3, 3, and 1 closing at the epoch's known end
    "accumulation": ("mlp", {"gradient_accumulation_steps": 3}, {}),
    # batches of unknown number in groups of 3: the last group is cut short by the epoch's end
    "accumulation-iterable": ("mlp", {"gradient_accumulation_steps": 3}, {"iterable": True}),
    "clipping": ("mlp", {"global_clipnorm": 0.05}, {}),
    "clipnorm": ("mlp", {"clipnorm": 0.05}, {}),
    "ema": ("mlp", {"ema_momentum": 0.9}, {}),
    "monitor": ("mlp", {}, {"monitor": True}),
    "jit": ("mlp", {"jit_compile": True}, {}),
    "bf16": ("mlp", {"precision": "bf16-mixed"}, {}),
    "memory": ("wide", {}, {"epochs": 1}),
}

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--cases", default=",".join(CASES))
args = parser.parse_args()
rank = int(os.environ.get("RANK", "0"))
ranks = int(os.environ.get("WORLD_SIZE", "1"))
torch.set_num_threads(1)

rng = np.random.default_rng(0)
x = rng.normal(size=(200, 8)).astype("float32")
y = ((x[:, 0] + x[:, 1] > 0).astype("int64") + (x[:, 2] > 1).astype("int64")).astype("int64")


class TinyTransformer(torch.nn.Module):
    """A sequence of 4 tokens of 8 features: a projection, a transformer block, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(2, 16)
        self.block = torch.nn.TransformerEncoderLayer(
            16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True
        )
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.reshape(x.shape[0], 4, 2))
        return self.head(self.block(tokens).mean(dim=1))


def network(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank and in every run
    if kind == "mlp":
        return torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
            torch.nn.Linear(16, 3),
        )  # fmt: skip
    if kind == "wide":  # 4 blocks of 64 x 64: shards of whole rows for 2 and 4 ranks
        layers: list[torch.nn.Module] = [torch.nn.Linear(8, 64)]
        for _ in range(3):
            layers += [torch.nn.ReLU(), torch.nn.Linear(64, 64)]
        return torch.nn.Sequential(*layers, torch.nn.ReLU(), torch.nn.Linear(64, 4))
    if kind == "subclass":
        return Classifier()
    return TinyTransformer()


class Classifier(torcheras.Model):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(8, 16)
        self.out = torch.nn.Linear(16, 3)
        self.scale = torch.nn.Parameter(torch.ones(3))  # the root's own parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x))) * self.scale


def local_bytes(model: torcheras.Model) -> dict[str, int]:
    """What this process holds: the bytes of the storages behind its parameters, gradients
    and optimizer state (a DTensor's local shard; a storage several tensors view, as FSDP's
    gradients view one reduce-scatter output, counted once)."""

    def total(tensors: list[torch.Tensor]) -> int:
        storages = {}
        for t in tensors:
            storage = (t.to_local() if hasattr(t, "to_local") else t).untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    params = list(model.parameters())
    state = model.optimizer.state  # type: ignore[union-attr]
    return {
        "parameters": total(params),
        "gradients": total([p.grad for p in params if p.grad is not None]),
        "optimizer": total([
            v for p in params for v in state[p].values()
            if isinstance(v, torch.Tensor) and v.dim() > 0  # not Adam's step counters
        ]),
    }  # fmt: skip


def count_reduce_scatters(model: torcheras.Model) -> list[int]:
    """FSDP's reduce-scatters of gradients, one per block and backward that synchronises,
    counted through FSDP's own hook for a custom collective (the real one still runs)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

    calls: list[int] = []

    class Counted(DefaultReduceScatter):
        def __call__(self, *args, **kwargs):
            calls.append(model.loop.global_step)
            return super().__call__(*args, **kwargs)

    for module in model.modules():
        if isinstance(module, FSDPModule) and any(True for _ in module.parameters(recurse=False)):
            module.set_custom_reduce_scatter(Counted())
    return calls


def whole(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def run(name: str, strategy: str) -> dict:
    kind, settings, fit = CASES[name]
    settings = dict(settings)
    fsdp = settings.pop("fsdp", None)
    if strategy == "fsdp" and fsdp is not None:
        strategy = fsdp
    net = network(kind)
    model = net if isinstance(net, torcheras.Model) else torcheras.Model(net)
    forward_dtypes: list[torch.dtype] = []
    if settings.get("precision"):  # the dtype the first layer computes in
        net[0].register_forward_pre_hook(lambda m, a: forward_dtypes.append(m.weight.dtype))
    model.compile(
        "adam", "sparse_categorical_crossentropy", metrics=["accuracy"], device="cpu",
        learning_rate=0.01, strategy=strategy, **settings,
    )  # fmt: skip
    reduce_scatters = count_reduce_scatters(model) if model._fsdp is not None else []
    callbacks: list[cb.Callback] = [cb.EarlyStopping(monitor="val_loss", patience=10)]
    if fit.get("monitor"):
        callbacks.append(cb.GradientMonitor(per_layer=True, weights=True))
    train, validation = (x[:160], y[:160]), (x[160:], y[160:])
    if fit.get("iterable"):

        class Batches:  # no len(): the loop learns where the epoch ends when it ends
            def __iter__(self):
                for i in range(0, 160, 24):
                    yield torch.as_tensor(x[i : i + 24]), torch.as_tensor(y[i : i + 24])

        data = {"x": Batches()}
    else:
        data = {"x": train[0], "y": train[1], "batch_size": 24, "shuffle": True}
    torch.manual_seed(1)  # the same shuffles everywhere
    history = model.fit(
        **data, epochs=fit.get("epochs", 2), verbose=0, validation_data=validation,
        callbacks=callbacks,
    )  # fmt: skip
    memory = local_bytes(model)  # the gradients of the last step are still there
    lines: list[str] = []
    model.summary(print_fn=lines.append)
    result = {
        "weights": {k: whole(v) for k, v in model.state_dict().items()},
        "get_weights": model.get_weights(),
        "history": history.history,
        "evaluate": model.evaluate(*validation, batch_size=15, verbose=0, return_dict=True),
        "predict": torch.as_tensor(model.predict(x[:50], batch_size=16, verbose=0)),
        "summary": lines,
        "memory": memory,
        "forward_dtypes": sorted({str(d) for d in forward_dtypes}),
        "sharded": model._fsdp is not None,
        "reduce_scatters": len(reduce_scatters),
        "fsdp_modules": sorted(
            name for name, m in model.named_modules() if type(m).__name__.startswith("FSDP")
        ),
    }
    # whole tensors back into the (sharded) model, as Keras's set_weights takes arrays
    model.set_weights({k: v + 1 for k, v in result["get_weights"].items()})
    result["after_set_weights"] = model.get_weights()
    return result


# under torchrun, the cases DDP runs too (the others: FSDP alone, against one process)
WITH_DDP = ("mlp", "transformer", "bf16", "memory")
results = {
    (name, strategy): run(name, strategy)
    for name in args.cases.split(",")
    for strategy in (["auto"] if ranks == 1 else ["ddp", "fsdp"] if name in WITH_DDP else ["fsdp"])
}
os.makedirs(args.out, exist_ok=True)
torch.save(results, os.path.join(args.out, f"result{rank}.pt"))
