"""The examples run as a user would run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def test_custom_callback_example():
    result = _run(str(EXAMPLES / "custom_callback.py"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("largest gradient norm") == 3


def test_hand_written_loop_example():
    result = _run(str(EXAMPLES / "hand_written_loop.py"))
    assert result.returncode == 0, result.stderr
    assert "early stopping" in result.stdout and "trained" in result.stdout


def test_resume_example_crashes_then_resumes(tmp_path):
    first = _run(str(EXAMPLES / "resume_after_a_crash.py"), str(tmp_path))
    assert first.returncode == 1 and (tmp_path / "backup" / "latest.pt").exists()
    second = _run(str(EXAMPLES / "resume_after_a_crash.py"), str(tmp_path))
    assert second.returncode == 0, second.stderr
    assert "epochs: [0, 1, 2, 3]" in second.stdout
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 5


def test_ddp_example_runs_alone_and_under_torchrun(tmp_path):
    import os

    env = {**os.environ, "EXAMPLE_OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    script = str(EXAMPLES / "ddp_train.py")
    alone = subprocess.run(
        [sys.executable, script], capture_output=True, text=True, timeout=120, env=env
    )
    assert alone.returncode == 0, alone.stderr
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    both = subprocess.run([*launcher, script], capture_output=True, text=True, timeout=180, env=env)
    assert both.returncode == 0, both.stderr[-3000:]
    import re

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
