"""How long training stalls per checkpoint: a background save against a synchronous one.

A ~50M-parameter model (with Adam's two moments, ~600 MB of state) is saved the way
ModelCheckpoint does it, between training steps. "stall" is the time the training thread is
blocked by the save call; for the background save that is the copy of the state, while the
write itself (serialisation, fsync, rename) runs on the writer thread. The next save waits
for the previous write, so the stall also includes any wait for a write still running.

    python benchmarks/async_save.py            # 5 saves each way
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from torcheras import checkpoint, state  # noqa: E402


def make_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    net = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(12)])  # 12 x 4.2M = 50.4M
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    x = torch.randn(8, 2048)
    net(x).square().mean().backward()
    opt.step()  # Adam's moments exist
    net.optimizer = opt  # type: ignore[assignment] - save_model saves model.optimizer
    return net, opt


def train_steps(net: nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    x = torch.randn(8, 2048)
    for _ in range(n):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--steps-between", type=int, default=20)
    args = parser.parse_args()
    net, opt = make_model()
    params = sum(p.numel() for p in net.parameters())
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "ckpt.pt")
    results = {}
    for mode in ("synchronous", "background"):
        stalls = []
        between = []
        for _ in range(args.saves):
            start = time.perf_counter()
            state.save_model(net, path, weights_only=False, background=mode == "background")
            stalls.append(time.perf_counter() - start)
            start = time.perf_counter()
            train_steps(net, opt, args.steps_between)
            between.append(time.perf_counter() - start)
        start = time.perf_counter()
        checkpoint.wait_for_writes()
        tail = time.perf_counter() - start
        results[mode] = (statistics.median(stalls), statistics.median(between), tail)
    size = os.path.getsize(path) / 2**20
    print(f"model: {params / 1e6:.1f}M parameters; checkpoint {size:.0f} MiB (weights + Adam)")
    print(f"{'save':<12} {'stall per save (median)':>24} {'20 steps after it':>18}")
    for mode, (stall, between, _) in results.items():
        print(f"{mode:<12} {stall:>22.3f} s {between:>16.3f} s")
    ratio = results["synchronous"][0] / results["background"][0]
    print(f"the background save stalls training {ratio:.1f}x less per save")


if __name__ == "__main__":
    main()
