"""Paths that are URLs, through fsspec: against a real S3 API (moto's server in a process of
its own, with IAM checks on, so wrong credentials are refused as AWS refuses them) read back
with boto3, and against ``memory://`` and ``file://``."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import launch_script, make_model

from torcheras import callbacks as cb
from torcheras import checkpoint, cli

fsspec = pytest.importorskip("fsspec")
pytest.importorskip("s3fs")
boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server")

BUCKET = "torcheras-tests"
SRC = str(Path(__file__).parent.parent / "src")
# One pytest-xdist worker runs the module (`--dist loadgroup`): one moto server (`s3`)
pytestmark = pytest.mark.xdist_group("test_checkpoint_urls")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free port, an IAM user allowed s3:* whose keys are in the
    environment (``AWS_ENDPOINT_URL`` too, which botocore and so s3fs honour), and a bucket.
    Yields a boto3 client: the reader the tests trust."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # moto checks credentials after its first 3 requests: the IAM user, its key, its policy
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the moto server did not start") from None
                time.sleep(0.05)
        anyone = {"endpoint_url": endpoint, "region_name": "us-east-1",
                  "aws_access_key_id": "x", "aws_secret_access_key": "x"}  # fmt: skip
        iam = boto3.client("iam", **anyone)
        iam.create_user(UserName="trainer")
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        allow = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}
        policy = {"Version": "2012-10-17", "Statement": [allow]}
        iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=json.dumps(policy))
        credentials = {
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        with pytest.MonkeyPatch.context() as patch:
            for name, value in credentials.items():
                patch.setenv(name, value)
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
                patch.delenv(name, raising=False)
            fsspec.filesystem("s3").clear_instance_cache()  # none made with other settings
            client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            client.create_bucket(Bucket=BUCKET)
            yield client
            fsspec.filesystem("s3").clear_instance_cache()
    finally:
        server.kill()
        server.wait()


def _object(client, key: str) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def _keys(client, prefix: str) -> list[str]:
    found = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return sorted(o["Key"] for o in found)


def _torch_object(client, key: str):
    return torch.load(io.BytesIO(_object(client, key)), weights_only=True)


def _same_weights(a, b) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --- S3 ------------------------------------------------------------------------------------------
def test_model_checkpoint_in_the_bucket_matches_the_local_file(s3, blobs, tmp_path):
    x, y = blobs
    url = f"s3://{BUCKET}/ckpt/best.pt"
    make_model().fit(
        x, y, epochs=4, validation_split=0.25, verbose=0,
        callbacks=[cb.ModelCheckpoint(tmp_path / "best.pt", save_best_only=True),
                   cb.ModelCheckpoint(url, save_best_only=True)],
    )  # fmt: skip
    local = torch.load(tmp_path / "best.pt", weights_only=True)
    remote = _torch_object(s3, "ckpt/best.pt")  # boto3 + torch.load: no torcheras
    assert remote["epoch"] == local["epoch"] and remote["logs"] == local["logs"]
    _same_weights(remote["model"], local["model"])
    assert _keys(s3, "ckpt/") == ["ckpt/best.pt"]  # no temp keys: one PUT


def test_model_save_load_and_weights_round_trip_through_the_bucket(s3, blobs):
    x, y = blobs
    model = make_model()
    model.fit(x, y, epochs=1, verbose=0)
    model.save(f"s3://{BUCKET}/m/model.pt")
    model.save_weights(f"s3://{BUCKET}/m/weights.pt")
    model.save_weights(f"s3://{BUCKET}/m/weights.safetensors")
    torch.manual_seed(1)
    fresh = make_model()
    fresh.load(f"s3://{BUCKET}/m/model.pt")
    _same_weights(fresh.state_dict(), model.state_dict())
    assert fresh.optimizer.state_dict()["state"][0]["step"] == 8  # 240 / 32 batches: 8 steps
    for name in ("weights.pt", "weights.safetensors"):
        torch.manual_seed(2)
        other = make_model()
        other.load_weights(f"s3://{BUCKET}/m/{name}")
        _same_weights(other.state_dict(), model.state_dict())
    plain = _torch_object(s3, "m/weights.pt")  # the bare state_dict plain torch reads
    _same_weights({f"module.{k}": v for k, v in plain.items()}, model.state_dict())


class _Crash(cb.Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, batch, logs=None):
        if self.model.loop.global_step == self.at:
            raise RuntimeError("simulated crash")


def test_backup_in_the_bucket_resumes_as_the_uninterrupted_run(s3, blobs):
    x, y = blobs

    def train(backup, crash_at=-1):
        torch.manual_seed(0)
        model = make_model()
        restore = cb.BackupAndRestore(backup, save_freq=2, double_checkpoint=True)
        history = model.fit(x, y, epochs=3, batch_size=32, verbose=0,
                            callbacks=[restore, _Crash(crash_at)])  # fmt: skip
        return model, history.history, restore

    reference, ref_history, _ = train(f"s3://{BUCKET}/backup-ref")
    url = f"s3://{BUCKET}/backup"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(url, crash_at=11)  # epoch 1, batch 2; backups after steps 8 and 10
    assert _keys(s3, "backup/") == ["backup/latest.pt", "backup/previous.pt"]
    assert _torch_object(s3, "backup/latest.pt")["global_step"] == 10
    assert _torch_object(s3, "backup/previous.pt")["global_step"] == 8
    resumed, history, restore = train(url)
    assert restore.resumed_from == f"{url}/latest.pt"
    assert history == ref_history
    _same_weights(resumed.state_dict(), reference.state_dict())
    assert _keys(s3, "backup/") == []  # deleted once training ended


KILL_SCRIPT = """
import sys, torch
from torcheras import checkpoint
url, n = sys.argv[1], 1_000_000  # 4 MB a write
for i in range(1000):
    print("start", i, flush=True)
    checkpoint.save({"i": i, "w": torch.full((n,), float(i))}, url)
    print("done", i, flush=True)
"""


def test_sigkill_during_a_write_leaves_the_previous_object_whole(s3):
    url = f"s3://{BUCKET}/kill/latest.pt"
    writer = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, url],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    done = -1
    try:
        for line in writer.stdout:  # kill as the third write starts
            word, i = line.split()
            if word == "done":
                done = int(i)
            elif int(i) == 2:
                time.sleep(0.02)
                break
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert writer.returncode == -signal.SIGKILL and done == 1
    state = checkpoint.load(url)
    assert state["i"] in (1, 2)  # the last whole write (the third had it landed)
    assert state["w"].shape == (1_000_000,) and bool((state["w"] == state["i"]).all())
    assert _keys(s3, "kill/") == ["kill/latest.pt"]


def test_missing_bucket_and_wrong_credentials_name_the_url(s3, blobs, monkeypatch):
    x, y = blobs
    missing = "s3://no-such-bucket-here/run/best.pt"
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(missing) + ".*bucket"):
        make_model().fit(x, y, epochs=1, verbose=0, callbacks=[cb.ModelCheckpoint(missing)])
    with pytest.raises(checkpoint.CheckpointNotFoundError, match=f"s3://{BUCKET}/nothing.pt"):
        make_model().load(f"s3://{BUCKET}/nothing.pt")
    # another key: fsspec's config (a new filesystem) as a user would set it
    monkeypatch.setitem(fsspec.config.conf, "s3", {"key": "AKIAWRONG", "secret": "wrong"})
    url = f"s3://{BUCKET}/denied/model.pt"
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(url) + ".*credentials"):
        make_model().save(url)
    started = []
    log = cb.CSVLogger(f"s3://{BUCKET}/denied/log.csv")
    first_batch = cb.LambdaCallback(on_train_batch_begin=lambda b, logs: started.append(b))
    with pytest.raises(checkpoint.CheckpointError, match="denied/log.csv.*credentials"):
        make_model().fit(x, y, epochs=1, verbose=0, callbacks=[log, first_batch])
    assert started == []  # refused before training started
    assert _keys(s3, "denied/") == []


def test_csv_logger_history_and_report_through_the_bucket(s3, blobs, tmp_path):
    x, y = blobs
    url = f"s3://{BUCKET}/run2"
    model = make_model()
    for _ in range(2):  # append=True: the second fit adds its rows to the object
        history = model.fit(
            x, y, epochs=2, validation_split=0.25, verbose=0,
            callbacks=[cb.CSVLogger(f"{url}/log.csv", append=True),
                       cb.CSVLogger(tmp_path / "log.csv", append=True)],
        )  # fmt: skip
    text = _object(s3, "run2/log.csv").decode()
    assert text.encode() == (tmp_path / "log.csv").read_bytes()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["epoch"] for r in rows] == ["0", "1", "0", "1"]
    assert [float(r["val_loss"]) for r in rows[2:]] == history.history["val_loss"]
    assert json.loads(_object(s3, "run2/log.csv.json"))["log"] == "log.csv"
    history.save(f"{url}/history.json")
    record = json.loads(_object(s3, "run2/history.json"))
    assert record["history"] == history.history and record["epoch"] == [0, 1]
    model.save(f"{url}/model.pt")
    assert cli.main(["report", url]) == 0
    page = _object(s3, "run2/report.html").decode()
    assert "Training report: run2" in page and "data:image/png;base64," in page
    assert "model.pt" in page and "history.json" in page
    assert cli.main(["report", f"s3://{BUCKET}/no-run-here"]) == 2


# --- memory:// and file:// -----------------------------------------------------------------------
def test_memory_urls_for_the_loggers_and_checkpoints(blobs):
    from matplotlib.image import imread

    x, y = blobs
    images = torch.linspace(0, 1, 64).view(4, 1, 4, 4)
    fit_history = make_model().fit(
        x, y, epochs=2, validation_split=0.25, verbose=0,
        callbacks=[cb.ModelCheckpoint("memory://mem/{epoch}.pt", save_weights_only=True),
                   cb.PredictionLogger("memory://mem/pred", num_samples=3, num_worst=0),
                   cb.ImageLogger(lambda m: images, "memory://mem/img")],
    )  # fmt: skip
    assert fit_history.epoch == [0, 1]
    memory = fsspec.filesystem("memory")
    try:
        assert memory.exists("/mem/1.pt") and memory.exists("/mem/2.pt")
        rows = list(csv.DictReader(io.StringIO(memory.cat_file("/mem/pred/predictions.csv")
                                               .decode())))  # fmt: skip
        assert [(r["epoch"], r["kind"]) for r in rows] == [("1", "sample")] * 3 + [
            ("2", "sample")
        ] * 3
        png = imread(io.BytesIO(memory.cat_file("/mem/img/samples_epoch002.png")), format="png")
        assert png.shape[:2] == (4 + 2 * 2, 4 * (4 + 2) + 2)  # 4 images 4x4 in a row, padded
    finally:
        memory.rm("/mem", recursive=True)


def test_file_urls_are_local_paths(tmp_path, blobs):
    x, y = blobs
    model = make_model()
    model.fit(x, y, epochs=1, verbose=0,
              callbacks=[cb.ModelCheckpoint(f"file://{tmp_path}/best.pt")])  # fmt: skip
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == 0
    model.save_weights(f"file://{tmp_path}/w.pt")
    _same_weights(
        {f"module.{k}": v for k, v in torch.load(tmp_path / "w.pt", weights_only=True).items()},
        model.state_dict(),
    )


@pytest.mark.parametrize(
    ("path", "url"),
    [("s3://b/k.pt", True), ("gs://b/k", True), ("memory://k", True), ("C://x.pt", False),
     ("C:\\x.pt", False), ("ckpt/best.pt", False), ("runs/a://b.pt", False)],
)  # fmt: skip
def test_what_counts_as_a_url(path, url):
    assert checkpoint.is_url(path) is url
    assert not checkpoint.is_url(Path(path))


def test_tensorboard_refuses_a_url_and_says_it_stays_local():
    with pytest.raises(ValueError, match="s3://b/tb.*local folder"):
        cb.TensorBoard("s3://b/tb")


LOCAL_ONLY = """
import sys, numpy as np, torch, torcheras
from torcheras import callbacks as cb
x = np.random.rand(32, 4).astype("float32"); y = (x.sum(1) > 2).astype("int64")
model = torcheras.Model(torch.nn.Sequential(torch.nn.Linear(4, 2)))
model.compile("adam", "sparse_categorical_crossentropy")
d = sys.argv[1]
history = model.fit(x, y, epochs=1, verbose=0, callbacks=[
    cb.ModelCheckpoint(d + "/best.pt"), cb.CSVLogger(d + "/log.csv"),
    cb.BackupAndRestore(d + "/backup")])
history.save(d + "/history.json"); model.save(d + "/model.pt"); model.load(d + "/model.pt")
assert "fsspec" not in sys.modules, "a local path imported fsspec"
sys.modules["fsspec"] = None  # as if it were not installed
try:
    model.save("s3://bucket/model.pt")
except ImportError as exc:
    print(exc)
"""


def test_local_paths_never_import_fsspec_and_a_url_without_it_names_the_extra(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LOCAL_ONLY), str(tmp_path)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": SRC},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "s3://bucket/model.pt" in result.stdout
    assert "pip install 'torcheras[fsspec]'" in result.stdout
    assert np.isfinite(json.loads((tmp_path / "history.json").read_text())["history"]["loss"][0])


DDP_SCRIPT = """
import sys, numpy as np, torch, torcheras
from torcheras import callbacks as cb, distributed
url, epochs = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
rng = np.random.default_rng(0)
x = rng.normal(size=(128, 8)).astype("float32"); y = (x.sum(1) > 0).astype("int64")
model = torcheras.Model(torch.nn.Sequential(torch.nn.Linear(8, 2)))
model.compile("sgd", "sparse_categorical_crossentropy", device="cpu")
backup = cb.BackupAndRestore(url + "/backup", save_freq=2, double_checkpoint=True,
                             delete_checkpoint=False)
history = model.fit(x, y, epochs=epochs, batch_size=16, verbose=0,
                    callbacks=[backup, cb.ModelCheckpoint(url + "/last.pt")])
line = f"{distributed.rank()} {backup.resumed_from} {len(history.history['loss'])}\\n"
sys.stdout.write(line)  # one write: the ranks share the pipe (print writes piece by piece)
sys.stdout.flush()
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_torchrun_backs_up_to_the_bucket_from_rank_zero_and_resumes_from_it(s3, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    url = f"s3://{BUCKET}/ddp"

    def torchrun(epochs: int) -> str:
        done = launch_script(script, url, epochs, ranks=2, timeout=180, env={"PYTHONPATH": SRC})
        return done.stdout

    first = torchrun(1)  # 8 steps of 16 samples (8 a rank): backups after steps 2, 4, 6, 8
    assert sorted(first.split("\n")[:2]) == ["0 None 1", "1 None 1"]
    latest, previous = (_torch_object(s3, f"ddp/backup/{n}.pt") for n in ("latest", "previous"))
    assert latest["world_size"] == 2 and len(latest["ranks"]) == 2  # both ranks' RNG and data
    assert (latest["epoch"], latest["batch"], latest["global_step"]) == (0, 8, 8)
    assert (previous["batch"], previous["global_step"]) == (6, 6)  # kept by rank 0 alone
    last = _torch_object(s3, "ddp/last.pt")
    _same_weights(last["model"], latest["model"])
    second = torchrun(2)  # resumes at epoch 2 from the bucket, on both ranks
    assert sorted(second.split("\n")[:2]) == [f"{r} {url}/backup/latest.pt 2" for r in (0, 1)]
    assert _torch_object(s3, "ddp/backup/latest.pt")["global_step"] == 16
