"""torcheras against a raw PyTorch loop and its peers, each run in a fresh process.

Every framework trains the same network on the same data with Adam (lr 1e-3) and a mean
cross-entropy, batch for batch, in three settings:

- "none": the loss alone, no validation;
- "common": the path most users take, the accuracy (each framework's own: Keras's and
  Poutyne's ``"accuracy"``, torcheras's ``metrics=["accuracy"]``, torchmetrics in Lightning,
  Ignite's ``Accuracy``, skorch's default ``valid_acc`` and a train accuracy) on the training
  batches and a validation pass per epoch in batches of the training batch size;
- "typical": "common" plus the typical callbacks in each framework's own form (early
  stopping, a checkpoint every epoch, reduce-on-plateau, a CSV log, a NaN check).

The raw loop does the same work by hand (see overhead.py), the cheapest correct way: sums on
the device, read once per epoch. Each (framework, workload, setting) runs in its own process:
one warm-up epoch, then a timed ``fit`` of several epochs. A round runs raw, peer, raw, peer,
..., raw, and each peer is rated against the raw runs just before and after it (the order of
the peers alternates between rounds); the ratio reported is the median over rounds, in CPU
time (the process's, all threads) and in wall time. Peers not installed are skipped
(``pip install -e '.[bench]'`` installs them). Results go to ``benchmarks/results.md``.

    python benchmarks/peers.py                 # everything (over an hour on 2 cores)
    python benchmarks/peers.py --quick         # one round, fewer frameworks' epochs
    python benchmarks/peers.py --only raw,torcheras --workloads tiny --settings common
    python benchmarks/peers.py --in-process 10 --workloads cnn   # one process, alternating
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
THREADS = 1

WORKLOADS: dict[str, dict[str, Any]] = {
    "tiny": {"label": "tiny MLP 32-64-10, batch 64", "samples": 50_000, "batch": 64, "epochs": 2},
    "wide": {
        "label": "wide MLP 256-1024-1024-10, batch 256",
        "samples": 12_800,
        "batch": 256,
        "epochs": 2,
    },
    "cnn": {"label": "small CNN 3x32x32, batch 256", "samples": 5_000, "batch": 256, "epochs": 2},
}
FRAMEWORKS = ["raw", "torcheras", "lightning", "keras", "poutyne", "ignite", "skorch"]
MODULES = {
    "lightning": "lightning",
    "keras": "keras",
    "poutyne": "poutyne",
    "ignite": "ignite",
    "skorch": "skorch",
}
SETTINGS = ("none", "common", "typical")
SETTING_LABELS = {
    "none": "loss only",
    "common": "accuracy + validation",
    "typical": "accuracy + validation + typical callbacks",
}


# ---- the shared problem ------------------------------------------------------------------------


def make_net(workload: str) -> Any:
    from torch import nn

    if workload == "tiny":
        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    if workload == "wide":
        return nn.Sequential(
            nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
        )
    return nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 6 * 6, 10),
    )  # fmt: skip


def make_data(workload: str) -> tuple[Any, Any, Any, Any]:
    """Train and validation arrays (numpy float32 / int64): the last tenth validates."""
    import numpy as np

    w = WORKLOADS[workload]
    rng = np.random.default_rng(0)
    shape = {"tiny": (32,), "wide": (256,), "cnn": (3, 32, 32)}[workload]
    x = rng.normal(size=(w["samples"], *shape)).astype("float32")
    y = rng.integers(0, 10, size=w["samples"]).astype("int64")
    n_val = w["samples"] // 10
    return x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:]


# ---- one framework, one process ------------------------------------------------------------------


def _tensors(workload: str, opts: dict[str, Any]) -> tuple[Any, ...]:
    """The data as tensors: on the training device with ``on_device``, else on the host."""
    import torch

    where = opts["device"] if opts["on_device"] else "cpu"
    return tuple(torch.from_numpy(a).to(where) for a in make_data(workload))


def run_raw(workload: str, setting: str, folder: str, opts: dict[str, Any]) -> Any:
    import torch

    sys.path.insert(0, HERE)
    from overhead import RawLoop

    x, y, xv, yv = _tensors(workload, opts)
    net = make_net(workload).to(opts["device"])
    loop = RawLoop(
        net,
        torch.optim.Adam(net.parameters(), lr=1e-3),
        folder,
        device=torch.device(opts["device"]),
        precision=opts["precision"],
    )
    batch = WORKLOADS[workload]["batch"]
    common = setting != "none"

    def fit(epochs: int) -> None:
        for _ in range(epochs):
            loop.epoch_(
                x,
                y,
                batch,
                (xv, yv) if common else None,
                accuracy=common,
                callbacks=setting == "typical",
            )

    return fit


def run_torcheras(workload: str, setting: str, folder: str, opts: dict[str, Any]) -> Any:
    import torch

    sys.path.insert(0, os.path.join(HERE, "..", "src"))
    import torcheras
    from torcheras import callbacks as cb

    x, y, xv, yv = _tensors(workload, opts) if opts["on_device"] else make_data(workload)
    verbose = opts.get("verbose", 0)
    model = torcheras.Model(make_net(workload))
    model.compile(
        torch.optim.Adam(model.parameters(), lr=1e-3),
        "cross_entropy",
        metrics=["accuracy"] if setting != "none" else None,
        device=opts["device"],
        precision=opts["precision"],
        jit_compile=opts["jit"],
    )
    callbacks = (
        [
            cb.EarlyStopping(patience=10_000),
            cb.ModelCheckpoint(os.path.join(folder, "last.pt")),
            cb.ReduceLROnPlateau(patience=10_000),
            cb.CSVLogger(os.path.join(folder, "log.csv"), append=True),
            cb.TerminateOnNaN(),
        ]
        if setting == "typical"
        else []
    )
    batch = WORKLOADS[workload]["batch"]

    def fit(epochs: int) -> None:
        model.fit(
            x,
            y,
            batch_size=batch,
            epochs=epochs,
            verbose=verbose,
            callbacks=callbacks,
            validation_data=(xv, yv) if setting != "none" else None,
        )

    return fit


def run_lightning(workload: str, setting: str, folder: str, opts: dict[str, Any]) -> Any:
    import lightning as L
    import torch
    import torch.nn.functional as F
    from lightning.pytorch import callbacks as lcb
    from lightning.pytorch.loggers import CSVLogger
    from torchmetrics.classification import MulticlassAccuracy

    x, y, xv, yv = _tensors(workload, opts)
    batch = WORKLOADS[workload]["batch"]
    common, typical = setting != "none", setting == "typical"

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_net(workload)
            self.train_acc = MulticlassAccuracy(10, average="micro")
            self.val_acc = MulticlassAccuracy(10, average="micro")

        def training_step(self, b: Any, i: int) -> Any:
            out = self.net(b[0])
            loss = F.cross_entropy(out, b[1])
            if common:  # Lightning's documented form: a torchmetrics metric logged per epoch
                self.train_acc(out, b[1])
                self.log("loss", loss, on_step=False, on_epoch=True)
                self.log("accuracy", self.train_acc, on_step=False, on_epoch=True)
            return loss

        def validation_step(self, b: Any, i: int) -> None:
            out = self.net(b[0])
            self.val_acc(out, b[1])
            self.log("val_loss", F.cross_entropy(out, b[1]))
            self.log("val_accuracy", self.val_acc)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.Adam(self.parameters(), lr=1e-3)
            if not typical:
                return opt
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=10_000)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "monitor": "val_loss"}}

    module = Module()
    train = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=True
    )
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xv, yv), batch_size=batch)

    def fit(epochs: int) -> None:
        callbacks = (
            [
                lcb.EarlyStopping("val_loss", patience=10_000, check_finite=True),
                lcb.ModelCheckpoint(dirpath=folder, filename="last", enable_version_counter=False),
            ]
            if typical
            else []
        )
        trainer = L.Trainer(
            max_epochs=epochs,
            accelerator="gpu" if opts["device"] == "cuda" else "cpu",
            devices=1,
            precision={"32": "32-true"}.get(opts["precision"], opts["precision"]),
            logger=CSVLogger(folder) if typical else False,
            callbacks=callbacks,
            enable_checkpointing=typical,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(module, train, val if common else None)

    return fit


def run_keras(workload: str, setting: str, folder: str, opts: dict[str, Any]) -> Any:
    os.environ["KERAS_BACKEND"] = "torch"
    import keras

    x, y, xv, yv = make_data(workload)
    if workload == "cnn":  # Keras's layers are channels-last
        x, xv = x.transpose(0, 2, 3, 1), xv.transpose(0, 2, 3, 1)
        model = keras.Sequential([
            keras.Input((32, 32, 3)), keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(), keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(), keras.layers.Flatten(), keras.layers.Dense(10),
        ])  # fmt: skip
    else:
        sizes = {"tiny": [32, 64, 10], "wide": [256, 1024, 1024, 10]}[workload]
        layers = [keras.Input((sizes[0],))]
        layers += [keras.layers.Dense(n, activation="relu") for n in sizes[1:-1]]
        model = keras.Sequential([*layers, keras.layers.Dense(sizes[-1])])
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"] if setting != "none" else None,
    )
    callbacks = (
        [
            keras.callbacks.EarlyStopping(patience=10_000),
            keras.callbacks.ModelCheckpoint(os.path.join(folder, "last.keras")),
            keras.callbacks.ReduceLROnPlateau(patience=10_000),
            keras.callbacks.CSVLogger(os.path.join(folder, "log.csv"), append=True),
            keras.callbacks.TerminateOnNaN(),
        ]
        if setting == "typical"
        else []
    )
    batch = WORKLOADS[workload]["batch"]

    def fit(epochs: int) -> None:
        model.fit(
            x,
            y,
            batch_size=batch,
            epochs=epochs,
            verbose=0,
            callbacks=callbacks,
            validation_data=(xv, yv) if setting != "none" else None,
        )

    return fit


def run_poutyne(workload: str, setting: str, folder: str, opts: dict[str, Any]) -> Any:
    import poutyne
    import torch

    x, y, xv, yv = make_data(workload)
    net = make_net(workload)
    model = poutyne.Model(
        net,
        torch.optim.Adam(net.parameters(), lr=1e-3),
        "cross_entropy",
        batch_metrics=["accuracy"] if setting != "none" else None,
    )
    callbacks = (
        [
            poutyne.EarlyStopping(patience=10_000),
            poutyne.ModelCheckpoint(os.path.join(folder, "last.ckpt")),
            poutyne.ReduceLROnPlateau(patience=10_000),
            poutyne.CSVLogger(os.path.join(folder, "log.csv"), append=True),
            poutyne.TerminateOnNaN(),
        ]
        if setting == "typical"
        else []
    )
    batch = WORKLOADS[workload]["batch"]

    def fit(epochs: int) -> None:
        model.fit(
            x,
            y,
            validation_data=(xv, yv) if setting != "none" else None,
            epochs=epochs,
            batch_size=batch,
            verbose=False,
            callbacks=callbacks,
        )

    return fit


def run_ignite(workload: str, setting: str, folder: str, opts: dict[str, Any]) -> Any:
    import csv

    import torch
    import torch.nn.functional as F
    from ignite import handlers
    from ignite.engine import Events, create_supervised_evaluator, create_supervised_trainer
    from ignite.metrics import Accuracy, Loss, RunningAverage

    x, y, xv, yv = (torch.from_numpy(a) for a in make_data(workload))
    net = make_net(workload)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    common = setting != "none"
    if common:  # the outputs too, for the accuracy (the loss read per batch: Ignite's default)
        trainer = create_supervised_trainer(
            net, opt, F.cross_entropy, output_transform=lambda x, y, o, loss: (o, y, loss.item())
        )
    else:
        trainer = create_supervised_trainer(net, opt, F.cross_entropy)
    batch = WORKLOADS[workload]["batch"]
    train = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=True
    )
    if common:
        val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xv, yv), batch_size=batch)
        evaluator = create_supervised_evaluator(
            net, metrics={"loss": Loss(F.cross_entropy), "accuracy": Accuracy()}
        )
        RunningAverage(output_transform=lambda out: out[2]).attach(trainer, "loss")
        Accuracy(output_transform=lambda out: out[:2]).attach(trainer, "accuracy")
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run(val))
    if setting == "typical":
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED, handlers.TerminateOnNan(lambda out: out[2])
        )
        score = lambda e: -e.state.metrics["loss"]  # noqa: E731
        evaluator.add_event_handler(
            Events.COMPLETED, handlers.EarlyStopping(10_000, score, trainer)
        )
        evaluator.add_event_handler(
            Events.COMPLETED,
            handlers.ModelCheckpoint(folder, "last", n_saved=1, require_empty=False),
            {"net": net, "opt": opt},
        )
        evaluator.add_event_handler(
            Events.COMPLETED,
            handlers.ReduceLROnPlateauScheduler(opt, "loss", mode="min", patience=10_000),
        )

        def csv_row(engine: Any) -> None:
            with open(os.path.join(folder, "log.csv"), "a", newline="") as f:
                row = [trainer.state.epoch, *engine.state.metrics.values()]
                csv.writer(f).writerow([*row, *evaluator.state.metrics.values()])

        trainer.add_event_handler(Events.EPOCH_COMPLETED, csv_row)

    def fit(epochs: int) -> None:
        trainer.run(train, max_epochs=(trainer.state.epoch or 0) + epochs)

    return fit


def run_skorch(workload: str, setting: str, folder: str, opts: dict[str, Any]) -> Any:
    import csv
    import math

    import torch
    from skorch import NeuralNetClassifier
    from skorch import callbacks as scb
    from skorch.dataset import Dataset
    from skorch.helper import predefined_split

    x, y, xv, yv = make_data(workload)
    common, typical = setting != "none", setting == "typical"

    class CSVRowAndNaNCheck(scb.Callback):  # skorch has neither built in
        def on_epoch_end(self, net: Any, **kwargs: Any) -> None:
            row = net.history[-1]
            if not math.isfinite(row["train_loss"]):
                raise FloatingPointError("loss is not finite")
            with open(os.path.join(folder, "log.csv"), "a", newline="") as f:
                keys = ("epoch", "train_loss", "train_acc", "valid_loss", "valid_acc")
                csv.writer(f).writerow([row[k] for k in keys])

    callbacks: list[Any] = []
    if common:  # valid_acc is skorch's default; the train accuracy from the cached outputs
        callbacks.append(scb.EpochScoring("accuracy", on_train=True, name="train_acc"))
    if typical:
        callbacks += [
            scb.EarlyStopping(patience=10_000),
            scb.Checkpoint(dirname=folder, monitor=None),  # every epoch
            scb.LRScheduler(
                torch.optim.lr_scheduler.ReduceLROnPlateau, monitor="valid_loss", patience=10_000
            ),
            CSVRowAndNaNCheck(),
        ]
    net = NeuralNetClassifier(
        make_net(workload),
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam,
        lr=1e-3,
        batch_size=WORKLOADS[workload]["batch"],
        iterator_train__shuffle=True,
        train_split=predefined_split(Dataset(xv, yv)) if common else None,
        callbacks=callbacks,
        warm_start=True,  # each fit call continues training
        verbose=0,
    )

    def fit(epochs: int) -> None:
        net.fit(x, y, epochs=epochs)

    return fit


RUNNERS = {
    "raw": run_raw,
    "torcheras": run_torcheras,
    "lightning": run_lightning,
    "keras": run_keras,
    "poutyne": run_poutyne,
    "ignite": run_ignite,
    "skorch": run_skorch,
}


def worker(framework: str, workload: str, setting: str, epochs: int, opts: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    folder = tempfile.mkdtemp()
    fit = RUNNERS[framework](workload, setting, folder, opts)
    fit(1)  # warm-up: allocator, caches, first-call paths, compilation
    cuda = opts["device"] == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    fit(epochs)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / epochs
    cpu_seconds = (time.process_time() - cpu_start) / epochs
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall": seconds, "cpu": cpu_seconds, "peak_rss_mib": rss_mib}))


DEFAULT_OPTS = {"device": "cpu", "on_device": False, "precision": "32", "jit": False}


# ---- the driver ----------------------------------------------------------------------------------


def spawn(args: list[str], opts: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    command = [sys.executable, __file__, "--worker", *args, "--opts", json.dumps(opts)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{args} {opts}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def import_seconds(modules: tuple[str, ...], repeats: int) -> dict[str, float]:
    """Median wall time of a fresh ``python -c 'import module'``, the modules alternating."""
    env = {**os.environ, "PYTHONPATH": os.path.join(HERE, "..", "src")}
    times: dict[str, list[float]] = {m: [] for m in modules}
    for i in range(repeats):
        for module in modules if i % 2 == 0 else modules[::-1]:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", f"import {module}"], check=True, env=env)
            times[module].append(time.perf_counter() - start)
    return {m: statistics.median(t) for m, t in times.items()}


CLOCKS = ("cpu", "wall")


def round_robin(
    frameworks: list[str], run: Any, rounds: int
) -> tuple[dict[str, list[float]], dict[str, dict[str, list[float]]], dict[str, float]]:
    """Each round runs raw, peer, raw, peer, ..., raw (the peers' order alternating between
    rounds) and rates each peer against the mean of the raw runs just before and after it: this
    machine's speed drifts over seconds, and the two neighbours cancel a steady drift. Returns
    the wall seconds per epoch, the ratios to raw by clock ("cpu", "wall") and the peak RSS of
    each framework."""
    peers = [f for f in frameworks if f != "raw"]
    times: dict[str, list[float]] = {f: [] for f in frameworks}
    ratios: dict[str, dict[str, list[float]]] = {c: {f: [] for f in peers} for c in CLOCKS}
    rss: dict[str, float] = {}

    def one(fw: str) -> dict[str, float]:
        out = run(fw)
        times[fw].append(out["wall"])
        rss[fw] = max(rss.get(fw, 0.0), out["peak_rss_mib"])
        return out

    for r in range(rounds):
        before = one("raw")
        for fw in peers if r % 2 == 0 else peers[::-1]:
            seconds = one(fw)
            after = one("raw")
            for clock in CLOCKS:
                ratios[clock][fw].append(seconds[clock] / ((before[clock] + after[clock]) / 2))
            before = after
    return times, ratios, rss


def available() -> list[str]:
    return [f for f in FRAMEWORKS if f not in MODULES or importlib.util.find_spec(MODULES[f])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=4, metavar=("FW", "WORKLOAD", "SETTING", "EPOCHS"))
    parser.add_argument("--opts", default="{}", help="worker options (JSON)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (implies --variants)")
    parser.add_argument(
        "--variants", action="store_true", help="the precision / placement / jit table"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one round")
    parser.add_argument("--only", default=None, help="comma-separated frameworks")
    parser.add_argument("--workloads", default="tiny,wide,cnn")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="none,common,typical")
    parser.add_argument("--output", default=os.path.join(HERE, "results.md"))
    parser.add_argument(
        "--in-process",
        type=int,
        metavar="RUNS",
        help="instead: every framework in this one process, RUNS epochs each, alternating with "
        "the raw loop's (printed, not written)",
    )
    args = parser.parse_args()
    if args.worker:
        fw, workload, setting, epochs = args.worker
        worker(fw, workload, setting, int(epochs), {**DEFAULT_OPTS, **json.loads(args.opts)})
        return
    if args.in_process:
        in_process_table(args)
        return
    if args.device == "cuda" or args.variants:
        variants_table(args)
        return
    rounds = 1 if args.quick else args.rounds
    frameworks = [f for f in available() if args.only is None or f in args.only.split(",")]
    rows = []
    for workload in args.workloads.split(","):
        for setting in args.settings.split(","):
            args_ = [workload, setting, str(WORKLOADS[workload]["epochs"])]
            times, ratio_lists, rss = round_robin(
                frameworks, lambda fw, a=args_: spawn([fw, *a], DEFAULT_OPTS), rounds
            )
            ratios = {
                c: {fw: statistics.median(r) for fw, r in by_fw.items()}
                for c, by_fw in ratio_lists.items()
            }
            label = f"{WORKLOADS[workload]['label']}, {SETTING_LABELS[setting]}"
            medians = {fw: statistics.median(times[fw]) for fw in frameworks}
            rows.append((label, medians, ratios, rss))
            print(label, {fw: round(v, 3) for fw, v in ratios["cpu"].items()}, flush=True)
    imports = import_seconds(("torch", "torcheras"), 10)
    write_results(args.output, frameworks, rows, imports, rounds)


def in_process_table(args: Any) -> None:
    """Each framework against the raw loop in this one process, one epoch at a time in the
    order raw, fw, raw, ..., raw (``overhead.interleave``): no process start-up or page-cache
    state in the ratio, which on the compute-bound rows swings by more than the frameworks
    differ when every run is a fresh process."""
    import torch

    sys.path.insert(0, HERE)
    from overhead import interleave

    torch.set_num_threads(THREADS)
    frameworks = [f for f in available() if f != "raw"]
    frameworks = [f for f in frameworks if args.only is None or f in args.only.split(",")]
    print(f"| workload, callbacks | {' | '.join(frameworks)} |")
    print(f"|---|{'---|' * len(frameworks)}")
    for workload in args.workloads.split(","):
        for setting in args.settings.split(","):
            raw = run_raw(workload, setting, tempfile.mkdtemp(), DEFAULT_OPTS)
            raw(1)
            cells = []
            for fw in frameworks:
                torch.manual_seed(0)
                fit = RUNNERS[fw](workload, setting, tempfile.mkdtemp(), DEFAULT_OPTS)
                fit(1)  # warm-up
                r = interleave(lambda r=raw: r(1), lambda f=fit: f(1), args.in_process)
                cells.append(f"{r.ratio:.3f} [{r.q1:.2f}, {r.q3:.2f}]")
            label = f"{WORKLOADS[workload]['label']}, {SETTING_LABELS[setting]}"
            print(f"| {label} | {' | '.join(cells)} |", flush=True)


CUDA_VARIANTS = [
    ("data on CPU", {}),
    ("data on the GPU", {"on_device": True}),
    ("data on the GPU, bf16-mixed", {"on_device": True, "precision": "bf16-mixed"}),
    ("data on the GPU, 16-mixed", {"on_device": True, "precision": "16-mixed"}),
    ("data on the GPU, jit_compile (raw: eager)", {"on_device": True, "jit": True}),
]


def variants_table(args: Any) -> None:
    """raw / torcheras / Lightning on ``--device`` (the CUDA table), each variant with no
    callbacks and with the typical set; appended to ``--output``."""
    frameworks = [f for f in ("raw", "torcheras", "lightning") if f in available()]
    rows = []
    for workload in args.workloads.split(","):
        for name, variant in CUDA_VARIANTS:
            for setting in ("none", "typical"):
                opts = {**DEFAULT_OPTS, "device": args.device, **variant}
                args_ = [workload, setting, str(WORKLOADS[workload]["epochs"])]
                runners = [f for f in frameworks if not (f == "lightning" and variant.get("jit"))]
                times, ratio_lists, _ = round_robin(
                    runners,
                    lambda fw, a=args_, o=opts: spawn([fw, *a], o),
                    1 if args.quick else args.rounds,
                )
                by_fw = ratio_lists["wall"]  # a GPU's time is not this process's CPU time
                cells = [
                    f"{statistics.median(by_fw[f]):.2f}" if f in by_fw else "-"
                    for f in frameworks[1:]
                ]
                label = f"{WORKLOADS[workload]['label']}, {name}, {SETTING_LABELS[setting]}"
                rows.append(
                    f"| {label} | {statistics.median(times['raw']):.4f} | "
                    + " | ".join(cells)
                    + " |"
                )
                print(rows[-1], flush=True)
    import torch

    header = [
        "",
        f"## {torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'} "
        f"(torch {torch.__version__}, {1 if args.quick else args.rounds} rounds)",
        "",
        "| workload, variant, callbacks | raw s/epoch | "
        + " | ".join(f"{f} / raw" for f in frameworks[1:])
        + " |",
        "|---|---|" + "---|" * (len(frameworks) - 1),
    ]
    with open(args.output, "a") as f:
        f.write("\n".join(header + rows) + "\n")


def write_results(
    path: str, frameworks: list[str], rows: list[Any], imports: dict[str, float], rounds: int
) -> None:
    import torch

    lines = [
        "# Benchmarks: torcheras against a raw loop and its peers",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{THREADS} torch threads, CPU only; Python {platform.python_version()}, "
        f"torch {torch.__version__}. Command: `python benchmarks/peers.py` "
        f"({rounds} rounds, fresh process per run, each rated against the raw runs before and "
        "after it, median over rounds). Each cell: the ratio of CPU time (the process's, all "
        "its threads), then of wall time in brackets.",
        "",
        "| workload, setting | raw s/epoch | "
        + " | ".join(f"{f} / raw" for f in frameworks[1:])
        + " |",
        "|---|---|" + "---|" * (len(frameworks) - 1),
    ]
    for label, seconds, ratios, _ in rows:
        cells = " | ".join(
            f"{ratios['cpu'][f]:.2f} [{ratios['wall'][f]:.2f}]" for f in frameworks[1:]
        )
        lines.append(f"| {label} | {seconds['raw']:.3f} | {cells} |")
    lines += ["", "Peak RSS (MiB, largest over rounds):", ""]
    lines.append("| workload, setting | " + " | ".join(frameworks) + " |")
    lines.append("|---|" + "---|" * len(frameworks))
    for label, _, _, rss in rows:
        lines.append(f"| {label} | " + " | ".join(f"{rss[f]:.0f}" for f in frameworks) + " |")
    ratio = imports["torcheras"] / imports["torch"]
    lines += [
        "",
        "Import time (fresh process, 10 alternating, medians): "
        f"`import torch` {imports['torch']:.2f} s, "
        f"`import torcheras` {imports['torcheras']:.2f} s ({ratio:.2f}x).",
        "",
    ]
    rest = ""  # the sections after this one (other benchmarks' tables) are kept
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        rest = old[old.index("\n## ") :] if "\n## " in old else ""
    with open(path, "w") as f:
        f.write("\n".join(lines) + rest)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
