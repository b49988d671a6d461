"""The optimizer step by Keras name against torch's counterpart, on the tiny and wide MLP.

    PYTHONPATH=src python benchmarks/optimizer_step.py [--repeats 15]
    PYTHONPATH=src python benchmarks/optimizer_step.py --instructions   # tiny MLP, ~5 min

Each name's optimizer (``torcheras.optimizers.get(name)``: Keras's formula) and torch's
optimizer with the same hyperparameters step the same network with fixed gradients, in
alternating blocks; the table gives the median of the per-block time ratios (ours / torch's)
and their spread (min .. max), so a loaded machine shows as spread, not as a verdict.

``--instructions`` counts instead the instructions of 200 steps of each side on the tiny MLP
under Valgrind's callgrind (the same in every run, whatever else the machine does): the ratio
of the counts is the per-step overhead of the Keras formula over torch's step, Python included.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from torcheras import optimizers

try:
    from overhead import make_net
except ImportError:  # run from the repository root
    from benchmarks.overhead import make_net

# name -> torch's optimizer with the same hyperparameters (None: torch has none)
TORCH: dict[str, Callable | None] = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3, eps=1e-7),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, eps=1e-7, weight_decay=0.004),
    "sgd": lambda p: torch.optim.SGD(p, lr=0.01),
    "sgd momentum": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, alpha=0.9, eps=1e-7),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-3, initial_accumulator_value=0.1),
    "adadelta": lambda p: torch.optim.Adadelta(p, lr=1e-3, rho=0.95, eps=1e-7),
    "adamax": lambda p: torch.optim.Adamax(p, lr=1e-3, eps=1e-7),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-3, eps=1e-7),
    "lion": None,
}
NETS = {
    "tiny MLP 32-64-10": ((32, 64, 10), 500),
    "wide MLP 256-1024-1024-10": ((256, 1024, 1024, 10), 30),
}


def ours(name: str, params: list) -> torch.optim.Optimizer:
    if name == "sgd momentum":
        return optimizers.KerasSGD(params, momentum=0.9)
    return optimizers.get(name, params)


def block(opt: torch.optim.Optimizer, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return time.perf_counter() - start


def fresh_pair(
    name: str, sizes: tuple[int, ...]
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """Ours and torch's optimizer for ``name`` on two equal networks with fixed gradients."""
    torch.manual_seed(0)
    nets = [make_net(sizes), make_net(sizes)]
    for net in nets:
        for p in net.parameters():
            p.grad = torch.randn_like(p) * 1e-3
    return ours(name, list(nets[0].parameters())), TORCH[name](list(nets[1].parameters()))


def count_child(names: list[str], steps: int = 200) -> None:
    """Under callgrind: per name, a dump before ours' steps, before torch's, and after."""
    torch.set_num_threads(1)
    for name in names:
        mine, theirs = fresh_pair(name, NETS["tiny MLP 32-64-10"][0])
        block(mine, 20)
        block(theirs, 20)
        os.getppid()  # callgrind dumps at each getppid
        block(mine, steps)
        os.getppid()
        block(theirs, steps)
        os.getppid()


def count_instructions(names: list[str], steps: int = 200) -> None:
    names = [n for n in names if TORCH[n] is not None]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        subprocess.run(
            ["valgrind", "--tool=callgrind", "--dump-before=getppid",
             f"--callgrind-out-file={out}", sys.executable, __file__, "--child", *names],
            check=True, capture_output=True,
        )  # fmt: skip

        def total(i: int) -> int:
            (dump,) = glob.glob(f"{out}.{i}")
            with open(dump) as f:
                return next(int(line.split()[1]) for line in f if line.startswith("summary:"))

        print(
            f"{'tiny MLP 32-64-10':28} {'name':13} {'ours/step':>10} {'torch/step':>10} "
            f"{'ratio':>7}"
        )
        for k, name in enumerate(names):
            a, b = total(2 + 3 * k), total(3 + 3 * k)
            print(f"{'':28} {name:13} {a / steps:10.0f} {b / steps:10.0f} {a / b:7.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--names", nargs="*", default=list(TORCH))
    parser.add_argument("--instructions", action="store_true", help="count with callgrind")
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return count_child(args.child)
    if args.instructions:
        return count_instructions(args.names)
    torch.set_num_threads(1)
    print(f"{'network':28} {'name':13} {'ours us':>9} {'torch us':>9} {'ratio':>7}  spread")
    for net_name, (sizes, steps) in NETS.items():
        for name in args.names:
            if TORCH[name] is None:
                torch.manual_seed(0)
                mine, theirs = ours(name, list(make_net(sizes).parameters())), None
                for p in mine.param_groups[0]["params"]:
                    p.grad = torch.randn_like(p) * 1e-3
            else:
                mine, theirs = fresh_pair(name, sizes)
            block(mine, steps)  # warm-up, state allocated
            if theirs is not None:
                block(theirs, steps)
            ratios, a, b = [], [], []
            for _ in range(args.repeats):
                a.append(block(mine, steps) / steps * 1e6)
                if theirs is not None:
                    b.append(block(theirs, steps) / steps * 1e6)
                    ratios.append(a[-1] / b[-1])
            if ratios:
                print(f"{net_name:28} {name:13} {statistics.median(a):9.1f} "
                      f"{statistics.median(b):9.1f} {statistics.median(ratios):7.3f}  "
                      f"{min(ratios):.3f} .. {max(ratios):.3f}")  # fmt: skip
            else:
                print(f"{net_name:28} {name:13} {statistics.median(a):9.1f} {'-':>9} {'-':>7}")


if __name__ == "__main__":
    main()
