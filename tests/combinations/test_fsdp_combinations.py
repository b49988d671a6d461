"""Issue 23's pieces where they meet: FSDP with the weight average, EarlyStopping's and
ModelCheckpoint's best weights and sharded backups resumed on another number of processes,
export of a sharded model, and a DDP backup with mid-epoch validations resumed alone.

Two launches serve every test: tests/distributed/combo_script.py under torchrun with 2
processes (each case unbroken, and cut at step 7 after its backup at step 6, mid-epoch), then
alone (each case unbroken, and resumed from the 2 processes' backup).

Tolerances (float32): a resumed run against the unbroken runs, rtol 1e-5 / atol 1e-6 for
weights (2 processes sum a batch in two halves), History to 1e-6.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import launch_script

SCRIPT = Path(__file__).parents[1] / "distributed" / "combo_script.py"

pytestmark = [
    pytest.mark.skipif(
        not torch.distributed.is_available(), reason="torch.distributed is not available"
    ),
    # one pytest-xdist worker runs the module (`--dist loadgroup`): `out` launches once
    pytest.mark.xdist_group("test_fsdp_combinations"),
]


def launch(out: Path, ranks: int) -> None:
    launch_script(SCRIPT, out, ranks=ranks, timeout=240)


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("combos")
    launch(folder, ranks=2)
    return folder


@pytest.fixture(scope="module")
def resumed(out: Path) -> Path:
    """The 2 processes' backups, then the runs alone (which resume them)."""
    for case in ("ema", "best"):  # the backups as the 2 processes left them
        (folder,) = (out / case / "backup").iterdir()
        meta = torch.load(folder / "torcheras.pt", weights_only=True)
        (out / case / "meta.pt").write_bytes((folder / "torcheras.pt").read_bytes())
        assert meta["global_step"] == 6 and meta["world_size"] == 2
    launch(out, ranks=1)
    return out


def result(out: Path, case: str, run: str) -> dict:
    return torch.load(out / case / f"{run}-0.pt", weights_only=False)


def assert_same(got: dict, want: dict) -> None:
    assert got["weights"].keys() == want["weights"].keys()
    for key, expected in want["weights"].items():
        torch.testing.assert_close(got["weights"][key], expected, rtol=1e-5, atol=1e-6)
    assert got["history"].keys() == want["history"].keys()
    for key, values in want["history"].items():
        assert got["history"][key] == pytest.approx(values, rel=1e-6, abs=1e-6), key


@pytest.mark.parametrize("case", ["ema", "best", "interval"])
def test_a_2_process_backup_resumes_alone_as_the_unbroken_runs_end(resumed, case):
    """kill at step 7 on 2 processes, resumed on 1: the weights (the average the weight
    average leaves; the best epoch's that EarlyStopping restores) and History of an unbroken
    run on 2 processes and on 1."""
    two, one = result(resumed, case, "unbroken2"), result(resumed, case, "unbroken1")
    again = result(resumed, case, "resumed1")
    assert_same(again, two)
    assert_same(again, one)
    torch.testing.assert_close(again["predict"], two["predict"], rtol=1e-5, atol=1e-6)


def test_the_backup_of_a_sharded_average_holds_the_whole_average(resumed):
    """torcheras.pt of a sharded backup reads with weights_only=True and holds whole tensors
    (not process 0's shard), with no DTensor in it: it loads on any number of processes."""
    meta = torch.load(resumed / "ema" / "meta.pt", weights_only=True)
    shapes = [tuple(t.shape) for t in meta["ema"]["average"]]
    assert shapes == [(16, 6), (16,), (3, 16), (3,)]
    assert all(type(t) is torch.Tensor for t in meta["ema"]["average"])


def test_early_stopping_best_weights_in_a_sharded_backup_are_whole(resumed):
    meta = torch.load(resumed / "best" / "meta.pt", weights_only=True)
    (state,) = [v for k, v in meta["callbacks"].items() if "EarlyStopping" in k]
    best = state["best_weights"]
    assert {k: tuple(v.shape) for k, v in best.items()} == {
        "module.0.weight": (16, 6), "module.0.bias": (16,),
        "module.2.weight": (3, 16), "module.2.bias": (3,),
    }  # fmt: skip
    assert all(type(t) is torch.Tensor for t in best.values())


def test_model_save_of_a_sharded_average_loads_in_one_process(resumed):
    """model.save on 2 FSDP processes writes the whole average; a one-process Model loads it
    and holds the 2 processes' average."""
    import torcheras

    two = result(resumed, "ema", "unbroken2")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    model = torcheras.Model(net)
    model.load(resumed / "ema" / "saved-unbroken2.pt")
    assert model.ema is not None
    for mine, want in zip(model.ema.average, two["ema"]):
        torch.testing.assert_close(mine, want, rtol=0, atol=0)
    saved = torch.load(resumed / "ema" / "saved-unbroken2.pt", weights_only=True)
    for key, value in two["weights"].items():  # the fit's end: the weights are the average
        torch.testing.assert_close(saved["model"][f"module.{key}"], value, rtol=0, atol=0)


def test_the_best_checkpoint_of_a_sharded_model_is_what_early_stopping_restores(resumed):
    """ModelCheckpoint(save_best_only, save_weights_only) under FSDP: one consolidated file
    that plain torch loads, equal to the weights EarlyStopping(restore_best_weights) left."""
    for run, name in (("unbroken2", "unbroken2"), ("resumed1", "job")):  # job: cut, resumed
        saved = torch.load(resumed / "best" / f"best-{name}.pt", weights_only=True)
        weights = saved["model"]  # beside the epoch and logs of the best epoch
        history = result(resumed, "best", run)["history"]  # val_loss at its highest (mode="max")
        assert saved["logs"]["val_loss"] == pytest.approx(max(history["val_loss"]), abs=1e-7)
        net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        net.load_state_dict(weights)
        for key, value in result(resumed, "best", run)["weights"].items():
            torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6)


def test_export_of_a_sharded_model_is_refused_saying_how(out):
    error = result(out, "ema", "unbroken2")["export_error"]
    assert "sharded" in error and "save_weights" in error
    assert not (out / "ema" / "model.pt2").exists()
