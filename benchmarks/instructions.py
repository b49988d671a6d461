"""Instructions per epoch, ``fit`` against the raw loop, counted by Valgrind's callgrind.

Wall-clock ratios on a shared VM move by several percent from run to run (see overhead.py's
noise-floor rows), more than the 1-3% targets. The number of instructions the CPU executes is
the same in every run: this script runs the overhead benchmark's settings (the same model,
data, optimizer, typical callbacks and raw loop, from ``overhead.side_by_side``) under
callgrind and counts each side's instructions for one epoch, after a warm-up epoch of each.

It measures CPU work, not time: memory stalls and the kernel's time in ``fsync`` are not
counted (both sides write the same files). Each setting runs in its own process under
Valgrind (about 50 times slower than native for the tiny MLP, far more for the wide MLP's
matrix products; the settings run two at a time):

    python benchmarks/instructions.py               # every setting, about an hour on 2 cores
    python benchmarks/instructions.py --only tiny   # the tiny MLP's settings, ~15 minutes
    python benchmarks/instructions.py --only wide   # the wide MLP's (cut short), ~40 minutes
    python benchmarks/instructions.py --callbacks   # the typical callbacks' cost, ~15 min

``--callbacks`` counts, in one process (so that nothing differs between the sides but what
is measured), one epoch of the common path (tiny MLP, accuracy + validation) for the raw loop
(``RawLoop``: its epoch-end finiteness check, TerminateOnNaN's, on both of its sides) without
and with the other callbacks' work, and for ``fit`` (a whole ``fit(epochs=1)`` call, its
setup included) without callbacks, with TerminateOnNaN alone, with the other four, and with
all five.

How: callgrind writes its counters to a file (and zeroes them) each time the program enters
``getppid``, which nothing else calls during training; the script calls ``os.getppid()``
between the phases.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(__file__))
import overhead  # noqa: E402

import torcheras  # noqa: E402

TINY = overhead.WORKLOADS[0]
# The wide MLP's epoch cut short: one of its batches takes about a minute under callgrind, so a
# whole epoch (50 batches) would take most of an hour per side. Counted at two lengths (5 and
# 3 training batches, a tenth of the samples validating): fit's extra work is mostly per epoch
# (setup, validation plumbing), so the ratio falls as the epoch grows, and a full epoch's is
# below the 5-batch one's; the two rows show that trend rather than assume it.
WIDE_5 = dataclasses.replace(overhead.WORKLOADS[1], samples=1280)  # 1,152 train, 128 validate
WIDE_3 = dataclasses.replace(overhead.WORKLOADS[1], samples=768)  # 692 train, 76 validate
# name: (label, workload, setting); a setting is "none", "typical", "verbose", "throughput",
# "common" (accuracy + validation) or "common-typical" (the same + the typical callbacks).
SETTINGS = {
    "tiny-none": ("tiny MLP 32-64-10, batch 64", TINY, "none"),
    "tiny-typical": ("tiny MLP 32-64-10, batch 64 + typical callbacks", TINY, "typical"),
    "tiny-verbose": ("tiny MLP 32-64-10, batch 64: verbose=1 / verbose=0", TINY, "verbose"),
    "tiny-accuracy": ("tiny MLP 32-64-10, batch 64, accuracy + validation", TINY, "common"),
    "tiny-accuracy-typical": (
        "tiny MLP 32-64-10, batch 64, accuracy + validation + typical callbacks",
        TINY,
        "common-typical",
    ),
    "tiny-throughput": (
        "tiny MLP 32-64-10, batch 64: ThroughputMonitor / none",
        TINY,
        "throughput",
    ),
    "wide-typical": (
        "wide MLP 256-1024-1024-10, batch 256 + typical callbacks, an epoch of 5 batches",
        WIDE_5,
        "typical",
    ),
    "wide-typical-3": ("the same, an epoch of 3 batches", WIDE_3, "typical"),
}
TARGETS = {
    "tiny-none": 1.03,
    "tiny-throughput": 1.01,
    "tiny-typical": 1.03,
    "tiny-verbose": 1.02,
    "tiny-accuracy": 1.05,
    "tiny-accuracy-typical": 1.05,
    "wide-typical": 1.01,
}
MARK = os.getppid  # the phase boundary callgrind dumps at


def child(name: str, native_seconds: float) -> None:
    """Inside Valgrind: warm up, then one epoch of the base and one of the other side."""
    torch.set_num_threads(1)
    _, w, setting = SETTINGS[name]
    if setting == "verbose":
        # Valgrind runs ~50x slower: a bar redrawn every 0.1 s of its clock would redraw 50x
        # more often per batch than natively. Stretch the interval by the measured slowdown so
        # that it redraws as often per epoch as it does at native speed.
        base, _ = overhead.quiet_and_bar(w)
        base()
        start = time.perf_counter()
        base()
        slowdown = (time.perf_counter() - start) / native_seconds
        base, other = overhead.quiet_and_bar(w, refresh_interval=0.1 * slowdown)
        base()
        other()
        count_phases(base, other)
        return
    if setting == "throughput":
        base, other = overhead.plain_and_monitored(w)
        base()
        other()
        count_phases(base, other)
        return
    if setting == "common":
        base, other = overhead.common_path(w)
        base()
        other()
        count_phases(base, other)
        return
    if setting == "common-typical":
        with overhead.common_with_callbacks(w) as (base, other):
            base()
            other()
            count_phases(base, other)
        return
    with overhead.side_by_side(w, with_callbacks=setting == "typical") as (base, other):
        base()
        other()
        count_phases(base, other)


def count_phases(base: Callable[[], None], other: Callable[[], None]) -> None:
    MARK()  # dump 1: start-up and warm-up
    base()
    MARK()  # dump 2: the base epoch
    other()
    MARK()  # dump 3: the other epoch


def native_epoch_seconds(name: str) -> float:
    """The median wall time of three ``verbose=0`` epochs of the setting, at native speed."""
    torch.set_num_threads(1)
    base, _ = overhead.quiet_and_bar(SETTINGS[name][1])
    base()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        base()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _phase_totals(command: list[str], out: str, what: str) -> dict[int, int]:
    """Run ``command`` (callgrind writing to ``out``); each phase dump's instruction total."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{what}: valgrind failed\n{done.stderr[-2000:]}")
    totals = {}
    for path in glob.glob(out + ".*"):
        with open(path) as f:
            for line in f:
                if line.startswith("totals:"):
                    totals[int(path.rsplit(".", 1)[1])] = int(line.split()[1])
    return totals


CALLBACK_PHASES = ("raw", "raw + their work", "fit", "fit + TerminateOnNaN", "fit + the other four",
                   "fit + all five")  # fmt: skip


def callbacks_child(folder: str) -> None:
    """Inside Valgrind: each side of ``CALLBACK_PHASES`` warmed up, then one epoch of each."""
    torch.set_num_threads(1)
    w = TINY
    x, y = overhead.make_data(w)
    n_val = w.samples // 10
    xv, yv, x, y = x[-n_val:], y[-n_val:], x[:-n_val], y[:-n_val]
    net = overhead.make_net(w.sizes)
    raw = overhead.RawLoop(net, torch.optim.Adam(net.parameters(), lr=1e-3), folder)

    def raw_epoch(work: bool) -> Callable[[], None]:
        return lambda: raw.epoch_(x, y, w.batch_size, (xv, yv), accuracy=True, callbacks=work)

    def fit_epoch(callbacks: list[Any]) -> Callable[[], None]:
        torch.manual_seed(0)
        model = torcheras.Model(overhead.make_net(w.sizes))
        model.compile(torch.optim.Adam(model.parameters(), lr=1e-3), "cross_entropy",
                      metrics=["accuracy"], device="cpu")  # fmt: skip
        return lambda: model.fit(x, y, batch_size=w.batch_size, epochs=1, verbose=0,
                                 callbacks=callbacks, validation_data=(xv, yv))  # fmt: skip

    typical = overhead.typical_callbacks(folder)  # the four, then TerminateOnNaN
    sides = [raw_epoch(False), raw_epoch(True), fit_epoch([]), fit_epoch([typical[4]]),
             fit_epoch(typical[:4]), fit_epoch(overhead.typical_callbacks(folder))]  # fmt: skip
    for side in sides:
        side()
    for side in sides:
        MARK()  # a dump before each side: the first holds start-up and warm-up
        side()
    MARK()


def measure_callbacks(folder: str) -> list[int]:
    """Run ``callbacks_child`` under callgrind; each side's instruction count."""
    out = os.path.join(folder, "callbacks.out")
    command = ["valgrind", "--tool=callgrind", "--dump-before=getppid", "--dump-instr=no",
               f"--callgrind-out-file={out}", sys.executable, os.path.abspath(__file__),
               "--callbacks-child", folder]  # fmt: skip
    totals = _phase_totals(command, out, "--callbacks")
    expected = list(range(1, len(CALLBACK_PHASES) + 2))
    if sorted(totals) != expected:
        raise SystemExit(f"--callbacks: expected phase dumps {expected}, got {sorted(totals)}")
    return [totals[i] for i in expected[1:]]


def print_callbacks(counts: list[int]) -> None:
    by_name = dict(zip(CALLBACK_PHASES, counts))
    print(f"torch {torch.__version__}, 1 thread; instructions of one epoch, one process\n")
    print("| side | instructions | against |")
    print("|---|---|---|")
    against = {
        "raw + their work": ("raw", "+"),
        "fit": ("raw", "/"),
        "fit + TerminateOnNaN": ("fit", "+"),
        "fit + the other four": ("fit", "+"),
        "fit + all five": ("raw + their work", "/"),
    }
    for name, count in by_name.items():
        note = ""
        if name in against:
            base, how = against[name]
            if how == "+":
                note = f"{base} {(count - by_name[base]) / 1e6:+.1f} M"
            else:
                note = f"{base}: {count / by_name[base]:.4f}"
        print(f"| {name} | {count / 1e6:.1f} M | {note} |")


def measure(name: str, folder: str, native_seconds: float) -> tuple[int, int]:
    """Run one setting under callgrind; its (base, other) instruction counts."""
    out = os.path.join(folder, f"{name}.out")
    command = [
        "valgrind",
        "--tool=callgrind",
        "--dump-before=getppid",
        "--dump-instr=no",
        f"--callgrind-out-file={out}",
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        name,
        f"--native-seconds={native_seconds}",
    ]
    totals = _phase_totals(command, out, name)
    if sorted(totals) != [1, 2, 3]:
        raise SystemExit(f"{name}: expected 3 phase dumps, got {sorted(totals)}")
    return totals[2], totals[3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--native-seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--callbacks-child", help=argparse.SUPPRESS)
    parser.add_argument(
        "--callbacks",
        action="store_true",
        help="fit without callbacks, with TerminateOnNaN, with the other four and with all five,"
        " against the raw loop without and with their work, in one process",
    )
    parser.add_argument(
        "--only",
        default="",
        help="names containing one of these, comma-separated (e.g. tiny or tiny-none,wide)",
    )
    args = parser.parse_args()
    if args.child:
        child(args.child, args.native_seconds)
        return
    if args.callbacks_child:
        callbacks_child(args.callbacks_child)
        return
    if shutil.which("valgrind") is None:
        print("instructions.py: valgrind is not installed (apt install valgrind); skipped")
        return
    if args.callbacks:
        print_callbacks(measure_callbacks(tempfile.mkdtemp()))
        return
    names = [n for n in SETTINGS if any(part in n for part in args.only.split(","))]
    folder = tempfile.mkdtemp()
    native = {n: native_epoch_seconds(n) if SETTINGS[n][2] == "verbose" else 0.0 for n in names}
    with ThreadPoolExecutor(max_workers=2) as pool:
        counts = dict(zip(names, pool.map(lambda n: measure(n, folder, native[n]), names)))
    print(f"torch {torch.__version__}, 1 thread; instructions of one epoch (callgrind)\n")
    print("| setting | raw (or verbose=0) instructions | fit instructions | ratio | target |")
    print("|---|---|---|---|---|")
    for name, (base, other) in counts.items():
        target = f"<={TARGETS[name]:.2f}" if name in TARGETS else ""
        label = SETTINGS[name][0]
        ratio = other / base
        print(f"| {label} | {base / 1e9:.3f} G | {other / 1e9:.3f} G | {ratio:.4f} | {target} |")


if __name__ == "__main__":
    main()
