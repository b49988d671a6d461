"""RemoteMonitor against a real HTTP server on 127.0.0.1, in Keras's two formats."""

from __future__ import annotations

import json
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from conftest import make_model

from torcheras import callbacks as cb


@pytest.fixture
def server():
    received: list[tuple[str, str, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers["Content-Type"], body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", received
    httpd.shutdown()


@pytest.mark.parametrize("as_json", [False, True])
def test_each_epoch_posts_its_logs(blobs, server, as_json):
    root, received = server
    x, y = blobs
    history = make_model().fit(
        x, y, epochs=3, validation_split=0.25, verbose=0,
        callbacks=[cb.RemoteMonitor(root, send_as_json=as_json)],
    )  # fmt: skip
    assert len(received) == 3
    for epoch, (path, content_type, body) in enumerate(received):
        assert path == "/publish/epoch/end/"
        if as_json:
            assert content_type == "application/json"
            sent = json.loads(body)
        else:
            assert content_type == "application/x-www-form-urlencoded"
            sent = json.loads(urllib.parse.parse_qs(body.decode())["data"][0])
        assert sent["epoch"] == epoch
        for key, values in history.history.items():
            assert sent[key] == pytest.approx(values[epoch])


def test_an_unreachable_server_costs_a_warning_not_the_run(blobs):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    x, y = blobs
    with pytest.warns(RuntimeWarning, match="RemoteMonitor: could not send epoch 1") as caught:
        history = make_model().fit(
            x, y, epochs=2, verbose=0,
            callbacks=[cb.RemoteMonitor(f"http://127.0.0.1:{port}", timeout=1)],
        )  # fmt: skip
    assert history.epoch == [0, 1]
    assert sum("RemoteMonitor" in str(w.message) for w in caught) == 2


@pytest.mark.parametrize("as_json", [False, True])
def test_values_go_as_json_numbers_as_keras_sends_them(blobs, server, as_json):
    """Keras unwraps numpy values with ``.item()``: ``np.array([0])`` is sent as 0, not
    ``"[0]"``; ints stay ints, floats floats."""
    import numpy as np
    import torch

    root, received = server
    extra = {
        "one_element": np.array([0]),
        "np_float": np.float32(1.5),
        "np_int": np.int64(3),
        "np_bool": np.bool_(True),
        "count": 7,
        "tensor": torch.tensor(2.5),
        "vector": np.array([1.0, 2.0]),
        "name": "adam",
    }
    x, y = blobs
    history = make_model().fit(
        x, y, epochs=1, verbose=0,
        callbacks=[
            cb.LambdaCallback(on_epoch_end=lambda epoch, logs: logs.update(extra)),
            cb.RemoteMonitor(root, send_as_json=as_json),
        ],
    )  # fmt: skip
    (_, _, body) = received[0]
    text = body.decode() if as_json else urllib.parse.parse_qs(body.decode())["data"][0]
    sent = json.loads(text)
    expected = {
        "epoch": 0, "one_element": 0, "np_float": 1.5, "np_int": 3, "np_bool": True,
        "count": 7, "tensor": 2.5, "vector": [1.0, 2.0], "name": "adam",
    }  # fmt: skip
    for key, value in expected.items():
        assert sent[key] == value and type(sent[key]) is type(value), (key, sent[key])
    assert type(sent["loss"]) is float and sent["loss"] == history.history["loss"][0]
