"""Edge cases users hit: the CLI piped into a reader that leaves early (buffered stdout,
in-process calls), kept batch logs of many metric kinds pickled one by one, torchmetrics
values read after a reset, and get_weights / set_weights of an FSDP-sharded model."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import launch_script, make_model

from torcheras import metrics
from torcheras.callbacks import Callback, LambdaCallback

# ---- CLI: a reader that leaves early -----------------------------------------------------------


def _cli():
    command = Path(sys.executable).parent / "torcheras"
    return [str(command)] if command.exists() else [sys.executable, "-m", "torcheras.cli"]


def _buffered_env():
    """A user's environment: stdout block-buffered on a pipe (this sandbox sets
    PYTHONUNBUFFERED=1, which hides what an exit-time flush does)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_cli_inspect_into_a_pipe_whose_reader_left_exits_1_without_an_error(tmp_path):
    """`torcheras inspect best.pt | <a reader already gone>`: the output is small and sits in
    stdout's buffer until it is flushed; that flush is inside main()'s handling too, so the
    command exits 1 quietly (not Python's 'Exception ignored ... BrokenPipeError', exit 120)."""
    model = make_model()
    model.save(tmp_path / "m.pt")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        done = subprocess.run(
            [*_cli(), "inspect", str(tmp_path / "m.pt")],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=_buffered_env(),
            timeout=300,
        )
    finally:
        os.close(write_end)
    assert "BrokenPipeError" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1


def test_cli_demo_piped_to_head_with_buffered_stdout_stops_quietly(tmp_path):
    """`torcheras demo | head -1` under a user's (buffered) stdout: the first line, then a
    quiet exit 1, no BrokenPipeError traceback from the progress bar's flush."""
    process = subprocess.Popen(
        [*_cli(), "demo", "--out", str(tmp_path), "--epochs", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_buffered_env(),
    )
    first = process.stdout.readline()
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=600) == 1
    assert first.startswith("torcheras demo: ")
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


# ---- kept batch logs of several metric kinds pickle ----------------------------------------


class _Keep(Callback):
    def __init__(self):
        self.kept = []

    def on_train_batch_end(self, batch, logs=None):
        self.kept.append(logs)


def test_batch_logs_of_many_metric_kinds_pickle_one_by_one_and_read_their_batch():
    """Each kept batch log sent alone (a multiprocessing queue pickles one at a time) reads
    back its own batch's values for every metric kind at once (mean, state metrics with
    thresholds and per-class values, torchmetrics with tensor and list states)."""
    torchmetrics = pytest.importorskip("torchmetrics")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 8)).astype("float32")
    y = (x[:, :3] > 0).astype("int64")  # three labels per sample
    keep, read = _Keep(), []
    probe = LambdaCallback(on_train_batch_end=lambda b, logs: read.append(dict(logs)))
    model = make_model(
        loss=torch.nn.BCEWithLogitsLoss(),
        metrics=[
            "binary_accuracy",  # a mean metric
            "auc",  # a state metric: counts per threshold
            "precision",
            "f1_score",  # one value per class
            metrics.BinaryIoU(name="biou", threshold=0.0),
            torchmetrics.classification.MultilabelAUROC(num_labels=3, thresholds=None),
            torchmetrics.MeanSquaredError(),
        ],
    )
    model.fit(x, y, epochs=2, batch_size=40, verbose=0, callbacks=[keep, probe])
    restored = [pickle.loads(pickle.dumps(logs)) for logs in keep.kept]
    assert [dict(logs) for logs in restored] == read
    assert sorted(read[0]) == [
        "auc", "binary_accuracy", "biou", "f1_score", "loss", "mean_squared_error",
        "multilabel_auroc", "precision",
    ]  # fmt: skip
    assert len(read[0]["f1_score"]) == 3
    assert len({logs["multilabel_auroc"] for logs in read}) > 1  # each batch's own value
    # read again after the live metrics moved on (and were reset by the second epoch)
    assert dict(pickle.loads(pickle.dumps(keep.kept[0]))) == read[0]


def test_a_torchmetrics_batch_value_read_after_the_metric_was_reset_warns_nothing(blobs):
    """A callback that reads the previous epoch's kept batch logs at on_epoch_begin (the
    metrics were reset just before) gets the right value and no torchmetrics warning
    'compute was called before update' (the snapshot carries its update count)."""
    torchmetrics = pytest.importorskip("torchmetrics")
    x, y = blobs
    seen = []

    class ReadLastEpoch(_Keep):
        def on_epoch_begin(self, epoch, logs=None):
            if self.kept:
                seen.append(self.kept[-1]["multiclass_accuracy"])

    accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro")
    model = make_model(metrics=[accuracy])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, y, epochs=2, batch_size=240, verbose=0, callbacks=[ReadLastEpoch()])
    assert seen == pytest.approx(history.history["multiclass_accuracy"][:1])
    messages = [str(w.message) for w in caught if "before the ``update``" in str(w.message)]
    assert messages == []


# ---- get_weights / set_weights of an FSDP-sharded model (2 CPU ranks) ----------------------

_FSDP_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    from torch.distributed.fsdp import fully_shard
    import torcheras
    from torcheras.callbacks import early_stopping as es

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 6)
    )
    whole = {k: v.detach().clone() for k, v in net.state_dict().items()}
    model = torcheras.Model(net)
    model.compile(optimizer="sgd", loss="mse", device="cpu")
    for layer in (net[0], net[2]):
        fully_shard(layer)
    fully_shard(net)
    out = {}
    got = model.get_weights()
    out["types"] = sorted({type(v).__name__ for v in got.values()})
    out["whole"] = all(
        torch.equal(got["module." + k], v) for k, v in whole.items()
    ) and len(got) == len(whole)
    got["module.0.weight"].add_(100.0)  # a copy: the model's own weights do not move
    out["copy"] = torch.equal(model.get_weights()["module.0.weight"], whole["0.weight"])
    try:
        model.set_weights({k: v + 1 if v.is_floating_point() else v
                           for k, v in model.get_weights().items()})
        again = model.get_weights()
        out["set_dict"] = all(
            torch.equal(again["module." + k], v + 1)
            for k, v in whole.items() if v.is_floating_point()
        )
    except Exception as exc:
        out["set_dict"] = repr(exc)
    try:
        model.set_weights([v for v in whole.values()])  # a list in state_dict order
        out["set_list"] = all(
            torch.equal(model.get_weights()["module." + k], v) for k, v in whole.items()
        )
    except Exception as exc:
        out["set_list"] = repr(exc)
    kept = es.get_weights(model)  # EarlyStopping's: each rank's own shards
    out["kept_types"] = sorted({type(v).__name__ for v in kept.values()})
    model.set_weights({k: v * 0 for k, v in model.get_weights().items()})
    es.set_weights(model, kept)
    out["restored"] = all(
        torch.equal(model.get_weights()["module." + k], v) for k, v in whole.items()
    )
    with open(sys.argv[1] + f".{dist.get_rank()}.json", "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def test_sharded_get_weights_whole_on_every_rank_and_set_weights_round_trips(tmp_path):
    """get_weights of a sharded model (a BatchNorm's buffers too) gives whole plain tensors
    on every rank, a copy; set_weights takes a dict or a list of whole tensors back;
    EarlyStopping's kept weights stay shards and restore."""
    pytest.importorskip("torch.distributed.fsdp")
    script = tmp_path / "fsdp_weights.py"
    script.write_text(_FSDP_SCRIPT)
    launch_script(script, str(tmp_path / "out"), ranks=2, timeout=240)
    for rank in (0, 1):
        out = json.loads((tmp_path / f"out.{rank}.json").read_text())
        assert out["types"] == ["Tensor"], out
        assert out["whole"] is True and out["copy"] is True, out
        assert out["set_dict"] is True, out
        assert out["set_list"] is True, out
        assert out["kept_types"] == ["DTensor", "Tensor"], out  # shards, buffers whole
        assert out["restored"] is True, out


def test_cli_main_called_in_process_with_a_captured_stdout_returns_1(monkeypatch, capsys):
    """main() called in-process (tests, notebooks), where sys.stdout has no file descriptor:
    a broken pipe still gives exit code 1, and the caller's stdout is left alone."""
    from torcheras import cli

    def broken(argv):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_run", broken)
    assert cli.main(["demo"]) == 1
