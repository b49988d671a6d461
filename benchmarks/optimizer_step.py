"""The optimizer step by Keras name against torch's counterpart, on the tiny and wide MLP.

    PYTHONPATH=src python benchmarks/optimizer_step.py [--repeats 15]

Each name's optimizer (``torcheras.optimizers.get(name)``: Keras's formula) and torch's
optimizer with the same hyperparameters step the same network with fixed gradients, in
alternating blocks; the table gives the median of the per-block time ratios (ours / torch's)
and their spread (min .. max), so a loaded machine shows as spread, not as a verdict.
"""

from __future__ import annotations

import argparse
import statistics
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--names", nargs="*", default=list(TORCH))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'network':28} {'name':13} {'ours us':>9} {'torch us':>9} {'ratio':>7}  spread")
    for net_name, (sizes, steps) in NETS.items():
        for name in args.names:
            torch.manual_seed(0)
            nets = [make_net(sizes), make_net(sizes)]
            for net in nets:
                for p in net.parameters():
                    p.grad = torch.randn_like(p) * 1e-3
            mine = ours(name, list(nets[0].parameters()))
            theirs = TORCH[name](list(nets[1].parameters())) if TORCH[name] else None
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
