"""torchrun with 2 CPU processes over gloo: ranks agree, match one process, rank 0 writes.

The runs that end normally share one 2-process launch (``chained``: each launch costs
seconds of start-up on a small machine); each test reads its own case's folder. Each run is
under a timeout, so a hang fails the test instead of the CI."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import launch_script
from run_to_end import OUTPUTS

SCRIPT = Path(__file__).parent / "distributed" / "ddp_script.py"
TIMEOUT = 180

pytestmark = [
    pytest.mark.skipif(
        not torch.distributed.is_available(), reason="torch.distributed is not available"
    ),
    # one pytest-xdist worker runs the module (`--dist loadgroup`): `chained` runs once
    pytest.mark.xdist_group("test_distributed"),
]


def run(
    out: Path, *args: str, ranks: int = 2, check: bool = True, script: Path = SCRIPT
) -> subprocess.CompletedProcess[str]:
    return launch_script(script, out, *args, ranks=ranks, check=check, timeout=TIMEOUT)


def result(out: Path, rank: int) -> tuple[dict, dict]:
    final = torch.load(out / f"result{rank}" / "final.pt", weights_only=True)
    return final, json.loads((out / f"result{rank}" / "history.json").read_text())


SAME_AS_ONE_PROCESS = {
    "arrays": [],
    # 256 samples in batches of 85: shards of 42 and 43, and a last batch of 1 sample that
    # leaves rank 0 an empty part; torchmetrics syncs itself, and is read per batch on rank 0
    "uneven-shards-torchmetrics": ["--batch-size", "85", "--torchmetrics"],
    "dataloader": ["--loader", "--no-shuffle"],
    # precision, AUC, F1 and IoU: counts summed over the ranks (with an empty part, as above)
    "keras-metrics": ["--batch-size", "85", "--keras-metrics"],
    # 8 batches of unknown number in groups of 3: 3, 3, and 2 cut short by the epoch's end
    "accumulation": ["--accumulate", "3", "--iterable"],
}


# The runs of the shared launch (`chained`): SAME_AS_ONE_PROCESS's, then one a test below.
CHAINED = {
    **SAME_AS_ONE_PROCESS,  # "arrays" is also the default run: ddp_script.py's defaults
    "loader": ["--loader"],
    "early_stop": ["--case", "early_stop"],
    "nan": ["--case", "nan"],
    "validation_interval": ["--case", "early_stop", "--validation-interval", "5"],
    "unbroken": ["--case", "backup"],
}


def _runs(out: Path, cases: dict[str, list[str]]) -> list[str]:
    """The command line of every case, ``::`` between them: one launch runs them all."""
    runs: list[str] = []
    for case, args in cases.items():
        runs += [*(["::"] if runs else []), str(out / case), *args]
    return runs


@pytest.fixture(scope="module")
def chained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every case of CHAINED, one after the other in one 2-process launch (each fit joins the
    same process group, as a script that trains several models would), each into its own
    folder; each run's standard output goes to stdout/ too (``stdout_of``)."""
    out = tmp_path_factory.mktemp("ddp")
    env = {OUTPUTS: str(out / "stdout")}
    launch_script(SCRIPT, *_runs(out, CHAINED), ranks=2, timeout=2 * TIMEOUT, env=env)
    return out


def stdout_of(chained: Path, case: str) -> str:
    """What the run of ``case`` printed, on both ranks (as its own launch's stdout would be)."""
    index = list(CHAINED).index(case)
    return "".join((chained / "stdout" / f"run{index}.rank{r}.txt").read_text() for r in (0, 1))


def test_two_ranks_end_identical_and_equal_one_process_with_the_same_global_batch(
    tmp_path, chained
):
    """Every case of SAME_AS_ONE_PROCESS, one after the other in one 2-process launch (and in
    one single-process launch): each fit joins the same process group, as a script that
    trains several models would."""
    launch_script(SCRIPT, *_runs(tmp_path / "single", SAME_AS_ONE_PROCESS), timeout=TIMEOUT)
    for case in SAME_AS_ONE_PROCESS:
        (a, ha), (b, hb) = result(chained / case, 0), result(chained / case, 1)
        single, hs = result(tmp_path / "single" / case, 0)
        for key in a["weights"]:
            assert torch.equal(a["weights"][key], b["weights"][key]), (case, key)
            torch.testing.assert_close(
                a["weights"][key], single["weights"][key], rtol=1e-4, atol=1e-5,
                msg=lambda m, case=case, key=key: f"{case}, {key}: {m}",
            )  # fmt: skip
        ha.pop("seen"), hb.pop("seen")  # the samples each rank loaded differ (a sampler)
        assert ha == hb, case  # the logs every callback saw were the same on both ranks
        for key, values in hs["history"].items():
            assert ha["history"][key] == pytest.approx(values, rel=1e-4, abs=1e-5), (case, key)
        assert ha["evaluate"] == pytest.approx(hs["evaluate"], rel=1e-4), case
        torch.testing.assert_close(a["predict"], single["predict"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b["predict"], a["predict"])  # in input order on every rank
        if case == "accumulation":  # DDP all-reduced once per full group (no_sync before)
            assert ha["reductions"] == hb["reductions"] == 2 * 6


def test_a_dataloader_is_split_by_a_distributed_sampler_reshuffled_each_epoch(chained):
    (_, ha), (_, hb) = result(chained / "loader", 0), result(chained / "loader", 1)
    orders = []
    for epoch in map(str, range(6)):
        mine, theirs = ha["seen"][epoch], hb["seen"][epoch]
        assert len(mine) == len(theirs) == 128  # each rank loads half, not everything
        assert sorted(mine + theirs) == list(range(256))  # together: every sample once
        orders.append(mine)
    assert len({tuple(order) for order in orders}) == 6  # set_epoch: a new shuffle each epoch
    assert ha["history"] == hb["history"]


def test_only_rank_zero_writes_files(chained):
    out = chained / "arrays"  # ddp_script.py's defaults
    assert (out / "rank0" / "best.pt").exists()
    assert not (out / "rank1").exists()
    with open(out / "log.csv") as f:
        assert len(f.read().splitlines()) == 7  # header + 6 epochs, written once


def test_early_stopping_on_data_that_differs_by_rank_stops_both_at_the_same_epoch(chained):
    (_, ha), (_, hb) = result(chained / "early_stop", 0), result(chained / "early_stop", 1)
    assert ha["epoch"] == hb["epoch"]
    assert ha["history"]["val_loss"] == hb["history"]["val_loss"]  # global, not per rank


def test_a_nan_on_one_rank_stops_both(chained):
    (_, ha), (_, hb) = result(chained / "nan", 0), result(chained / "nan", 1)
    assert ha["epoch"] == hb["epoch"] == [0]
    assert "Invalid loss, terminating training" in stdout_of(chained, "nan")


def test_a_rank_killed_fails_the_job_with_an_error_instead_of_a_hang(tmp_path):
    start = time.monotonic()
    done = run(tmp_path, "--case", "kill", check=False)  # run() itself times out on a hang
    assert done.returncode != 0
    assert "exitcode" in done.stderr and "-9" in done.stderr  # torchrun names the dead rank
    assert time.monotonic() - start < TIMEOUT
    assert not (tmp_path / "result0").exists()  # rank 0 did not finish as if nothing happened


@pytest.fixture
def unbroken(chained: Path) -> Path:
    """A 2-process run with BackupAndRestore that nothing interrupts: what a resume must match."""
    return chained / "unbroken"


def test_kill_9_of_the_whole_job_and_a_rerun_resume_exactly(tmp_path, unbroken):
    reference = unbroken
    killed = run(tmp_path / "job", "--case", "backup", "--kill-at", "10", check=False)
    assert killed.returncode != 0
    assert not (tmp_path / "job" / "result0").exists()
    from torcheras import checkpoint

    backup = checkpoint.load(tmp_path / "job" / "backup" / "latest.pt")
    assert backup["global_step"] == 9 and backup["world_size"] == 2  # the last one, at step 9
    assert len(backup["ranks"]) == 2  # every rank's RNG and running sums
    run(tmp_path / "job", "--case", "backup")  # resumes
    for rank in (0, 1):
        got, hist = result(tmp_path / "job", rank)
        want, expected = result(reference, rank)
        for key in want["weights"]:
            assert torch.equal(got["weights"][key], want["weights"][key]), (rank, key)
        assert hist["history"] == expected["history"] and hist["epoch"] == expected["epoch"]
        assert (expected["trained"], hist["trained"]) == (48, 48 - 9)  # resumed, not restarted


def test_sigterm_on_one_rank_backs_up_and_stops_every_rank_at_the_same_batch(tmp_path, unbroken):
    reference = unbroken
    start = time.monotonic()
    stopped = run(tmp_path / "job", "--case", "sigterm", check=False)
    assert time.monotonic() - start < 60  # no rank left waiting in a collective
    assert stopped.returncode != 0
    assert "exitcode  : 143" in stopped.stderr  # Preempted (torchrun may end the other rank)
    assert "Timed out" not in stopped.stderr
    from torcheras import checkpoint

    backup = checkpoint.load(tmp_path / "job" / "backup" / "latest.pt")
    assert backup["global_step"] == 11  # rank 1's signal at step 10, agreed one batch later
    run(tmp_path / "job", "--case", "backup")  # the rerun resumes from it, exactly
    for rank in (0, 1):
        got, hist = result(tmp_path / "job", rank)
        want, expected = result(reference, rank)
        for key in want["weights"]:
            assert torch.equal(got["weights"][key], want["weights"][key]), (rank, key)
        assert hist["history"] == expected["history"]
        assert hist["trained"] == 48 - 11


EXIT_SCRIPT = """
import atexit, os, sys
import torch, torch.distributed as dist
import torcheras

def report():  # registered before torcheras starts the group, so it runs after its handler
    with open(os.path.join(sys.argv[1], f"exit{os.environ['RANK']}.txt"), "w") as f:
        f.write(str(dist.is_initialized()))

atexit.register(report)
model = torcheras.Model(torch.nn.Linear(2, 1))
model.compile("sgd", "mse", device="cpu")  # joins torchrun's group: torcheras starts it
model.fit(torch.randn(8, 2), torch.randn(8, 1), epochs=1, verbose=0)
"""


def test_the_process_group_torcheras_started_is_ended_before_the_interpreter_exits(tmp_path):
    """Left to interpreter finalization, gloo's threads can abort a finished run (SIGABRT, as
    this suite once saw): the group torcheras started is destroyed by an exit handler."""
    script = tmp_path / "exit_script.py"
    script.write_text(EXIT_SCRIPT)
    run(tmp_path, script=script)
    assert [(tmp_path / f"exit{r}.txt").read_text() for r in (0, 1)] == ["False", "False"]


INTERRUPT_SCRIPT = """
import json, os, sys
import torch
import torcheras
from torcheras.callbacks import Callback

calls = []

class Handler(Callback):
    def on_train_begin(self, logs=None):
        self.model.loop.interrupt_handler = lambda code: calls.append([code, self.model.loop.batch])

    def on_train_batch_end(self, batch, logs=None):
        if batch == 2 and os.environ["RANK"] == "1":  # one rank asks
            self.model.loop.request_interrupt(7)

torch.manual_seed(0)
model = torcheras.Model(torch.nn.Linear(5, 1))
model.compile("sgd", "mse", device="cpu")
model.fit(torch.randn(80, 5), torch.randn(80, 1), batch_size=8, verbose=0, callbacks=[Handler()])
with open(os.path.join(sys.argv[1], f"calls{os.environ['RANK']}.json"), "w") as f:
    json.dump(calls, f)
"""


def test_an_interrupt_asked_on_one_rank_is_handled_once_on_every_rank(tmp_path):
    """The vote is answered one batch late: the handler runs at the same batch everywhere,
    and only once (a handler that returns used to be called again a batch later)."""
    script = tmp_path / "interrupt_script.py"
    script.write_text(INTERRUPT_SCRIPT)
    run(tmp_path, script=script)
    calls = [json.loads((tmp_path / f"calls{r}.json").read_text()) for r in (0, 1)]
    assert calls[0] == calls[1] and len(calls[0]) == 1
    code, batch = calls[0][0]
    assert code == 7 and batch in (3, 4)  # after the vote on batch 2's request came back


UNWAITED_SCRIPT = """
import torch
import torch.distributed as dist
import torcheras

model = torcheras.Model(torch.nn.Linear(2, 1))  # torcheras joins torchrun's group
model.compile("sgd", "mse", device="cpu")
model.fit(torch.randn(16, 2), torch.randn(16, 1), verbose=0)
for _ in range(100):  # collectives the script never waits for, still queued at its end
    dist.all_reduce(torch.ones(100_000), async_op=True)
"""


def test_a_job_that_ends_with_collectives_unwaited_for_exits_cleanly(tmp_path):
    """The process group torcheras started is ended at exit after the work still queued on
    it: left to interpreter finalization, gloo's threads release those tensors after Python
    is gone and abort the process, and torchrun reports the finished job as failed."""
    script = tmp_path / "unwaited.py"
    script.write_text(UNWAITED_SCRIPT)
    done = launch_script(script, ranks=2, check=False, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "terminate called" not in done.stderr


def test_ranks_given_data_of_different_lengths_stop_naming_both_counts(tmp_path):
    """Not an abort inside gloo with a collective-size mismatch: every rank stops at once
    with an error naming each rank's count and the fix."""
    done = run(tmp_path / "ddp", "--case", "shard", check=False)
    assert done.returncode != 0
    assert "rank 0: 256 samples, rank 1: 200 samples" in done.stderr
    assert "give every process the whole data" in done.stderr
    assert "Timeout" not in done.stderr and "mismatch" not in done.stderr.lower()


def test_validation_interval_stops_every_rank_at_the_same_step_inside_an_epoch(chained):
    """fit(validation_interval=5), 8 batches an epoch: validations at steps 5, 8 (epoch 0's
    end) and 10; rank 1's labels are wrong, so only the all-reduced val_loss agrees. Early
    stopping on the validation at step 10 (epoch 1, batch 1) stops both ranks there."""
    out = chained / "validation_interval"
    (a, ha), (b, hb) = result(out, 0), result(out, 1)
    assert ha["validation_history"]["step"] == [5, 8, 10]
    assert ha["validation_history"] == hb["validation_history"]  # global, not per rank
    assert ha["global_step"] == hb["global_step"] == ha["trained"] == hb["trained"] == 10
    assert ha["epoch"] == hb["epoch"] == [0, 1]
    assert "did not improve for 1 validation" in ha["stop_reason"]
    assert ha["stop_reason"] == hb["stop_reason"]
    assert ha["history"]["val_loss"] == [ha["validation_history"]["val_loss"][i] for i in (1, 2)]
    for key in a["weights"]:
        assert torch.equal(a["weights"][key], b["weights"][key]), key


ABORT_AT_EXIT_SCRIPT = """
import atexit, os, sys, time
if len(sys.argv) > 2:
    raise SystemExit("the script failed before its end")
left = os.path.join(sys.argv[1], "rank1-left")
def abort():  # what gloo's threads do to a finished run, now and then (after the others)
    for _ in range(300):
        if os.path.exists(left):
            break
        time.sleep(0.1)
    sys.stderr.write("terminate called without an active exception\\n")
    sys.stderr.flush()
    os.abort()
if os.environ["RANK"] == "0":
    atexit.register(abort)
else:
    atexit.register(lambda: open(left, "w").close())
sys.stdout.write(f"rank {os.environ['RANK']} done\\n")  # one write: the ranks share the pipe
"""


def test_the_launcher_forgives_only_an_abort_at_exit_after_every_rank_finished(tmp_path):
    """The suite's torchrun launcher lets a run through when torch aborted a process at
    interpreter exit after every rank's script returned (the tests then check what it wrote),
    and still fails a script that did not reach its end."""
    script = tmp_path / "abort_script.py"
    script.write_text(ABORT_AT_EXIT_SCRIPT)
    with pytest.warns(RuntimeWarning, match="aborted a process at interpreter exit"):
        done = run(tmp_path, script=script)
    assert done.returncode != 0
    assert sorted(done.stdout.split("\n")) == ["", "rank 0 done", "rank 1 done"]
    with pytest.raises(AssertionError, match="failed before its end"):
        run(tmp_path, "fail", script=script)
