"""Backups that resume on another number of processes (torchrun over gloo on the CPU), and
sharded (DCP) backup folders. Every run is under a timeout, so a hang fails the test."""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import launch_script
from run_to_end import OUTPUTS

import torcheras
from torcheras import callbacks as cb
from torcheras import checkpoint

SCRIPT = Path(__file__).parent / "distributed" / "reshard_script.py"
TIMEOUT = 240
STEPS = 18  # 96 samples, global batch 16, 3 epochs

pytestmark = [
    pytest.mark.skipif(
        not torch.distributed.is_available(), reason="torch.distributed is not available"
    ),
    # one pytest-xdist worker runs the module (`--dist loadgroup`): `jobs` runs once
    pytest.mark.xdist_group("test_resharding"),
]


def run(
    *args: Any, ranks: int = 1, check: bool = True, timeout: float = TIMEOUT, env: Any = None
) -> subprocess.CompletedProcess:
    return launch_script(SCRIPT, *args, ranks=ranks, check=check, timeout=timeout, env=env)


def result(out: Path, rank: int = 0) -> tuple[dict, dict]:
    final = torch.load(out / f"result{rank}" / "final.pt", weights_only=True)
    return final["weights"], json.loads((out / f"result{rank}" / "history.json").read_text())


def chain(*runs: list[str]) -> list[str]:
    """The command line of several runs of the script in one launch (``run_to_end.py``)."""
    return [arg for index, args in enumerate(runs) for arg in (["::"] if index else []) + args]


def _has_strategy() -> bool:
    return "strategy" in inspect.signature(torcheras.Model.compile).parameters


KILL_RENAMING = "sharded-e000000-b000000004"


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every run of the tests below that resume a killed job, in as few launches as their
    order allows (each launch costs seconds of start-up on a small machine, 4 processes
    many): first the kills, each the last run of its launch (a kill ends it), then the
    unbroken reference and every resume alone in one process, the resumes on 4 processes in
    one launch, and the refused resume on 2. The state each kill left is copied to
    ``<job>-killed`` before any resume (a finished resume removes its backups), and the job
    a 4-process resume takes over to ``<job>4``. Returns the folder (``root``), each kill's
    CompletedProcess (``killed``) and the refused resume's (``refused``)."""
    root = tmp_path_factory.mktemp("reshard")
    fsdp = ["--strategy", "fsdp"] if _has_strategy() else None
    killed = {
        "one-file": run(root / "one-file", "--kill-at", "9", ranks=2, check=False),
        "sharded": run(root / "sharded", "--sharded", "--kill-at", "9", ranks=2, check=False),
        # the 2 processes' DataLoader run that nothing interrupts first; each run that
        # returns leaves its stdout in loader-outputs/ (the kill ends the launch's exit code)
        "loader": run(
            *chain(
                [str(root / "loader-unbroken"), "--loader"],
                [str(root / "loader"), "--loader", "--kill-at", "9"],
            ),
            ranks=2,
            check=False,
            env={OUTPUTS: str(root / "loader-outputs")},
        ),
        "renaming": run(
            root / "renaming", "--sharded", "--kill-renaming", KILL_RENAMING, check=False
        ),
        "dropout": run(root / "dropout", "--dropout", "--kill-at", "5", check=False),
    }
    if fsdp:
        killed["fsdp"] = run(root / "fsdp", *fsdp, "--kill-at", "9", ranks=2, check=False)
    for job in killed:
        shutil.copytree(root / job, root / f"{job}-killed")
    for job in ("sharded", "fsdp") if fsdp else ("sharded",):
        shutil.copytree(root / job, root / f"{job}4")
    alone = [
        [str(root / "unbroken")],  # one process, never interrupted: what most resumes match
        [str(root / "one-file")],
        [str(root / "sharded"), "--sharded"],
        [str(root / "loader"), "--loader"],
        [str(root / "renaming"), "--sharded"],
    ]
    if fsdp:
        alone.append([str(root / "fsdp")])  # a plain model: no strategy
    run(*chain(*alone), timeout=2 * TIMEOUT)
    four = [[str(root / "sharded4"), "--sharded"]] + (
        [[str(root / "fsdp4"), *fsdp]] if fsdp else []
    )
    run(*chain(*four), ranks=4, timeout=2 * TIMEOUT)
    refused = run(root / "dropout", "--dropout", ranks=2, check=False)
    return {"root": root, "killed": killed, "refused": refused}


def assert_same_run(job: Path, reference: Path, resumed_at: int) -> None:
    """Weights within float32 tolerance (the ranks sum a batch's parts in another order),
    History equal to 1e-6, and only the steps after the backup trained: none skipped or
    repeated."""
    weights, hist = result(job)
    want, expected = result(reference)
    assert weights.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(weights[key], want[key], rtol=1e-5, atol=1e-6)
    for key, values in expected["history"].items():
        assert hist["history"][key] == pytest.approx(values, rel=1e-6, abs=1e-7), key
    assert hist["trained"] == list(range(resumed_at + 1, STEPS + 1))
    assert not (job / "backup").exists()  # the finished run removed its backups


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
def test_a_backup_taken_on_2_processes_resumes_on_1_and_on_4_exactly(jobs, sharded):
    """kill -9 of the whole 2-process job mid-epoch (step 9 of 18, the backup at step 8, in
    epoch 1), then the rerun on 1 and on 4 processes: the global batch of 16 kept (16 or 4
    per process), the same samples in every remaining batch (weights and History equal an
    unbroken run's), the running metrics of the cut epoch carried over."""
    root, name = jobs["root"], "sharded" if sharded else "one-file"
    killed = jobs["killed"][name]
    assert killed.returncode != 0 and not (root / f"{name}-killed" / "result0").exists()
    backup = root / f"{name}-killed" / "backup"
    if sharded:
        (folder,) = checkpoint.sharded_folders(backup)
        assert folder.name == "sharded-e000001-b000000002"  # epoch 1, 2 batches in
        assert sorted(p.name for p in folder.iterdir()) == [
            ".metadata", "__0_0.distcp", "__1_0.distcp", "torcheras.pt"
        ]  # fmt: skip
        meta = checkpoint.load(folder / "torcheras.pt")
        assert "model" not in meta and len(meta["ranks"]) == 2  # the tensors are DCP's
    else:
        meta = checkpoint.load(backup / "latest.pt")
    assert (meta["global_step"], meta["world_size"]) == (8, 2)
    assert_same_run(root / name, root / "unbroken", resumed_at=8)  # alone
    if sharded:  # 4 processes are slow on a small CI machine: once is enough
        assert_same_run(root / "sharded4", root / "unbroken", resumed_at=8)
        _, rank3 = result(root / "sharded4", 3)
        assert rank3["history"] == result(root / "sharded4", 0)[1]["history"]


def test_a_dataloader_backup_taken_on_2_processes_resumes_alone_on_the_same_samples(jobs):
    """Under torchrun a DataLoader is read through a DistributedSampler (8 of the global 16 per
    process); resumed alone it goes on with one over 1 process, seeded alike: every batch
    left loads the samples the 2 processes would have loaded, and the weights match theirs."""
    root = jobs["root"]
    for rank in (0, 1):  # the unbroken run returned on both (its launch ended in the kill)
        assert (root / "loader-outputs" / f"run0.rank{rank}.txt").exists()
    assert jobs["killed"]["loader"].returncode != 0
    weights, hist = result(root / "loader")
    want, expected = result(root / "loader-unbroken")
    for key in want:
        torch.testing.assert_close(weights[key], want[key], rtol=1e-5, atol=1e-6)
    for key, values in expected["history"].items():
        assert hist["history"][key] == pytest.approx(values, rel=1e-6, abs=1e-7), key
    assert hist["trained"] == list(range(9, STEPS + 1))
    both = [result(root / "loader-unbroken", rank)[1]["seen"] for rank in (0, 1)]
    for step in map(str, range(9, STEPS)):  # (step 8's loads include the replayed pass)
        assert sorted(hist["seen"][step]) == sorted(both[0][step] + both[1][step]), step


def test_resuming_on_another_number_of_processes_is_refused_when_training_draws_randomly(jobs):
    """Dropout draws from each process's own random stream: 2 processes cannot draw what 1
    did, so its backup is refused there, saying why and how to resume."""
    two = jobs["refused"]  # on 2 processes, after the one process's run killed at step 5
    assert two.returncode != 0
    assert "written by a run of 1 process(es); this run has 2" in two.stderr
    assert "training drew random numbers" in two.stderr
    assert "--nproc_per_node=1" in two.stderr


@pytest.mark.skipif(not _has_strategy(), reason="compile(strategy='fsdp') is not there yet")
def test_an_fsdp_backup_taken_on_2_processes_resumes_on_1_and_on_4(jobs):
    """Under FSDP the backup is sharded by default (each rank writes its own shard); DCP
    reshards it for 1 process (a plain model) and for 4."""
    root = jobs["root"]
    assert jobs["killed"]["fsdp"].returncode != 0
    (folder,) = checkpoint.sharded_folders(root / "fsdp-killed" / "backup")
    assert {"__0_0.distcp", "__1_0.distcp"} <= {p.name for p in folder.iterdir()}
    assert_same_run(root / "fsdp", root / "unbroken", resumed_at=8)
    assert_same_run(root / "fsdp4", root / "unbroken", resumed_at=8)


def test_a_kill_before_a_sharded_folder_is_named_leaves_the_previous_backup_whole(jobs):
    """kill -9 once the backup at step 4 is written but not yet renamed: the folder of step 2
    is whole under its name, the new one only under a temp name; the rerun resumes from step
    2, exactly, and sweeps the leftover."""
    root = jobs["root"]
    assert jobs["killed"]["renaming"].returncode != 0
    backup = root / "renaming-killed" / "backup"
    (folder,) = checkpoint.sharded_folders(backup)
    assert folder.name == "sharded-e000000-b000000002"
    (temp,) = backup.glob(f"{checkpoint.TEMP_PREFIX}{KILL_RENAMING}.*")
    assert {"__0_0.distcp", ".metadata", "torcheras.pt"} <= {p.name for p in temp.iterdir()}
    assert_same_run(root / "renaming", root / "unbroken", resumed_at=2)


def test_a_sharded_backup_in_one_process_resumes_exactly_and_keeps_only_the_newest(tmp_path):
    def fit(*extra: cb.Callback, double: bool = False) -> torcheras.Model:
        torch.manual_seed(0)
        model = torcheras.Model(torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Linear(8, 1)))
        model.compile("adam", "mse", device="cpu")
        backup = cb.BackupAndRestore(
            tmp_path / "backup", save_freq=2, sharded=True, double_checkpoint=double
        )
        model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[backup, *extra])
        return model

    class Crash(cb.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if self.model.loop.global_step == 7:
                raise RuntimeError("crash")

    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 5, generator=generator), torch.randn(64, 1, generator=generator)
    reference = fit()
    with pytest.raises(RuntimeError, match="crash"):
        fit(Crash(), double=True)
    kept = [p.name for p in checkpoint.sharded_folders(tmp_path / "backup")]
    assert kept == ["sharded-e000001-b000000002", "sharded-e000000-b000000004"]  # steps 6, 4
    resumed = fit()
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert not (tmp_path / "backup").exists()


def test_sharded_backups_refuse_a_url_and_a_value_that_is_not_a_bool():
    with pytest.raises(ValueError, match="sharded .DCP. checkpoints are written to a local"):
        cb.BackupAndRestore("s3://bucket/run/backup", sharded=True)
    with pytest.raises(ValueError, match="Received: sharded='yes'"):
        cb.BackupAndRestore("backup", sharded="yes")  # type: ignore[arg-type]


CONSOLIDATE_SCRIPT = """
import os, sys
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[2])
import torcheras
from torcheras import checkpoint, state
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard

out = sys.argv[1]
dist.init_process_group("gloo")
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
fully_shard(net[0]); fully_shard(net[2]); fully_shard(net)  # FSDP2: parameters are DTensors
model = torcheras.Model(net)
model.compile("adam", "sparse_categorical_crossentropy", device="cpu")
torch.manual_seed(1 + dist.get_rank())
x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
torch.nn.functional.cross_entropy(model(x), y).backward()
model.optimizer.step()
assert state.is_sharded(model)
model.save(os.path.join(out, "model.pt"))
model.save_weights(os.path.join(out, "weights.pt"))
state.save_model(model, os.path.join(out, "best.safetensors"), weights_only=True, background=True)
checkpoint.wait_for_writes()
full = StateDictOptions(full_state_dict=True, cpu_offload=True)
expected = {"weights": get_model_state_dict(net, options=full),
            "optimizer": get_optimizer_state_dict(model, model.optimizer, options=full)}
if dist.get_rank() == 0:
    torch.save(expected, os.path.join(out, "expected.pt"))
dist.destroy_process_group()
"""


def test_a_sharded_model_saves_one_consolidated_file_that_one_process_loads(tmp_path):
    """model.save, save_weights and ModelCheckpoint's weights-only save under FSDP2 (applied
    by hand here) gather the whole state onto rank 0: plain torch and a plain Model load it
    on one process, equal to the state FSDP's own full_state_dict gives."""
    script = tmp_path / "consolidate.py"
    script.write_text(CONSOLIDATE_SCRIPT)
    src = str(Path(__file__).parents[1] / "src")
    launch_script(script, tmp_path, src, ranks=2, timeout=TIMEOUT)
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    net.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))  # plain torch
    for key, value in expected["weights"].items():
        assert torch.equal(net.state_dict()[key], value), key
    from safetensors.torch import load_file

    assert load_file(tmp_path / "best.safetensors").keys() == expected["weights"].keys()
    model = torcheras.Model(torch.nn.Sequential(*(type(m)(*_shape(m)) for m in net)))
    model.compile("adam", "sparse_categorical_crossentropy", device="cpu")
    model.load(tmp_path / "model.pt")  # weights and Adam's moments, on one process
    for key, value in expected["weights"].items():
        assert torch.equal(model.module.state_dict()[key], value), key
    moments = model.optimizer.state_dict()["state"]
    saved = expected["optimizer"]["state"]
    for index, name in enumerate(n for n, _ in model.named_parameters()):
        assert torch.equal(moments[index]["exp_avg"], saved[name]["exp_avg"]), name
        assert torch.equal(moments[index]["exp_avg_sq"], saved[name]["exp_avg_sq"]), name


def _shape(module: torch.nn.Module) -> tuple[int, ...]:
    return (module.in_features, module.out_features) if isinstance(module, torch.nn.Linear) else ()


def test_a_sharded_backup_of_another_model_is_refused_naming_the_folder(tmp_path):
    class Crash(cb.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if self.model.loop.global_step == 3:
                raise RuntimeError("crash")

    def fit(width: int, optimizer: str, *extra: cb.Callback) -> None:
        net = torch.nn.Sequential(torch.nn.Linear(5, width), torch.nn.Linear(width, 1))
        model = torcheras.Model(net)
        model.compile(optimizer, "mse", device="cpu")
        backup = cb.BackupAndRestore(tmp_path / "backup", save_freq=2, sharded=True)
        x, y = torch.randn(64, 5), torch.randn(64, 1)
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[backup, *extra])

    with pytest.raises(RuntimeError, match="crash"):
        fit(8, "adam", Crash())
    with pytest.raises(checkpoint.CheckpointError, match=r"(?i)size mismatch.*move or delete"):
        fit(9, "adam")
    with pytest.raises(checkpoint.CheckpointError, match="is a KerasAdam, this model's KerasSGD"):
        fit(8, "sgd")


def test_model_checkpoint_sharded_writes_a_folder_that_model_load_reads(tmp_path):
    """ModelCheckpoint(sharded=True): a DCP folder at the filepath, replaced whole at each
    save; model.load(folder) gives back the weights and Adam's state of the last save."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randn(64, 1)

    def model() -> torcheras.Model:
        net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        built = torcheras.Model(net)
        built.compile("adam", "mse", device="cpu")
        return built

    trained = model()
    ckpt = cb.ModelCheckpoint(tmp_path / "ckpt" / "last", sharded=True)
    trained.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[ckpt])
    folder = tmp_path / "ckpt" / "last"
    assert {".metadata", "__0_0.distcp", "torcheras.pt"} <= {p.name for p in folder.iterdir()}
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["last"]  # no temp left
    assert checkpoint.load(folder / "torcheras.pt")["epoch"] == 1  # the second save's
    loaded = model()
    loaded.load(folder)
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    want, got = trained.optimizer.state_dict()["state"], loaded.optimizer.state_dict()["state"]
    for index in want:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(got[index][name], want[index][name]), (index, name)
    with pytest.raises(ValueError, match="Pass one of them"):
        cb.ModelCheckpoint("x", sharded=True, save_weights_only=True)


def test_a_one_process_backup_gives_its_running_sums_to_process_0_only_on_2(tmp_path):
    """Resharding 1 -> 2 in the middle of an epoch: process 0 continues the epoch's sums, the
    other starts from zero, so that the epoch's all-reduce counts every batch once; both
    take the one RNG state (it drew only the orders, which process 0 draws for both)."""
    from torcheras import state

    class Crash(cb.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if self.model.loop.global_step == 3:
                raise RuntimeError("crash")

    model = torcheras.Model(torch.nn.Linear(5, 1))
    model.compile("sgd", "mse", metrics=["mae"], device="cpu")
    backup = cb.BackupAndRestore(tmp_path, save_freq=2)
    with pytest.raises(RuntimeError):
        model.fit(
            torch.randn(64, 5), torch.randn(64, 1), batch_size=16, callbacks=[backup, Crash()]
        )
    saved = checkpoint.load(tmp_path / "latest.pt")
    assert (saved["batch"], saved["rng_drawn"]) == (2, False)
    moved = state.reshard_position(saved, 2, "latest.pt", tmp_path)
    assert moved["world_size"] == 2 and moved["resharded_from"] == 1
    zero, one = moved["ranks"]
    assert torch.equal(
        zero["collector"]["means"]["totals"]["loss"], saved["collector"]["means"]["totals"]["loss"]
    )
    assert (
        zero["collector"]["means"]["weights"]
        == saved["collector"]["means"]["weights"]
        == {"loss": 32.0}
    )
    assert one["collector"]["means"]["weights"] == {"loss": 0.0}
    assert torch.equal(one["collector"]["means"]["totals"]["loss"], torch.tensor(0.0))
    assert torch.equal(one["rng"]["torch"], saved["rng"]["torch"])
