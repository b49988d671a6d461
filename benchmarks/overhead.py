"""Overhead of ``Model.fit`` over a raw PyTorch loop, side by side in one process.

Each setting trains the same model on the same data with the same optimizer, once with a
hand-written loop and once with ``fit(verbose=0)``, alternating for several repeats, and
reports the median seconds per epoch of each and the ratio fit/raw.

    python benchmarks/overhead.py            # all settings
    python benchmarks/overhead.py --quick    # fewer repeats
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import torcheras  # noqa: E402
from torcheras import callbacks as cb  # noqa: E402


@dataclass
class Workload:
    name: str
    sizes: tuple[int, ...]
    batch_size: int
    samples: int
    target: float


WORKLOADS = [
    Workload("tiny MLP 32-64-10, batch 64", (32, 64, 10), 64, 50_000, 1.10),
    Workload("wide MLP 256-1024-1024-10, batch 256", (256, 1024, 1024, 10), 256, 50_000, 1.03),
]


def make_net(sizes: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_data(w: Workload) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(w.samples, w.sizes[0], generator=g)
    y = torch.randint(0, w.sizes[-1], (w.samples,), generator=g)
    return x, y


def raw_epoch(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    best: list[float] | None = None,
    path: str | None = None,
) -> None:
    """The loop a careful PyTorch user writes: shuffled index batches, no per-batch sync."""
    net.train()
    perm = torch.randperm(x.shape[0])
    for i in range(0, x.shape[0], batch_size):
        idx = perm[i : i + batch_size]
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if val is not None and best is not None and path is not None:
        net.eval()
        with torch.no_grad():
            val_loss = float(F.cross_entropy(net(val[0]), val[1]))
        if val_loss < best[0]:
            best[0] = val_loss
            torch.save(net.state_dict(), path)


def time_it(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(w: Workload, repeats: int, epochs: int, with_callbacks: bool) -> tuple[float, float]:
    x, y = make_data(w)
    val = None
    if with_callbacks:
        val = (x[-w.samples // 10 :], y[-w.samples // 10 :])
        x, y = x[: -w.samples // 10], y[: -w.samples // 10]
    torch.manual_seed(0)
    raw_net = make_net(w.sizes)
    raw_opt = torch.optim.Adam(raw_net.parameters(), lr=1e-3)
    torch.manual_seed(0)
    model = torcheras.Model(make_net(w.sizes))
    model.compile(
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        loss="sparse_categorical_crossentropy",
        device="cpu",
    )
    tmp = tempfile.mkdtemp()
    best = [float("inf")]

    def raw() -> None:
        for _ in range(epochs):
            raw_epoch(raw_net, raw_opt, x, y, w.batch_size, val, best, os.path.join(tmp, "raw.pt"))

    def fit() -> None:
        callbacks = []
        if with_callbacks:
            callbacks = typical_callbacks(tmp)
        model.fit(
            x,
            y,
            batch_size=w.batch_size,
            epochs=epochs,
            verbose=0,
            callbacks=callbacks,
            validation_data=val,
            validation_batch_size=val[0].shape[0] if val else None,
        )

    raw()  # warm-up
    fit()
    raw_times, fit_times = [], []
    for i in range(repeats):  # ABBA order, so neither side always runs first
        if i % 2 == 0:
            raw_times.append(time_it(raw) / epochs)
            fit_times.append(time_it(fit) / epochs)
        else:
            fit_times.append(time_it(fit) / epochs)
            raw_times.append(time_it(raw) / epochs)
    return statistics.median(raw_times), statistics.median(fit_times)


def typical_callbacks(folder: str) -> list[cb.Callback]:
    """The seed's typical set (filled in as the built-ins land)."""
    found = []
    for name, kwargs in [
        ("EarlyStopping", {"patience": 100}),
        ("ModelCheckpoint", {"filepath": os.path.join(folder, "best.pt"), "save_best_only": True}),
        ("ReduceLROnPlateau", {"patience": 100}),
        ("CSVLogger", {"filename": os.path.join(folder, "log.csv")}),
        ("TerminateOnNaN", {}),
    ]:
        if hasattr(cb, name):
            found.append(getattr(cb, name)(**kwargs))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    repeats, epochs = (3, 1) if args.quick else (8, 2)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{repeats} alternating repeats x {epochs} epochs, median seconds per epoch"
    )
    print(f"{'setting':<58} {'raw s/ep':>9} {'fit s/ep':>9} {'ratio':>7} {'target':>7}")
    rows = [(w, False) for w in WORKLOADS] + [(WORKLOADS[0], True)]
    for w, with_cb in rows:
        raw_s, fit_s = run(w, repeats, epochs, with_cb)
        label = w.name + (" + typical callbacks" if with_cb else "")
        target = "" if with_cb else f"<={w.target:.2f}"
        print(
            f"{label:<58} {raw_s:>9.3f} {fit_s:>9.3f} {fit_s / raw_s:>7.3f} {target:>7}", flush=True
        )


if __name__ == "__main__":
    main()
