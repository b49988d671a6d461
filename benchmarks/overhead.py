"""Overhead of ``Model.fit`` over a raw PyTorch loop, side by side in one process.

Each setting trains the same model on the same data with the same optimizer, once with a
hand-written loop and once with ``fit(verbose=0)``, one epoch per run, in the order raw, fit,
raw, fit, ..., raw. Each fit run is rated against the mean of the raw runs just before and
after it (which cancels this machine's slow drift in speed); the ratio reported is the median
of those ratios, with its interquartile range. A control row rates the raw loop against
itself the same way: how finely this machine can tell two equal loops apart.

The two sides do equal work. Both gather a shuffled batch's rows with ``index_select`` (as
``fit`` does for arrays since December 2026; ``x[idx]``, which both used before, costs about
twice the CPU on a small batch). Without callbacks, the raw loop sums the epoch's loss on the
device and reads it once, as ``fit`` logs it (the cheapest correct way: one in-place add per batch;
before December 2026 the loss-only raw loop computed no loss, which made the ratio about 0.04
higher on the tiny MLP). With the typical callbacks, the raw loop does by hand what they do: a
running mean of the training loss, a finiteness check (TerminateOnNaN: of each batch's loss in
the loss-only rows; of the epoch's sums, read once, in the common path's, where torcheras reads
one value every 32 batches), a validation pass, plateau and early-stopping bookkeeping, a CSV
row per epoch, and an atomic save (temp file, fsync, rename) of the same content (weights,
optimizer state, epoch, logs) every epoch. (Saving only improvements would make the two sides
save a different number of times: their shuffles differ, so their validation losses do.) The
number of saves is counted on both sides and must agree; a callback missing from torcheras fails
the benchmark.

    python benchmarks/overhead.py              # all settings
    python benchmarks/overhead.py --quick      # fewer repeats
    python benchmarks/overhead.py --markdown   # also print the README's table
    python benchmarks/overhead.py --jit        # the tiny MLP, eager and jit_compile rows only
    python benchmarks/overhead.py --common     # the common path: loss only, accuracy (mae)
                                               # + validation, + typical callbacks, predict
    python benchmarks/overhead.py --common --only tiny --runs 100  # one workload, more runs
    python benchmarks/overhead.py --verbose    # the verbose=1 / verbose=0 row only
    python benchmarks/overhead.py --throughput # ThroughputMonitor / no callback

``--jit`` rates ``fit(jit_compile=True)`` against a raw loop compiled the same way (the
forward pass and the loss through ``torch.compile``, and the optimizer step with its learning
rate as a tensor), beside the eager pair, without callbacks.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import torcheras  # noqa: E402
from torcheras import callbacks as cb  # noqa: E402
from torcheras import state  # noqa: E402


@dataclass
class Workload:
    name: str
    sizes: tuple[int, ...]
    batch_size: int
    samples: int
    target: float
    runs: int  # fit runs in a full measurement: many for the noisy, fast tiny MLP


WORKLOADS = [
    Workload("tiny MLP 32-64-10, batch 64", (32, 64, 10), 64, 50_000, 1.03, 30),
    Workload("wide MLP 256-1024-1024-10, batch 256", (256, 1024, 1024, 10), 256, 12_800, 1.01, 12),
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


class RawLoop:
    """The loop a careful PyTorch user writes: shuffled index batches, the epoch's mean loss
    summed on the device and read once (what ``fit`` logs), no per-batch sync (unless
    checking the loss, as TerminateOnNaN does), and, with ``val``, the typical callbacks'
    work written out by hand.

    ``accuracy``: the common path instead, with or without the callbacks' work
    (``callbacks``): the training loss and the hits summed on the device (the accuracy as
    ``(out.argmax(1) == y).sum()``; the labels hold no -100, so the count needs no mask),
    validation in batches of ``batch_size`` (Keras's default) summing the same two, each sum
    read once at the epoch's end."""

    def __init__(
        self,
        net: nn.Module,
        opt: torch.optim.Optimizer,
        folder: str,
        device: torch.device | None = None,
        precision: str = "32",
    ) -> None:
        self.net, self.opt, self.folder = net, opt, folder
        self.device = device or torch.device("cpu")
        self.dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "16-mixed" else None
        self.best = math.inf
        self.saves = 0
        self.epoch = 0
        self.wait = 0

    def epoch_(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        val: Any,
        accuracy: bool = False,
        callbacks: bool = True,
    ) -> None:
        if accuracy:
            self._common_epoch(x, y, batch_size, val, callbacks)
            return
        net, opt, device, scaler = self.net, self.opt, self.device, self.scaler
        net.train()
        perm = torch.randperm(x.shape[0], device=x.device)
        total = torch.zeros((), device=device)
        cuda = device.type == "cuda"
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i : i + batch_size]
            xb, yb = x.index_select(0, idx), y.index_select(0, idx)
            if cuda and xb.device.type == "cpu":
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            if self.dtype is None:
                loss = F.cross_entropy(net(xb), yb)
            else:
                with torch.autocast(device.type, dtype=self.dtype):
                    loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            total.add_(loss.detach(), alpha=idx.shape[0])  # the epoch's loss, as fit logs it
            if val is None:
                continue
            if not cuda and not math.isfinite(float(loss.detach())):  # TerminateOnNaN's check
                raise FloatingPointError("loss is not finite")
        if val is None:
            self.last_loss = float(total) / x.shape[0]  # read once, as fit reads its logs
        else:
            if not math.isfinite(float(total)):  # on CUDA, checked once (no sync per batch)
                raise FloatingPointError("loss is not finite")
            self._end_of_epoch(float(total) / x.shape[0], val)
        self.epoch += 1

    def _common_epoch(
        self, x: torch.Tensor, y: torch.Tensor, batch_size: int, val: Any, callbacks: bool
    ) -> None:
        net, opt, device, scaler = self.net, self.opt, self.device, self.scaler
        net.train()
        perm = torch.randperm(x.shape[0], device=x.device)
        loss_sum = torch.zeros((), device=device)
        hits = torch.zeros((), dtype=torch.int64, device=device)
        cuda = device.type == "cuda"
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i : i + batch_size]
            xb, yb = x.index_select(0, idx), y.index_select(0, idx)
            if cuda and xb.device.type == "cpu":
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            if self.dtype is None:
                out = net(xb)
                loss = F.cross_entropy(out, yb)
            else:
                with torch.autocast(device.type, dtype=self.dtype):
                    out = net(xb)
                    loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            loss_sum.add_(loss.detach(), alpha=idx.shape[0])
            hits += (out.detach().argmax(1) == yb).sum()
        net.eval()
        xv, yv = val
        val_sum = torch.zeros((), device=device)
        val_hits = torch.zeros((), dtype=torch.int64, device=device)
        with torch.no_grad():
            for i in range(0, xv.shape[0], batch_size):
                xb, yb = xv[i : i + batch_size].to(device), yv[i : i + batch_size].to(device)
                if self.dtype is None:
                    out = net(xb)
                else:
                    with torch.autocast(device.type, dtype=self.dtype):
                        out = net(xb)
                val_sum += F.cross_entropy(out.float(), yb, reduction="sum")
                val_hits += (out.argmax(1) == yb).sum()
        n, n_val = x.shape[0], xv.shape[0]
        sums = torch.stack([loss_sum, hits.double(), val_sum, val_hits.double()]).tolist()
        logs = {"loss": sums[0] / n, "accuracy": sums[1] / n}
        logs.update(val_loss=sums[2] / n_val, val_accuracy=sums[3] / n_val)
        if not all(math.isfinite(v) for v in logs.values()):  # TerminateOnNaN's check
            raise FloatingPointError("loss is not finite")
        if callbacks:
            self._bookkeeping(logs)
        self.epoch += 1

    def _end_of_epoch(self, train_loss: float, val: Any) -> None:
        self.net.eval()
        with torch.no_grad():
            xv, yv = val[0].to(self.device), val[1].to(self.device)
            val_loss = float(F.cross_entropy(self.net(xv), yv))
        self._bookkeeping({"loss": train_loss, "val_loss": val_loss})

    def _bookkeeping(self, logs: dict[str, float]) -> None:
        """The typical callbacks' work at an epoch's end: plateau and early-stopping counters,
        a CSV row, an atomic save of weights, optimizer and logs."""
        val_loss = logs["val_loss"]
        logs = {"learning_rate": self.opt.param_groups[0]["lr"], **logs}
        improved = val_loss < self.best
        self.wait = 0 if improved else self.wait + 1  # EarlyStopping / ReduceLROnPlateau
        self.best = min(self.best, val_loss)
        with open(os.path.join(self.folder, "raw.csv"), "a", newline="") as f:
            csv.writer(f).writerow([self.epoch, *logs.values()])
        state = {"model": self.net.state_dict(), "optimizer": self.opt.state_dict()}
        self._save({**state, "epoch": self.epoch, "logs": logs})

    def _save(self, state: dict[str, Any]) -> None:
        path = os.path.join(self.folder, "raw.pt")
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.saves += 1


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
CLOCK = "cpu"  # --clock: CPU time of this process (all its threads), or the wall clock


def time_it(fn: Callable[[], None]) -> float:
    clock = CLOCKS[CLOCK]
    start = clock()
    fn()
    return clock() - start


@dataclass
class Result:
    raw: float  # median seconds per epoch
    fit: float
    ratio: float  # median of the per-run ratios
    q1: float
    q3: float


def interleave(base: Callable[[], None], other: Callable[[], None], runs: int) -> Result:
    """Time ``base, other, base, other, ..., base`` and rate each ``other`` run against the
    mean of the two ``base`` runs around it.

    This machine's speed drifts over seconds (the same epoch takes 0.07 or 0.13 s for a few
    seconds at a time, a neighbour's load); a ratio to the neighbours on both sides cancels a
    drift that is linear over the three runs, where a ratio within an ABBA pair does not."""
    base_times = [time_it(base)]
    times = []
    for _ in range(runs):
        times.append(time_it(other))
        base_times.append(time_it(base))
    ratios = sorted(t / ((a + b) / 2) for t, a, b in zip(times, base_times, base_times[1:]))
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return Result(
        statistics.median(base_times), statistics.median(times), statistics.median(ratios), q1, q3
    )


@contextlib.contextmanager
def side_by_side(
    w: Workload, with_callbacks: bool
) -> Iterator[tuple[Callable[[], None], Callable[[], None]]]:
    """The raw loop's epoch and fit's epoch on the same model, data and optimizer, with (or
    without) the typical callbacks; on exit, checks that both sides saved every epoch."""
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
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3), loss="cross_entropy", device="cpu"
    )
    tmp = tempfile.mkdtemp()
    raw_loop = RawLoop(raw_net, raw_opt, tmp)
    fit_saves = fit_runs = 0
    real_save_model = state.save_model

    def counted_save_model(*args: Any, **kwargs: Any) -> Any:
        nonlocal fit_saves
        fit_saves += 1
        return real_save_model(*args, **kwargs)

    callbacks = typical_callbacks(tmp) if with_callbacks else []

    def raw() -> None:
        raw_loop.epoch_(x, y, w.batch_size, val)

    def fit() -> None:
        nonlocal fit_runs
        fit_runs += 1
        model.fit(
            x,
            y,
            batch_size=w.batch_size,
            epochs=1,
            verbose=0,
            callbacks=callbacks,
            validation_data=val,
            validation_batch_size=val[0].shape[0] if val else None,
        )

    state.save_model = counted_save_model  # type: ignore[assignment]
    try:
        yield raw, fit
    finally:
        state.save_model = real_save_model  # type: ignore[assignment]
    if with_callbacks and (raw_loop.saves, fit_saves) != (raw_loop.epoch, fit_runs):
        raise SystemExit(
            f"unequal work: the raw loop saved {raw_loop.saves} checkpoints in "
            f"{raw_loop.epoch} epochs, fit {fit_saves} in {fit_runs}; the comparison "
            "would not be fair"
        )


def run(w: Workload, repeats: int, with_callbacks: bool, control: bool = False) -> Result:
    """fit against raw (``control``: raw against itself), after one warm-up epoch of each."""
    with side_by_side(w, with_callbacks) as (raw, fit):
        raw()
        fit()
        return interleave(raw, raw if control else fit, repeats)


def _pair(
    w: Workload, x: torch.Tensor, y: torch.Tensor, jit: bool
) -> tuple[Callable[[], None], Callable[[], None]]:
    """A raw epoch and a fit epoch, both eager or both compiled (no callbacks)."""
    torch.manual_seed(0)
    net = make_net(w.sizes)
    opt = torch.optim.Adam(net.parameters(), lr=torch.tensor(1e-3) if jit else 1e-3)

    def loss_of(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(net(xb), yb)

    loss_fn = torch.compile(loss_of) if jit else loss_of
    step = torch.compile(opt.step) if jit else opt.step

    def raw() -> None:
        perm = torch.randperm(x.shape[0])
        total = torch.zeros(())
        for i in range(0, x.shape[0], w.batch_size):
            idx = perm[i : i + w.batch_size]
            loss = loss_fn(x.index_select(0, idx), y.index_select(0, idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            step()
            total.add_(loss.detach(), alpha=idx.shape[0])  # the epoch's loss, as fit logs it
        assert math.isfinite(float(total))

    torch.manual_seed(0)
    model = torcheras.Model(make_net(w.sizes))
    # torch's Adam on both sides ("adam" by name is Keras's formula, KerasAdam)
    model.compile(torch.optim.Adam(model.parameters(), lr=1e-3), "cross_entropy",
                  jit_compile=jit, device="cpu")  # fmt: skip

    def fit() -> None:
        model.fit(x, y, batch_size=w.batch_size, epochs=1, verbose=0)

    return raw, fit


def common_path(
    w: Workload, task: str = "classification"
) -> tuple[Callable[[], None], Callable[[], None]]:
    """The path almost every user takes: a metric (``"accuracy"``; ``"mae"`` for the
    regression task) and a validation pass every epoch (in batches of the training batch
    size, Keras's default), against a raw loop that computes the same numbers the cheapest
    correct way: sums on the device (the accuracy as ``(out.argmax(1) == y).sum()``; the
    labels hold no -100, so the count needs no mask), one read of each at the epoch's end."""
    x, y = make_data(w)
    regression = task == "regression"
    if regression:  # targets: one value per output unit
        y = torch.randn(x.shape[0], w.sizes[-1], generator=torch.Generator().manual_seed(1))
    n_val = w.samples // 10
    xv, yv, x, y = x[-n_val:], y[-n_val:], x[:-n_val], y[:-n_val]
    loss_fn = F.mse_loss if regression else F.cross_entropy
    torch.manual_seed(0)
    net = make_net(w.sizes)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    b = w.batch_size

    metric_dtype = torch.float32 if regression else torch.int64

    def metric_sum(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if regression:
            return (out - target).abs().sum()
        return (out.argmax(1) == target).sum()

    def raw() -> None:
        net.train()
        perm = torch.randperm(x.shape[0])
        # hits counted as integers (no cast per batch); the regression's error summed as floats
        loss_sum, metric = torch.zeros(()), torch.zeros((), dtype=metric_dtype)
        for i in range(0, x.shape[0], b):
            idx = perm[i : i + b]
            xb, yb = x.index_select(0, idx), y.index_select(0, idx)
            out = net(xb)
            loss = loss_fn(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum.add_(loss.detach(), alpha=idx.shape[0])
            metric += metric_sum(out.detach(), yb)
        net.eval()
        val_sum, val_metric = torch.zeros(()), torch.zeros((), dtype=metric_dtype)
        with torch.no_grad():
            for i in range(0, n_val, b):
                out = net(xv[i : i + b])
                val_sum += loss_fn(out, yv[i : i + b], reduction="sum")
                val_metric += metric_sum(out, yv[i : i + b])
        logs = [float(loss_sum), float(metric), float(val_sum), float(val_metric)]
        assert all(math.isfinite(v) for v in logs)

    torch.manual_seed(0)
    model = torcheras.Model(make_net(w.sizes))
    model.compile(torch.optim.Adam(model.parameters(), lr=1e-3),
                  "mse" if regression else "cross_entropy",
                  metrics=["mae" if regression else "accuracy"], device="cpu")  # fmt: skip

    def fit() -> None:
        model.fit(x, y, batch_size=b, epochs=1, verbose=0, validation_data=(xv, yv))

    return raw, fit


def predict_pair(w: Workload) -> tuple[Callable[[], None], Callable[[], None]]:
    """``predict`` over the training inputs against the raw loop's ``no_grad`` pass: the
    outputs of each batch concatenated into one tensor (what ``predict`` returns for a
    tensor input)."""
    x, _ = make_data(w)
    torch.manual_seed(0)
    net = make_net(w.sizes).eval()
    b = w.batch_size

    def raw() -> None:
        with torch.no_grad():
            out = torch.cat([net(x[i : i + b]) for i in range(0, x.shape[0], b)])
        assert out.shape[0] == x.shape[0]

    torch.manual_seed(0)
    model = torcheras.Model(make_net(w.sizes))
    model.compile(torch.optim.Adam(model.parameters(), lr=1e-3), "cross_entropy", device="cpu")

    def fit() -> None:
        out = model.predict(x, batch_size=b, verbose=0)
        assert out.shape[0] == x.shape[0]

    return raw, fit


@contextlib.contextmanager
def common_with_callbacks(w: Workload) -> Iterator[tuple[Callable[[], None], Callable[[], None]]]:
    """The common path (accuracy + validation every epoch) with the typical callbacks: the
    raw loop does their work by hand (``RawLoop(accuracy=True)``); on exit, checks that both
    sides saved every epoch."""
    x, y = make_data(w)
    n_val = w.samples // 10
    xv, yv, x, y = x[-n_val:], y[-n_val:], x[:-n_val], y[:-n_val]
    tmp = tempfile.mkdtemp()
    torch.manual_seed(0)
    net = make_net(w.sizes)
    raw_loop = RawLoop(net, torch.optim.Adam(net.parameters(), lr=1e-3), tmp)
    torch.manual_seed(0)
    model = torcheras.Model(make_net(w.sizes))
    model.compile(torch.optim.Adam(model.parameters(), lr=1e-3), "cross_entropy",
                  metrics=["accuracy"], device="cpu")  # fmt: skip
    callbacks = typical_callbacks(tmp)
    fit_runs = 0

    def raw() -> None:
        raw_loop.epoch_(x, y, w.batch_size, (xv, yv), accuracy=True, callbacks=True)

    def fit() -> None:
        nonlocal fit_runs
        fit_runs += 1
        model.fit(x, y, batch_size=w.batch_size, epochs=1, verbose=0, callbacks=callbacks,
                  validation_data=(xv, yv))  # fmt: skip

    yield raw, fit
    saved = os.path.join(tmp, "last.pt")
    if raw_loop.saves != raw_loop.epoch or not os.path.exists(saved) or fit_runs == 0:
        raise SystemExit("unequal work: both sides must save every epoch")


def eager_and_jit(w: Workload, repeats: int) -> list[tuple[str, Result]]:
    """fit against the raw loop, eager and both compiled (no callbacks)."""
    x, y = make_data(w)
    rows = []
    for jit in (False, True):
        raw, fit = _pair(w, x, y, jit)
        raw()
        fit()  # warm-up: the compiled graphs are built here
        label = f"{w.name}, {'jit_compile=True (raw compiled too)' if jit else 'eager'}"
        rows.append((label, interleave(raw, fit, repeats)))
    return rows


def typical_callbacks(folder: str) -> list[cb.Callback]:
    """The typical set; every one must exist (a missing callback fails the benchmark).

    EarlyStopping's and ReduceLROnPlateau's patience is large so that training runs its
    epochs, as the raw loop's bookkeeping does; ModelCheckpoint saves every epoch."""
    return [
        cb.EarlyStopping(patience=10_000),
        cb.ModelCheckpoint(os.path.join(folder, "last.pt")),  # every epoch, as the raw loop
        cb.ReduceLROnPlateau(patience=10_000),
        cb.CSVLogger(os.path.join(folder, "log.csv"), append=True),
        cb.TerminateOnNaN(),
    ]


def quiet_and_bar(
    w: Workload, refresh_interval: float = 0.1
) -> tuple[Callable[[], None], Callable[[], None]]:
    """An epoch of ``fit(verbose=0)`` and one with a live progress bar (as in a terminal),
    redrawn every ``refresh_interval`` seconds (ProgbarLogger's default)."""
    x, y = make_data(w)
    torch.manual_seed(0)
    model = torcheras.Model(make_net(w.sizes))
    model.compile(torch.optim.Adam(model.parameters(), lr=1e-3), "cross_entropy", device="cpu")

    def quiet() -> None:
        model.fit(x, y, batch_size=w.batch_size, epochs=1, verbose=0)

    def bar() -> None:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            model.fit(
                x,
                y,
                batch_size=w.batch_size,
                epochs=1,
                verbose=1,
                callbacks=[cb.ProgbarLogger(refresh_interval, interactive=True)],
            )

    return quiet, bar


def run_verbose(w: Workload, repeats: int) -> Result:
    """``verbose=1`` against ``verbose=0``, after one warm-up epoch of each."""
    quiet, bar = quiet_and_bar(w)
    quiet()
    bar()
    return interleave(quiet, bar, repeats)


def plain_and_monitored(
    w: Workload, **monitor: Any
) -> tuple[Callable[[], None], Callable[[], None]]:
    """An epoch of ``fit`` without callbacks and one with a ThroughputMonitor, on one model
    (the monitor counts the FLOPs of a step once per model: in the first monitored epoch)."""
    x, y = make_data(w)
    torch.manual_seed(0)
    model = torcheras.Model(make_net(w.sizes))
    model.compile(torch.optim.Adam(model.parameters(), lr=1e-3), "cross_entropy", device="cpu")
    callbacks = [cb.ThroughputMonitor(peak_flops=1e12, **monitor)]

    def plain() -> None:
        model.fit(x, y, batch_size=w.batch_size, epochs=1, verbose=0)

    def monitored() -> None:
        model.fit(x, y, batch_size=w.batch_size, epochs=1, verbose=0, callbacks=callbacks)

    return plain, monitored


def run_throughput(w: Workload, repeats: int, **monitor: Any) -> Result:
    """``fit`` with a ThroughputMonitor against ``fit`` without, after a warm-up epoch of each."""
    plain, monitored = plain_and_monitored(w, **monitor)
    plain()
    monitored()
    return interleave(plain, monitored, repeats)


def _chosen(only: str) -> list[Workload]:
    chosen = [w for w in WORKLOADS if w.name.startswith(only)]
    if not chosen:
        raise SystemExit(f"--only {only!r}: no workload's name starts so; try tiny or wide")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument(
        "--only", default="", help="the workloads whose name starts so (tiny, wide)"
    )
    parser.add_argument(
        "--runs", type=int, help="fit runs per row (default: tiny 30, wide 12; --quick 4)"
    )
    parser.add_argument("--markdown", action="store_true", help="also print the README table")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--jit", action="store_true", help="eager and jit_compile rows only")
    parser.add_argument("--common", action="store_true", help="the accuracy + validation rows only")
    parser.add_argument("--verbose", action="store_true", help="the verbose=1 / verbose=0 row only")
    parser.add_argument(
        "--throughput", action="store_true", help="the ThroughputMonitor / none rows only"
    )
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="cpu", help="what is timed (default: cpu)"
    )
    args = parser.parse_args()
    global CLOCK
    CLOCK = args.clock
    torch.set_num_threads(args.threads)
    if args.common:
        print(f"{'setting':<62} {'raw s/ep':>9} {'fit s/ep':>9} {'ratio':>7} {'IQR':>13}")
        for w in WORKLOADS[:1] if args.quick else _chosen(args.only):
            runs = args.runs or (4 if args.quick else w.runs)
            tiny = w is WORKLOADS[0]
            target = "<=1.05" if tiny else "<=1.02"
            _print_row(f"{w.name}, loss only", run(w, runs, False), "<=1.03" if tiny else target)
            for task, metric in (("classification", "accuracy"), ("regression", "mae")):
                raw, fit = common_path(w, task)
                raw()
                fit()
                _print_row(f"{w.name}, {metric} + validation", interleave(raw, fit, runs), target)
            with common_with_callbacks(w) as (raw, fit):
                raw()
                fit()
                result = interleave(raw, fit, runs)
            _print_row(f"{w.name}, accuracy + validation + typical callbacks", result, target)
            raw, fit = predict_pair(w)
            raw()
            fit()
            _print_row(f"{w.name}, predict (a no_grad pass)", interleave(raw, fit, runs), target)
            result = run(w, runs, True, control=True)
            _print_row(f"{w.name}, typical: raw / raw (the noise floor)", result, "")
        return
    if args.verbose:
        print(f"{'setting':<62} {'raw s/ep':>9} {'fit s/ep':>9} {'ratio':>7} {'IQR':>13}")
        r = run_verbose(WORKLOADS[0], args.runs or (4 if args.quick else WORKLOADS[0].runs))
        _print_row(WORKLOADS[0].name + ": verbose=1 (live bar) / verbose=0", r, "<=1.02")
        return
    if args.throughput:
        print(f"{'setting':<62} {'none s/ep':>9} {'with s/ep':>9} {'ratio':>7} {'IQR':>13}")
        w, repeats = WORKLOADS[0], args.runs or (4 if args.quick else WORKLOADS[0].runs)
        for label, monitor in (("ThroughputMonitor()", {}),
                               ("ThroughputMonitor(log_every_n_steps=50)",
                                {"log_every_n_steps": 50})):  # fmt: skip
            r = run_throughput(w, repeats, **monitor)
            _print_row(f"{w.name}: {label} / none", r, "<=1.01")
        return
    if args.jit:
        print(f"{'setting':<62} {'raw s/ep':>9} {'fit s/ep':>9} {'ratio':>7} {'IQR':>13}")
        for label, r in eager_and_jit(WORKLOADS[0], args.runs or (4 if args.quick else 12)):
            _print_row(label, r, "")
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; one epoch per run, each "
        "rated against the raw runs before and after it (tiny: 30 runs, wide: 12; --quick: 4); "
        "ratio = median [IQR]"
    )
    print(f"{'setting':<62} {'raw s/ep':>9} {'fit s/ep':>9} {'ratio':>7} {'IQR':>13} {'target':>7}")
    table = []
    for w in _chosen(args.only):
        repeats = args.runs or (4 if args.quick else w.runs)
        for with_cb in (False, True):
            r = run(w, repeats, with_cb)
            label = w.name + (" + typical callbacks" if with_cb else "")
            table.append((label, r, f"<={w.target:.2f}" if with_cb else ""))
            _print_row(*table[-1])
        r = run(w, repeats, True, control=True)
        table.append((w.name + " + typical: raw / raw (the noise floor)", r, ""))
        _print_row(*table[-1])
    r = run_verbose(WORKLOADS[0], args.runs or (4 if args.quick else WORKLOADS[0].runs))
    table.append((WORKLOADS[0].name + ": verbose=1 (live bar) / verbose=0", r, "<=1.02"))
    _print_row(*table[-1])
    if args.markdown:
        print("\n| setting | raw s/epoch | fit s/epoch | fit / raw (median) | IQR | target |")
        print("|---|---|---|---|---|---|")
        for label, r, target in table:
            print(
                f"| {label} | {r.raw:.3f} | {r.fit:.3f} | {r.ratio:.3f} | "
                f"{r.q1:.3f} – {r.q3:.3f} | {target} |"
            )


def _print_row(label: str, r: Result, target: str) -> None:
    iqr = f"[{r.q1:.3f}, {r.q3:.3f}]"
    print(
        f"{label:<62} {r.raw:>9.3f} {r.fit:>9.3f} {r.ratio:>7.3f} {iqr:>13} {target:>7}", flush=True
    )


if __name__ == "__main__":
    main()
