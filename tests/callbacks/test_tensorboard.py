"""TensorBoard: event files read back with TensorBoard's own reader, and a real server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
from conftest import make_model
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import torcheras
from torcheras.callbacks import LambdaCallback, TensorBoard


def _load(folder):
    acc = EventAccumulator(
        str(folder), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0}
    )
    acc.Reload()
    return acc


def _steps(acc, tag):
    return [e.step for e in acc.Scalars(tag)]


def test_epoch_scalars_in_train_and_validation_runs(tmp_path, blobs):
    x, y = blobs
    history = make_model().fit(
        x,
        y,
        epochs=3,
        batch_size=40,
        validation_split=0.25,
        verbose=0,
        callbacks=[TensorBoard(tmp_path)],
    )
    assert sorted(os.listdir(tmp_path)) == ["train", "validation"]
    train, val = _load(tmp_path / "train"), _load(tmp_path / "validation")
    assert {"epoch_loss", "epoch_accuracy", "epoch_learning_rate"} <= set(train.Tags()["scalars"])
    assert _steps(train, "epoch_loss") == [0, 1, 2]
    assert [e.value for e in train.Scalars("epoch_loss")] == pytest.approx(history.history["loss"])
    assert [e.value for e in val.Scalars("epoch_loss")] == pytest.approx(
        history.history["val_loss"]
    )
    # evaluation_*_vs_iterations at the global batch step: 5 batches per epoch
    assert _steps(val, "evaluation_loss_vs_iterations") == [5, 10, 15]
    assert "batch_loss" not in train.Tags()["scalars"]


def test_no_validation_run_without_validation(tmp_path, blobs):
    x, y = blobs
    make_model().fit(x, y, epochs=1, verbose=0, callbacks=[TensorBoard(tmp_path)])
    assert os.listdir(tmp_path) == ["train"]


@pytest.mark.parametrize(("update_freq", "steps"), [("batch", list(range(1, 13))), (4, [4, 8, 12])])
def test_update_freq_batch_scalars_with_global_1_based_step(tmp_path, blobs, update_freq, steps):
    x, y = blobs
    make_model().fit(
        x,
        y,
        epochs=2,
        batch_size=40,
        verbose=0,
        callbacks=[TensorBoard(tmp_path, update_freq=update_freq, write_steps_per_second=True)],
    )
    train = _load(tmp_path / "train")
    assert _steps(train, "batch_loss") == steps
    assert _steps(train, "batch_steps_per_second") == steps
    assert _steps(train, "epoch_loss") == [0, 1]  # not filtered by update_freq (Keras quirk)
    assert _steps(train, "epoch_steps_per_second") == [0, 1]


def test_histograms_gradients_images_and_graph(tmp_path, blobs):
    x, y = blobs
    make_model().fit(
        x,
        y,
        epochs=3,
        verbose=0,
        callbacks=[TensorBoard(tmp_path, histogram_freq=2, write_images=True)],
    )
    train = _load(tmp_path / "train")
    hist = set(train.Tags()["histograms"])
    assert {
        "module.0.weight/histogram",
        "module.0.weight/gradient",
        "module.2.bias/histogram",
    } <= hist
    assert [e.step for e in train.Histograms("module.0.weight/histogram")] == [0, 2]
    assert "module.0.weight/image" in train.Tags()["images"]
    assert train.Tags()["graph"] is True
    graph = train.Graph()
    assert any("Linear" in node.op or "linear" in node.name.lower() for node in graph.node)


def test_embeddings_for_the_projector(tmp_path):
    class Bag(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(5, 4)
            self.out = torch.nn.Linear(4, 2)

        def forward(self, tokens):
            return self.out(self.embed(tokens).mean(1))

    model = torcheras.Model(Bag())
    model.compile("adam", "sparse_categorical_crossentropy")
    tokens = np.random.randint(0, 5, (20, 3))
    # Keras's form: a file name per embedding layer, relative to log_dir, that TensorBoard's
    # projector opens; it does not exist in the working directory and is never opened by us.
    board = TensorBoard(
        tmp_path / "tb", embeddings_freq=1, embeddings_metadata={"module.embed": "labels.tsv"}
    )
    torcheras.callbacks.CallbackList([board], model=model)  # set_model writes the config
    config_path = tmp_path / "tb" / "projector_config.pbtxt"
    assert 'metadata_path: "labels.tsv"' in config_path.read_text()
    model.fit(tokens, np.random.randint(0, 2, 20), epochs=2, verbose=0, callbacks=[board])
    from google.protobuf import text_format
    from tensorboard.plugins.projector import projector_config_pb2

    config = text_format.Parse(config_path.read_text(), projector_config_pb2.ProjectorConfig())
    (embedding,) = config.embeddings
    assert (embedding.tensor_name, embedding.metadata_path) == ("module.embed", "labels.tsv")
    tensors = np.loadtxt(tmp_path / "tb" / embedding.tensor_path, delimiter="\t")
    np.testing.assert_allclose(
        tensors, model.module.embed.weight.detach().numpy(), rtol=1e-5, atol=1e-6
    )
    assert not (tmp_path / "labels.tsv").exists() and not os.path.exists("labels.tsv")
    with pytest.raises(
        ValueError,
        match=r"Unrecognized `Embedding` layer names.*'nope'.*"
        r"module.embed",
    ):
        model.fit(
            tokens,
            np.zeros(20, dtype="int64"),
            epochs=1,
            verbose=0,
            callbacks=[
                TensorBoard(tmp_path / "tb2", embeddings_freq=1, embeddings_metadata={"nope": "x"})
            ],
        )


def test_profile_batch_writes_a_torch_profiler_trace(tmp_path, blobs):
    x, y = blobs
    make_model().fit(
        x,
        y,
        epochs=1,
        batch_size=40,
        verbose=0,
        callbacks=[TensorBoard(tmp_path, profile_batch=(2, 3))],
    )
    traces = list((tmp_path / "train").rglob("*.pt.trace.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any("linear" in str(e.get("name", "")).lower() for e in events)


@pytest.mark.parametrize("bad", [-1, (3, 2), "a,b", (1, 2, 3), 1.5])
def test_profile_batch_errors(bad):
    with pytest.raises(ValueError, match="profile_batch must be a non-negative integer or 2-tuple"):
        TensorBoard(profile_batch=bad)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"update_freq": "sometimes"}, "`update_freq` must be 'epoch', 'batch'"),
        ({"histogram_freq": -1}, "`histogram_freq` must be a non-negative integer"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TensorBoard(**kwargs)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def test_a_real_tensorboard_server_lists_our_runs_and_tags(tmp_path, blobs):
    """The server is polled until it shows our tags (it loads in the background); its stderr
    is kept for the failure message."""
    x, y = blobs
    make_model().fit(
        x, y, epochs=2, validation_split=0.25, verbose=0, callbacks=[TensorBoard(tmp_path / "logs")]
    )
    port = _free_port()
    tb_main = (
        "import sys; from tensorboard.main import run_main; sys.argv[0] = 'tensorboard'; run_main()"
    )
    log = open(tmp_path / "server.log", "w+")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            tb_main,
            "--logdir",
            str(tmp_path / "logs"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast",
            "false",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    wanted = {"epoch_loss", "epoch_accuracy", "epoch_learning_rate"}
    tags: dict = {}
    try:
        for _ in range(600):  # up to ~5 minutes on a loaded machine; usually a few seconds
            if server.poll() is not None:
                break
            try:
                tags = _get_json(f"{base}/data/plugin/scalars/tags")
            except OSError:
                tags = {}
            if wanted <= set(tags.get("train", {})) and "epoch_loss" in tags.get("validation", {}):
                break
            time.sleep(0.5)
        log.seek(0)
        assert wanted <= set(tags.get("train", {})), f"server log:\n{log.read()[-3000:]}"
        assert sorted(_get_json(f"{base}/data/runs")) == ["train", "validation"]
        assert "epoch_loss" in tags["validation"]
        points = _get_json(f"{base}/data/plugin/scalars/scalars?run=train&tag=epoch_loss")
        assert [p[1] for p in points] == [0, 1]
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


def test_steps_per_second_is_the_real_rate(tmp_path, blobs):
    import time as clock

    x, y = blobs
    sleepy = LambdaCallback(on_train_batch_begin=lambda b, logs: clock.sleep(0.02))
    make_model().fit(
        x,
        y,
        epochs=1,
        batch_size=30,
        verbose=0,
        callbacks=[sleepy, TensorBoard(tmp_path, write_steps_per_second=True, write_graph=False)],
    )
    (rate,) = _load(tmp_path / "train").Scalars("epoch_steps_per_second")
    assert 10 < rate.value < 50  # 8 steps of at least 20 ms: at most 50 steps/s, not 0


def test_a_standalone_evaluate_flushes_and_closes_its_writer(tmp_path, blobs):
    x, y = blobs
    board = TensorBoard(tmp_path, write_graph=False)
    model = make_model()
    model.evaluate(x, y, verbose=0, callbacks=[board])
    assert board._writers == {}  # closed
    assert "evaluation_loss_vs_iterations" in _load(tmp_path / "validation").Tags()["scalars"]


def test_write_images_draws_biases_too(tmp_path, blobs):
    x, y = blobs
    make_model().fit(
        x,
        y,
        epochs=1,
        verbose=0,
        callbacks=[TensorBoard(tmp_path, histogram_freq=1, write_images=True, write_graph=False)],
    )
    images = _load(tmp_path / "train").Tags()["images"]
    assert "module.0.bias/image" in images and "module.0.weight/image" in images


def test_an_untraceable_graph_gives_one_short_warning(tmp_path, capfd):
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = torch.nn.MultiheadAttention(4, 2, batch_first=True)
            self.out = torch.nn.Linear(4, 2)

        def forward(self, tokens):
            mixed, _ = self.attention(tokens, tokens, tokens)
            return self.out(mixed.mean(1))

    model = torcheras.Model(Attention())
    model.compile("adam", "sparse_categorical_crossentropy", device="cpu")
    x, y = torch.randn(16, 3, 4), torch.randint(0, 2, (16,))
    with pytest.warns(UserWarning) as record:
        model.fit(x, y, epochs=1, verbose=0, callbacks=[TensorBoard(tmp_path)])
    graph_warnings = [w for w in record if "graph" in str(w.message)]
    if graph_warnings:  # this torch cannot trace it: one short warning, no pages of trace
        assert len(graph_warnings) == 1 and len(str(graph_warnings[0].message)) < 400
    else:  # this torch traces it: the graph is there
        assert _load(tmp_path / "train").Tags()["graph"] is True
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "Error occurs" not in out + err
