"""Every pair of training features together, against a hand-written torch loop (issue 19).

Eight binary factors: eager / ``jit_compile``; one process / 2 gloo ranks under torchrun (the
same global batch); ``gradient_accumulation_steps`` 1 / 3 (5 batches an epoch: groups of 3 and
a short 2); precision ``"32"`` / ``"bf16-mixed"``; one output / two with ``loss_weights``; no
EMA / ``ema_momentum``; no clipping / ``global_clipnorm``; ``torcheras.Model(net)`` / a
subclass with its own layers, ``compute_loss`` (a penalty added) and ``optimizer_step``
(counted) overridden, trained with Keras's SGD (``optimizers.KerasSGD``, whose step runs
eagerly under ``jit_compile``; torch's momentum at a constant rate). ``COVERING`` holds
every pair of levels of every pair of factors in six rows. Each row's run
(tests/combinations/combo_script.py) must end with the weights, the History and the number
of optimizer steps of the plain loop of the same settings here: one process, eager, in
order, accumulation, clipping and EMA written out by hand. Two one-process rows (COVERING's
row 3 and one more) are also killed with SIGKILL mid-epoch and resumed by
BackupAndRestore: they must end as their uninterrupted run.

The runs are grouped, all under one timeout: one process for the one-process rows, one
torchrun launch for the 2-rank rows, and meanwhile the kill / resume chain.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F

from torcheras import checkpoint

sys.path.insert(0, str(Path(__file__).parent / "combinations"))
from combo_script import (  # noqa: E402
    BATCH,
    CLIPNORM,
    EMA_MOMENTUM,
    EPOCHS,
    FACTORS,
    LEARNING_RATE,
    LOSS_WEIGHTS,
    MOMENTUM,
    PENALTY,
    SAMPLES,
    SEED,
    Net,
    make_data,
)

# One pytest-xdist worker runs the module (`--dist loadgroup`): `runs` is made once, and no
# worker waits on another for it.
pytestmark = pytest.mark.xdist_group("test_combinations")

SCRIPT = Path(__file__).parent / "combinations" / "combo_script.py"
TIMEOUT = 300  # seconds for every group of runs; a hang fails instead of stalling the suite

# A pairwise covering array: row 0 is every factor at level 0; each column is a distinct
# 3-subset of rows 1..5, so any two columns share a row at (1, 1), and each has a row where it
# is 1 and the other 0 (test_the_table_covers_every_pair_of_levels_of_every_pair_of_factors).
#  jit  ranks2 accum3 bf16  two_outputs ema  clip  subclass
COVERING = [
    (0, 0, 0, 0, 0, 0, 0, 0),
    (1, 1, 0, 0, 0, 1, 0, 1),
    (1, 0, 1, 1, 1, 1, 0, 1),
    (1, 0, 0, 1, 1, 0, 1, 0),
    (0, 1, 1, 1, 0, 1, 1, 0),
    (0, 1, 1, 0, 1, 0, 1, 1),
]
# Killed at the start of a batch (global index, 0-based) and resumed, one process each:
# levels -> (the batch, the global step of the last backup; save_freq=1 counts optimizer
# steps). The jit row is COVERING's row 3, whose run (with the same backups) is the
# uninterrupted one: its compiled graphs are in the disk cache when it is killed and resumed.
#  jit  ranks2 accum3 bf16  two_outputs ema  clip  subclass
RESUMED = {
    # mid-group (epoch 1's first group is batches 5-7): the last backup closed batch 4
    (0, 0, 1, 0, 0, 1, 0, 1): (6, 5),
    COVERING[3]: (7, 7),
}

# Final weights and History against the reference. float32: the same operations summed in
# other orders (2 ranks, compiled kernels): measured up to 1.2e-7. bf16-mixed: the reference
# runs its forward pass under the same autocast. Measured, max |w - w_ref| after 10 steps (the
# weights are of scale 1): eager on 2 ranks 3.1e-4 (3.9e-4 from a float32 loop), jit 4.7e-3
# to 5.7e-3 (3.1e-3 from a float32 loop: inductor keeps its fused pointwise ops in float32),
# at most half of this tolerance. History: up to 9.2e-3 relative (jit), the loss at weights
# that far apart. Every factor moves the weights by 3 tolerances or more
# (test_the_reference_exercises_each_feature_it_is_given) and History, EMA aside, by 13% or
# more; the bugs this test found (issue 19) moved the weights by 0.1 to 0.9.
TOLERANCE = {False: {"rtol": 1e-4, "atol": 1e-5}, True: {"rtol": 1e-2, "atol": 1e-2}}
HISTORY_TOLERANCE = {False: {"rel": 1e-4, "abs": 1e-5}, True: {"rel": 3e-2, "abs": 1e-3}}

BATCHES = SAMPLES // BATCH


class Row(NamedTuple):
    jit: int
    ranks2: int
    accum3: int
    bf16: int
    two_outputs: int
    ema: int
    clip: int
    subclass: int

    @property
    def name(self) -> str:
        words = [
            ("eager", "jit"),
            ("1proc", "2ranks"),
            ("accum1", "accum3"),
            ("fp32", "bf16"),
            ("1out", "2out"),
            ("noema", "ema"),
            ("noclip", "clip"),
            ("wrapped", "subclass"),
        ]
        return "-".join(pair[level] for pair, level in zip(words, self))

    def config(self, **extra: Any) -> dict[str, Any]:
        return {"name": self.name, **dict(zip(FACTORS, self)), **extra}

    @property
    def accumulation(self) -> int:
        return 3 if self.accum3 else 1

    @property
    def optimizer_steps(self) -> int:
        return EPOCHS * math.ceil(BATCHES / self.accumulation)


assert Row._fields == FACTORS
ROWS = [Row(*levels) for levels in COVERING]
RESUME_ROWS = [Row(*levels) for levels in RESUMED]
CHECKED = ROWS + [r for r in RESUME_ROWS if r not in ROWS]  # each against the plain loop


def ids(rows: list[Row]) -> list[str]:
    return [row.name for row in rows]


def test_the_table_covers_every_pair_of_levels_of_every_pair_of_factors():
    assert len(set(COVERING)) == len(COVERING)
    for a, b in itertools.combinations(range(len(FACTORS)), 2):
        seen = {(row[a], row[b]) for row in COVERING}
        assert seen == {(0, 0), (0, 1), (1, 0), (1, 1)}, (FACTORS[a], FACTORS[b])


# ---- the reference: one process, eager, a hand-written torch loop --------------------------
class Reference(NamedTuple):
    initial: dict[str, torch.Tensor]
    final: dict[str, torch.Tensor]
    history: dict[str, list[float]]
    steps: int
    clipped: int  # optimizer steps whose gradients the clipping scaled down


@functools.cache
def reference(row: Row) -> Reference:
    torch.manual_seed(SEED)
    net = Net(bool(row.two_outputs))
    initial = {k: v.detach().clone() for k, v in net.state_dict().items()}
    params = list(net.parameters())
    optimizer = torch.optim.SGD(params, lr=LEARNING_RATE, momentum=MOMENTUM)
    x, y1, y2 = make_data()
    batches = [slice(i, i + BATCH) for i in range(0, SAMPLES, BATCH)]
    groups = [batches[i : i + row.accumulation] for i in range(0, BATCHES, row.accumulation)]
    history: dict[str, list[float]] = {}
    average: list[torch.Tensor] | None = None
    steps = clipped = 0
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if row.bf16 else contextlib.nullcontext()
    for _ in range(EPOCHS):
        sums: dict[str, float] = {}
        for group in groups:
            optimizer.zero_grad()
            for part in group:
                with autocast:
                    out = net(x[part])
                    if row.two_outputs:
                        losses = {
                            "output_0_loss": F.mse_loss(out[0].float(), y1[part]),
                            "output_1_loss": F.mse_loss(out[1].float(), y2[part]),
                        }
                        loss = (
                            LOSS_WEIGHTS[0] * losses["output_0_loss"]
                            + LOSS_WEIGHTS[1] * losses["output_1_loss"]
                        )
                    else:
                        losses, loss = {}, F.mse_loss(out.float(), y1[part])
                    if row.subclass:
                        loss = loss + PENALTY * (net.body.weight**2).sum()
                (loss / len(group)).backward()  # a short group: the mean of its own batches
                for key, value in {"loss": loss, **losses}.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach()) * BATCH
            if row.clip:
                norm = torch.nn.utils.clip_grad_norm_(params, CLIPNORM)
                clipped += bool(norm > CLIPNORM)
            optimizer.step()
            steps += 1
            with torch.no_grad():
                if row.ema and average is None:  # Keras: the first update copies the weights
                    average = [p.detach().clone() for p in params]
                elif row.ema:
                    for a, p in zip(average, params):
                        a.mul_(EMA_MOMENTUM).add_(p, alpha=1 - EMA_MOMENTUM)
        for key, total in sums.items():  # the epoch's mean, weighted by batch size
            history.setdefault(key, []).append(total / SAMPLES)
    if average is not None:  # the end of fit: the weights become the average
        with torch.no_grad():
            for a, p in zip(average, params):
                p.copy_(a)
    final = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return Reference(initial, final, history, steps, clipped)


@pytest.mark.parametrize("row", CHECKED, ids=ids(CHECKED))
def test_the_reference_exercises_each_feature_it_is_given(row):
    """No factor is a no-op: the plain loop without it ends more than 3 tolerances away, in
    weights and History (the comparisons below would see torcheras ignore it); clipping clips
    some steps, not all (the gradients' scale still matters)."""
    ref = reference(row)
    assert ref.steps == row.optimizer_steps
    if row.clip:
        assert 0 < ref.clipped < ref.steps, "CLIPNORM should clip some steps, not all"
    wide = {k: 3 * v for k, v in TOLERANCE[bool(row.bf16)].items()}
    wide_history = {k: 3 * v for k, v in HISTORY_TOLERANCE[bool(row.bf16)].items()}
    for factor in ("accum3", "ema", "clip", "subclass"):
        if getattr(row, factor):
            without = reference(row._replace(**{factor: 0}))
            assert not all(
                torch.allclose(ref.final[k], without.final[k], **wide) for k in without.final
            ), f"{factor} changes the weights too little for the tolerance"
            if factor != "ema":  # the average is not what trains: History is the same
                assert without.history["loss"] != pytest.approx(
                    ref.history["loss"], **wide_history
                ), f"{factor} changes History too little for the tolerance"


# ---- the runs -------------------------------------------------------------------------------
class Group(NamedTuple):
    """One launch: its output folder, exit code (None: timed out) and stderr."""

    out: Path
    returncode: int | None
    stderr: str

    def failure(self) -> str:
        state = "timed out" if self.returncode is None else f"exit code {self.returncode}"
        return f"the run {state}:\n{self.stderr[-4000:]}"


def _command(configs: list[dict[str, Any]], out: Path, ranks: int, *args: str) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    configs_file = out / f"configs{len(list(out.glob('configs*.json')))}.json"
    configs_file.write_text(json.dumps(configs))
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    return [*launcher, str(SCRIPT), str(out), f"@{configs_file}", *args]


def _start(command: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "TORCHERAS_DIST_TIMEOUT": "30", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(  # its own session: a timeout ends torchrun and its workers
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip


def _wait(process: subprocess.Popen[str], out: Path, deadline: float) -> Group:
    try:
        _, stderr = process.communicate(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        return Group(out, None, stderr)
    return Group(out, process.returncode, stderr)


class Resumed(NamedTuple):
    killed: Group
    backup_step: int | None  # the global step of the backup the kill left
    resumed: Group


def _run_everything(root: Path) -> dict[str, Any]:
    """The one-process group and the torchrun group at once, then the kill / resume chain (in
    turn, once the one-process group has left the jit row's graphs in the disk cache)."""
    deadline = time.monotonic() + TIMEOUT
    single = [r.config(backup=True) for r in RESUME_ROWS]  # the uninterrupted runs
    single += [r.config() for r in ROWS if not r.ranks2 and r not in RESUMED]
    ranks = root / "ranks"
    two_ranks = _start(_command([r.config() for r in ROWS if r.ranks2], ranks, 2))
    groups = {1: _wait(_start(_command(single, root / "single", 1)), root / "single", deadline)}
    resumed: dict[Row, Resumed] = {}
    for row in RESUME_ROWS:
        kill_at, _ = RESUMED[row]
        out = root / "resume"
        configs = [row.config(backup=True)]
        killed = _wait(_start(_command(configs, out, 1, "--kill-at", str(kill_at))), out, deadline)
        backup = out / row.name / "backup" / "latest.pt"
        step = checkpoint.load(backup)["global_step"] if backup.exists() else None
        again = _wait(_start(_command(configs, out, 1)), out, deadline)
        resumed[row] = Resumed(killed, step, again)
    groups[2] = _wait(two_ranks, ranks, deadline)
    return {"groups": groups, "resumed": resumed}


def _to_json(runs: dict[str, Any]) -> str:
    def group(g: Group) -> list[Any]:
        return [str(g.out), g.returncode, g.stderr]

    return json.dumps({
        "groups": {k: group(g) for k, g in runs["groups"].items()},
        "resumed": [[list(row), group(r.killed), r.backup_step, group(r.resumed)]
                    for row, r in runs["resumed"].items()],
    })  # fmt: skip


def _from_json(text: str) -> dict[str, Any]:
    def group(g: list[Any]) -> Group:
        return Group(Path(g[0]), g[1], g[2])

    saved = json.loads(text)
    return {
        "groups": {int(k): group(g) for k, g in saved["groups"].items()},
        "resumed": {Row(*row): Resumed(group(k), step, group(r))
                    for row, k, step, r in saved["resumed"]},
    }  # fmt: skip


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run once per test session, whichever pytest-xdist worker asks first: the others wait
    for it and read its results (the runs take minutes of both cores)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:  # one process: nobody to share with
        return _run_everything(tmp_path_factory.mktemp("combinations"))
    shared = tmp_path_factory.getbasetemp().parent  # this session's, every worker's
    results = shared / "combinations.json"
    with open(shared / "combinations.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if results.exists():
            return _from_json(results.read_text())
        runs = _run_everything(tmp_path_factory.mktemp("combinations"))
        results.write_text(_to_json(runs))
        return runs


def load(group: Group, row: Row, rank: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    folder = group.out / row.name / f"rank{rank}"
    if not (folder / "result.json").exists():
        pytest.fail(f"{row.name} rank {rank} wrote no result; {group.failure()}")
    weights = torch.load(folder / "weights.pt", weights_only=True)
    return weights, json.loads((folder / "result.json").read_text())


def group_of(runs: dict[str, Any], row: Row) -> Group:
    return runs["groups"][2 if row.ranks2 else 1]


def ranks_of(row: Row) -> range:
    return range(2 if row.ranks2 else 1)


def assert_weights_close(got: dict[str, Any], want: dict[str, Any], bf16: bool) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(
            got[key], want[key], **TOLERANCE[bf16], msg=lambda m, key=key: f"{key}: {m}"
        )


def assert_history_close(got: dict[str, list[float]], want: dict[str, list[float]], bf16: bool):
    assert set(got) == {*want, "learning_rate"}
    assert got["learning_rate"] == pytest.approx([LEARNING_RATE] * EPOCHS)
    for key, values in want.items():
        assert got[key] == pytest.approx(values, **HISTORY_TOLERANCE[bf16]), key


# ---- every row against the reference ----------------------------------------------------------
@pytest.mark.parametrize("row", CHECKED, ids=ids(CHECKED))
def test_final_weights_equal_the_plain_loop(runs, row):
    ref = reference(row)
    for rank in ranks_of(row):
        weights, _ = load(group_of(runs, row), row, rank)
        for key in ref.initial:  # the same start: any difference is the training's
            assert torch.equal(weights["initial"][key], ref.initial[key]), key
        assert_weights_close(weights["final"], ref.final, bool(row.bf16))


@pytest.mark.parametrize("row", CHECKED, ids=ids(CHECKED))
def test_history_equals_the_plain_loop(runs, row):
    ref = reference(row)
    for rank in ranks_of(row):
        _, result = load(group_of(runs, row), row, rank)
        assert_history_close(result["history"], ref.history, bool(row.bf16))


@pytest.mark.parametrize("row", CHECKED, ids=ids(CHECKED))
def test_optimizer_steps_are_one_per_accumulation_group(runs, row):
    """The optimizer updates (a step hook) and, on the subclass, the ``optimizer_step`` calls:
    epochs x ceil(batches / accumulation), the short last group of an epoch included."""
    for rank in ranks_of(row):
        _, result = load(group_of(runs, row), row, rank)
        assert result["batches"] == EPOCHS * BATCHES
        assert result["updates"] == row.optimizer_steps
        if row.subclass:
            assert result["calls"] == row.optimizer_steps, "optimizer_step() calls"


TWO_RANKS = [row for row in ROWS if row.ranks2]


@pytest.mark.parametrize("row", TWO_RANKS, ids=ids(TWO_RANKS))
def test_both_ranks_end_identical(runs, row):
    (w0, r0), (w1, r1) = load(group_of(runs, row), row, 0), load(group_of(runs, row), row, 1)
    for key, value in w0["final"].items():
        difference = float((value - w1["final"][key]).abs().max())
        assert torch.equal(value, w1["final"][key]), f"{key}: ranks differ by {difference:.3g}"
    assert r0 == r1


# ---- kill -9 mid-epoch, then resume -------------------------------------------------------------
@pytest.mark.parametrize("row", RESUME_ROWS, ids=ids(RESUME_ROWS))
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_end(runs, row):
    """float32's tolerance for a bf16 row too: both runs use the same kernels on the same
    batches (they agree bit for bit today)."""
    killed, backup_step, resumed = runs["resumed"][row]
    assert killed.returncode == -signal.SIGKILL, killed.failure()
    assert backup_step == RESUMED[row][1]
    weights, result = load(resumed, row)
    want_weights, want = load(group_of(runs, row), row)
    assert_weights_close(weights["final"], want_weights["final"], bf16=False)
    assert result["history"].keys() == want["history"].keys()
    for key, values in want["history"].items():
        assert result["history"][key] == pytest.approx(values, **HISTORY_TOLERANCE[False]), key
    assert result["batches"] == EPOCHS * BATCHES - backup_step  # resumed, not started over


@pytest.mark.parametrize("row", RESUME_ROWS, ids=ids(RESUME_ROWS))
def test_optimizer_steps_of_the_killed_and_the_resumed_run_add_up(runs, row):
    """Killed at the start of a batch, after the backups so far landed: every optimizer step
    the killed run made is in its last backup (a mid-group kill loses micro-batches only), so
    the two processes together step as often as the uninterrupted run."""
    killed, _, resumed = runs["resumed"][row]
    path = killed.out / row.name / "killed.json"
    assert path.exists(), killed.failure()
    before = json.loads(path.read_text())
    _, after = load(resumed, row)
    _, unbroken = load(group_of(runs, row), row)
    for count in ("updates", "calls") if row.subclass else ("updates",):
        got = f"{count}: {before[count]} killed + {after[count]} resumed"
        assert before[count] + after[count] == unbroken[count], f"{got}, {unbroken[count]} unbroken"
        assert unbroken[count] == row.optimizer_steps, f"{count}: {unbroken[count]} unbroken"
