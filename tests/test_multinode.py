"""Several nodes: two torchrun agents on this machine (c10d rendezvous, 2 processes each).

The job trains 4 processes over gloo, stops all of them at the same epoch, writes its files
from global rank 0 only, and survives the loss of a node: the last node's agent and its two
processes are killed with SIGKILL mid-epoch, the surviving agent restarts its processes
(``--max-restarts=1``), a replacement agent joins the rendezvous (as a cluster scheduler
would start one), and BackupAndRestore resumes every rank from the last backup.

Each run is under a timeout, so a hang fails the test instead of the CI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import launch_script

SCRIPT = Path(__file__).parent / "distributed" / "ddp_script.py"
TIMEOUT = 180
ENV = {"TORCHERAS_DIST_TIMEOUT": "30", "OMP_NUM_THREADS": "1"}
pytestmark = [
    pytest.mark.skipif(
        not torch.distributed.is_available(), reason="torch.distributed is not available"
    ),
    # one pytest-xdist worker runs the module (`--dist loadgroup`): its long runs start early
    pytest.mark.xdist_group("test_multinode"),
]

# EarlyStopping on a validation set whose labels are wrong on rank 1 (only the all-reduced
# val_loss agrees), BackupAndRestore every 3 steps; 8 batches an epoch, up to 8 epochs.
ARGS = ["--case", "early_stop", "--backup", "--epochs", "8"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def agent(out: Path, port: int, name: str, *args: str, host: bool) -> subprocess.Popen[str]:
    """One node's torchrun agent: 2 processes, rendezvous at localhost:port. Both agents run
    on this machine, so the store's host is named (``is_host``): on real nodes the one whose
    address is the endpoint hosts it. A replaced node rejoins only with torch's shared
    rendezvous store turned off (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): torch 2.13's shared
    store does not publish its address to an agent that joins after a restart."""
    env = {**os.environ, **ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2"),
        *("--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=multinode"),
        f"--rdzv-conf=is_host={int(host)}",
        "--max-restarts=1",
        *(str(SCRIPT), str(out), *args),
    ]
    with open(out / f"{name}.log", "w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)


def run_two_nodes(out: Path, *args: str) -> dict[str, int]:
    """Start node 0 (the store's host) and node 1; if one agent is killed, start a replacement
    for it. The agents' exit codes by name."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    agents = {"node0": agent(out, port, "node0", *args, host=True)}
    time.sleep(0.5)  # node 0 first: the lower process id, so the rendezvous ranks it first
    agents["node1"] = agent(out, port, "node1", *args, host=False)
    deadline = time.monotonic() + TIMEOUT
    try:
        while any(a.poll() is None for a in agents.values()):
            assert time.monotonic() < deadline, "the two-node job hung"
            if agents["node1"].poll() == -9 and "replacement" not in agents:
                agents["replacement"] = agent(out, port, "replacement", *args, host=False)
            time.sleep(0.2)
    finally:
        for a in agents.values():
            if a.poll() is None:
                a.kill()
    return {name: a.returncode for name, a in agents.items()}


def result(out: Path, rank: int) -> tuple[dict, dict]:
    final = torch.load(out / f"result{rank}" / "final.pt", weights_only=True)
    return final, json.loads((out / f"result{rank}" / "history.json").read_text())


@pytest.fixture(scope="module")
def one_node(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same job as 4 processes on one node that nothing interrupts: what it must match."""
    out = tmp_path_factory.mktemp("one_node")
    launch_script(SCRIPT, out, *ARGS, ranks=4, env=ENV, timeout=TIMEOUT)
    return out


def test_two_nodes_train_stop_together_write_on_rank_0_and_resume_after_losing_a_node(
    tmp_path, one_node
):
    codes = run_two_nodes(tmp_path, *ARGS, "--kill-node-at", "10")
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in codes}
    # node 1 was lost at step 10; node 0's agent restarted its processes, which rejoined with
    # the replacement node, and the job finished
    assert codes == {"node0": 0, "node1": -9, "replacement": 0}, logs
    assert "Connection closed by peer" in logs["node0"]  # its processes saw node 1 go
    assert (tmp_path / "node-killed").exists()

    reference = [result(one_node, rank) for rank in range(4)]
    want, expected = reference[0]
    assert expected["stop_reason"].startswith("EarlyStopping")
    assert expected["epoch"] == [0, 1, 2, 3, 4, 5]  # stopped before the 8th epoch
    for rank in range(4):
        got, hist = result(tmp_path, rank)
        # every rank stopped at the same epoch as the one-node run, for the same reason
        assert hist["epoch"] == expected["epoch"], rank
        assert hist["stop_reason"] == expected["stop_reason"], rank
        # resumed from the backup at step 9, not restarted: 48 - 9 batches trained
        assert (hist["trained"], hist["global_step"]) == (48 - 9, 48), rank
        for key in want["weights"]:
            assert torch.equal(got["weights"][key], result(tmp_path, 0)[0]["weights"][key])
            # float32: the first step after a resume all-reduces the gradients in DDP's
            # first-iteration bucket order, so 4 ranks sum them in another order (1 ulp)
            torch.testing.assert_close(
                got["weights"][key], want["weights"][key], rtol=1e-5, atol=1e-6
            )
        for key, values in expected["history"].items():
            assert hist["history"][key] == pytest.approx(values, rel=1e-5, abs=1e-6), key
        torch.testing.assert_close(got["predict"], want["predict"], rtol=1e-5, atol=1e-6)

    # files: from global rank 0 only (ranks 0 and 1 of each node are local ranks 0 and 1)
    assert (tmp_path / "rank0" / "best.pt").exists()
    assert not any((tmp_path / f"rank{rank}").exists() for rank in (1, 2, 3))
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert rows[0] == (one_node / "log.csv").read_text().splitlines()[0]
    assert len(rows) == 1 + len(expected["epoch"])  # header + one row per epoch, once
    assert not (tmp_path / "backup").exists()  # rank 0 removed its backup at the end
    stopped = json.loads((tmp_path / "result0" / "history.json").read_text())["stop_reason"]
    assert "did not improve for 1 epoch" in stopped


NODE_LOCAL_SCRIPT = """
import os, sys
import torch
import torcheras
from torcheras.callbacks import BackupAndRestore

out, rank = sys.argv[1], os.environ["RANK"]
torch.manual_seed(0)
x, y = torch.randn(64, 4), torch.randn(64, 1)
model = torcheras.Model(torch.nn.Linear(4, 1))
model.compile("sgd", "mse", device="cpu")

def backup():  # on this process's own disk, as on nodes that share no filesystem
    return BackupAndRestore(os.path.join(out, f"disk{rank}"), delete_checkpoint=False)

model.fit(x, y, epochs=1, verbose=0, callbacks=[backup()])  # rank 0 writes disk0/latest.pt
try:
    model.fit(x, y, epochs=2, verbose=0, callbacks=[backup()])
except OSError as exc:
    with open(os.path.join(out, f"error{rank}.txt"), "w") as f:
        f.write(str(exc))
"""


def test_a_backup_that_only_some_processes_can_read_is_refused_on_every_rank(tmp_path):
    """A backup folder on node 0's local disk: rank 0 would resume at its step while the
    processes of another node start over (a hang, or silently different weights)."""
    script = tmp_path / "node_local.py"
    script.write_text(NODE_LOCAL_SCRIPT)
    launch_script(script, tmp_path, ranks=2, env=ENV, timeout=TIMEOUT)
    errors = [(tmp_path / f"error{rank}.txt").read_text() for rank in (0, 1)]
    assert errors[0] == errors[1]  # every rank stops, with the same message
    backup = tmp_path / "disk0" / "latest.pt"
    assert f"(rank 0: step 2 in {backup}, rank 1: no backup)" in errors[0]
    assert "storage every node shares" in errors[0]
    assert backup.exists() and not (tmp_path / "disk1").exists()
