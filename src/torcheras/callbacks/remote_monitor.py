"""RemoteMonitor: POST each epoch's logs to a server, as Keras does."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
import warnings
from typing import Any

import numpy as np
import torch

from torcheras.callbacks.callback import Callback

__all__ = ["RemoteMonitor"]


class RemoteMonitor(Callback):
    """Send ``{"epoch": epoch, **logs}`` to ``root + path`` with an HTTP POST after every
    epoch, with Keras's arguments and format: a form field ``field`` holding the JSON
    (``application/x-www-form-urlencoded``), or the JSON itself as the body with
    ``send_as_json=True``. Values go as JSON numbers: ints stay ints, floats floats, a numpy
    or torch scalar (or one-element array) is unwrapped with ``.item()`` as Keras does, a
    longer array becomes a list; anything else is sent as its text. A server that cannot be
    reached or answers with an error costs a warning, never the run; each request waits at
    most ``timeout`` seconds. Under torchrun, rank 0 alone sends.

    Example:
        ```python
        model.fit(x, y, epochs=10, callbacks=[RemoteMonitor("http://localhost:9000",
                                                             send_as_json=True)])
        ```
    """

    rank_zero_only = True
    state_key_attributes = ("root", "path")

    def __init__(
        self,
        root: str = "http://localhost:9000",
        path: str = "/publish/epoch/end/",
        field: str = "data",
        headers: dict[str, str] | None = None,
        send_as_json: bool = False,
        timeout: float = 5.0,
    ) -> None:
        self.root = root
        self.path = path
        self.field = field
        self.headers = dict(headers or {})
        self.send_as_json = send_as_json
        self.timeout = timeout

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        send: dict[str, Any] = {"epoch": epoch}
        for key, value in (logs or {}).items():
            send[key] = _plain(value)
        if self.send_as_json:
            body = json.dumps(send).encode()
            content_type = "application/json"
        else:
            body = urllib.parse.urlencode({self.field: json.dumps(send)}).encode()
            content_type = "application/x-www-form-urlencoded"
        url = self.root + self.path
        request = urllib.request.Request(
            url, data=body, method="POST", headers={"Content-Type": content_type, **self.headers}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                response.read()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            warnings.warn(
                f"RemoteMonitor: could not send epoch {epoch + 1}'s logs to {url} ({exc}); "
                "training goes on.",
                RuntimeWarning,
                stacklevel=2,
            )


def _plain(value: Any) -> Any:
    """``value`` as JSON can hold it: Python numbers, booleans, strings, None and lists."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.ndarray, np.generic, torch.Tensor)):  # Keras: .item()
        count = value.numel() if isinstance(value, torch.Tensor) else value.size
        return value.item() if count == 1 else value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)
