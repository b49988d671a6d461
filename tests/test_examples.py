"""The examples run as a user would run them."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import launch_script

# One pytest-xdist worker runs the module (`--dist loadgroup`): its long runs start early
pytestmark = pytest.mark.xdist_group("test_examples")

EXAMPLES = Path(__file__).parent.parent / "examples"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def test_custom_callbacks_example(tmp_path):
    result = _run(str(EXAMPLES / "custom_callbacks.py"), str(tmp_path), "--smoke")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("largest gradient norm") == 3  # custom logging, each epoch
    assert len(list((tmp_path / "predictions").glob("epoch*.pt"))) == 3  # saved predictions
    with open(tmp_path / "misclassified.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["target"] != r["prediction"] for r in rows)
    assert "stopped: all epochs ran" in result.stdout


def test_hand_written_loop_example():
    result = _run(str(EXAMPLES / "hand_written_loop.py"), "--smoke")
    assert result.returncode == 0, result.stderr
    assert "trained" in result.stdout


def test_image_classification_example_keeps_its_promises(tmp_path):
    result = _run(str(EXAMPLES / "image_classification.py"), str(tmp_path), "--smoke")
    assert result.returncode == 0, result.stderr
    accuracy = float(re.search(r"test accuracy: ([\d.]+)", result.stdout).group(1))
    assert accuracy > 0.8
    assert (tmp_path / "best.pt").exists() and (tmp_path / "report.html").exists()
    assert list((tmp_path / "tensorboard" / "train").glob("events.out.tfevents.*"))
    with open(tmp_path / "log.csv") as f:
        assert len(list(csv.DictReader(f))) == 4  # one row per epoch
    from PIL import Image

    assert Image.open(tmp_path / "curves.png").format == "PNG"


def test_text_classification_example_learns_with_a_per_batch_schedule(tmp_path):
    result = _run(str(EXAMPLES / "text_classification.py"), str(tmp_path), "--smoke")
    assert result.returncode == 0, result.stderr
    accuracy = float(re.search(r"validation accuracy: ([\d.]+)", result.stdout).group(1))
    assert accuracy > 0.65  # the majority class is about 0.57
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    rates = [float(r["learning_rate"]) for r in rows]
    assert len(rows) == 3 and rates[0] > rates[1] > rates[2]  # cosine after the warm-up
    assert list((tmp_path / "tensorboard" / "train").glob("events.out.tfevents.*"))


def test_functional_and_subclass_example():
    result = _run(str(EXAMPLES / "functional_and_subclass.py"), "--smoke")
    assert result.returncode == 0, result.stderr
    for style in ("functional", "subclassed"):
        accuracy = float(re.search(rf"{style}: val_accuracy ([\d.]+)", result.stdout).group(1))
        assert accuracy > 0.6


def test_resume_example_crashes_saying_so_then_resumes(tmp_path):
    first = _run(str(EXAMPLES / "resume_after_a_crash.py"), str(tmp_path))
    assert first.returncode == 1 and (tmp_path / "backup" / "latest.pt").exists()
    assert "Simulated crash at training step 25" in first.stderr
    assert "Run the same command again" in first.stderr
    second = _run(str(EXAMPLES / "resume_after_a_crash.py"), str(tmp_path))
    assert second.returncode == 0, second.stderr
    assert "epochs: [0, 1, 2, 3]" in second.stdout
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 5


def test_resume_example_smoke_runs_the_crash_and_the_exact_resume(tmp_path):
    result = _run(str(EXAMPLES / "resume_after_a_crash.py"), str(tmp_path), "--smoke")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "first run: crashed as planned" in result.stdout
    assert "resumed weights identical to the uninterrupted run's: True" in result.stdout
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 5


def test_ddp_example_runs_alone_and_under_torchrun(tmp_path):
    import os

    env = {**os.environ, "EXAMPLE_OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    script = str(EXAMPLES / "ddp_train.py")
    alone = subprocess.run(
        [sys.executable, script, "--smoke"], capture_output=True, text=True, timeout=120, env=env
    )
    assert alone.returncode == 0, alone.stderr
    out = {"EXAMPLE_OUT": str(tmp_path)}
    both = launch_script(script, "--smoke", ranks=2, timeout=180, env=out)
    ranks = re.findall(r"rank (\d): (trained \d+ epochs, val_accuracy [\d.]+)", both.stdout)
    assert sorted(r for r, _ in ranks) == ["0", "1"]
    assert ranks[0][1] == ranks[1][1]  # both ranks end with the same result
    assert (tmp_path / "log.csv").exists() and (tmp_path / "best.pt").exists()


def test_gan_example_saves_a_grid_every_epoch(tmp_path):
    from PIL import Image

    result = _run(str(EXAMPLES / "gan.py"), str(tmp_path), "--smoke")
    assert result.returncode == 0, result.stderr
    pngs = sorted((tmp_path / "images").glob("*.png"))
    assert [p.name for p in pngs] == [f"samples_epoch00{i}.png" for i in (1, 2, 3)]
    for png in pngs:
        assert Image.open(png).size == (8 * (4 * 8 + 2 * 4) + 2 * 4, 4 * (4 * 8 + 2 * 4) + 2 * 4)
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 4


def test_sklearn_grid_search_example_tunes_a_pipeline_in_two_processes():
    result = _run(str(EXAMPLES / "sklearn_grid_search.py"), "--smoke")
    assert result.returncode == 0, result.stderr
    best = re.search(r"best parameters: (\{.*\})", result.stdout).group(1)
    assert "'net__model__hidden': 64" in best or "'net__model__hidden': 16" in best
    assert float(re.search(r"test accuracy: ([\d.]+)", result.stdout).group(1)) > 0.8
    scores = re.search(r"cross_val_score of the best pipeline: (.*)", result.stdout).group(1)
    assert len(scores.split(", ")) == 2


def test_optuna_search_example_keeps_its_study_and_prunes(tmp_path):
    import optuna

    result = _run(str(EXAMPLES / "optuna_search.py"), str(tmp_path), "--smoke")
    assert result.returncode == 0, result.stderr
    assert "trials: 5 (" in result.stdout
    study = optuna.load_study(study_name="digits-mlp", storage=f"sqlite:///{tmp_path}/study.db")
    states = [t.state for t in study.trials]
    assert len(states) == 5 and optuna.trial.TrialState.PRUNED in states  # seeded sampler
    assert f"best val_loss: {study.best_value:.4f}" in result.stdout
    assert study.best_value < 1.5  # ten classes: chance is ln(10) = 2.30


def test_fsdp_example_runs_alone_and_sharded_under_torchrun(tmp_path):

    alone = _run(str(EXAMPLES / "fsdp_train.py"), "--smoke")
    assert alone.returncode == 0, alone.stderr
    assert "rank 0: holds 18,178 of 18,178 parameters; trained 2 epochs" in alone.stdout
    sharded = launch_script(EXAMPLES / "fsdp_train.py", "--smoke", ranks=2, timeout=180,
                            env={"EXAMPLE_OUT": str(tmp_path)})  # fmt: skip
    for rank in (0, 1):  # each rank holds half of every parameter
        assert f"rank {rank}: holds 9,089 of 18,178 parameters" in sharded.stdout
    assert sharded.stdout.count("Total params: 18,178") == 1  # printed by rank 0
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 3  # header + 2 epochs, once
