"""CSVLogger: one CSV row per epoch."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable
from typing import IO, Any

import numpy as np

from torcheras import checkpoint
from torcheras.callbacks.callback import Callback
from torcheras.callbacks.history import hyperparameters

__all__ = ["CSVLogger"]


class CSVLogger(Callback):
    """Write each epoch's logs to a CSV file, flushed row by row.

    Args:
        filename: the CSV file (folders are created), or a URL such as
            ``"s3://bucket/run/log.csv"`` (through fsspec). An object store cannot append: the
            log is kept in memory and the object rewritten whole, by one PUT, at each epoch.
        separator: the field separator. Default ``","``.
        append: add to an existing file (no second header). Default False: overwrite.

    The columns are ``epoch`` (0-based) and the sorted log keys of the first epoch (with a
    ``val_`` column for each metric when the first epoch had no validation; the learning rate
    is no metric and has no ``val_learning_rate`` column, which Keras writes); they stay fixed,
    and a value missing in a later epoch is written as ``NA``. The file is opened when training
    begins (an unwritable path fails at once), and closed at the end of training and when an
    exception leaves ``fit``. A run resumed by BackupAndRestore cuts the file back to the backup,
    so every epoch has one row. When training ends, ``<filename>.json`` beside it records why
    training stopped (``History.stop_reason``, null when every epoch ran), ``fit``'s parameters
    and the model's hyper-parameters: ``torcheras report`` shows them.

    With ``fit(validation_interval=N)``, every validation (mid-epoch ones and the epochs'
    ends) is also written to ``validation_filename``, ``<name>.validation.csv`` beside it
    (``log.csv`` -> ``log.validation.csv``): columns ``step`` (optimizer steps done),
    ``epoch`` (0-based) and the ``val_*`` keys, one row per validation, resumed exactly too.

    Example:
        ```python
        model.fit(x, y, epochs=10, validation_split=0.2, callbacks=[CSVLogger("log.csv")])
        rows = list(csv.DictReader(open("log.csv")))
        ```
    """

    state_key_attributes = ("filename",)

    rank_zero_only = True

    def __init__(
        self, filename: str | os.PathLike[str], separator: str = ",", append: bool = False
    ) -> None:
        if not str(filename):
            raise ValueError("CSVLogger: `filename` is empty; pass a path such as 'log.csv'.")
        if not isinstance(separator, str) or len(separator) != 1:
            raise ValueError(f"CSVLogger: `separator` must be one character; got {separator!r}.")
        self.filename = os.fspath(filename)
        self.sep = separator
        self.append = append
        self.keys: list[str] | None = None
        self._file: IO[bytes] | None = None
        self._writer: csv.DictWriter | None = None
        self._buffer = io.StringIO()
        self._resume_offset: int | None = None
        self._start_offset = 0
        self._started = False
        root, ext = os.path.splitext(self.filename)
        self.validation_filename = f"{root}.validation{ext or '.csv'}"
        self._index = "epoch"  # the first column: "step" for the validation file
        self._validations: CSVLogger | None = None  # fit(validation_interval=N)'s rows

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        """Open the file now, so an unwritable path fails before the first batch. It is
        truncated (unless ``append``) at the first row: a resumed run first learns where."""
        self._close()
        self.keys = None
        self._resume_offset = None
        where = checkpoint.location(self.filename)
        if isinstance(where, str):  # a URL: read (if there) and written back at once
            self._file = checkpoint.ObjectAppender(where)  # type: ignore[assignment]
        else:
            folder = os.path.dirname(where)
            with checkpoint.naming_file_errors(self.filename, "open"):
                if folder:
                    os.makedirs(folder, exist_ok=True)
                # Unbuffered: a row reaches the file whole or, cut short by a full disk, is
                # cut back off; nothing is left in a buffer to be written half later.
                self._file = open(where, "ab", buffering=0)  # noqa: SIM115 - see _close
        self._start_offset = self._file.tell() if self.append else 0
        self._started = False
        self._hyperparameters = hyperparameters(self.model) if self.model is not None else {}
        self._validations = None
        if self.params.get("validation_interval"):
            rows = CSVLogger(self.validation_filename, self.sep, self.append)
            rows._index = "step"
            rows.on_train_begin()
            self._validations = rows

    def _start(self) -> None:
        """Before the first row: cut the file to where this run (or the resumed one) began."""
        offset = self._start_offset if self._resume_offset is None else self._resume_offset
        with checkpoint.naming_file_errors(self.filename):
            self._file.truncate(offset)  # type: ignore[union-attr]
            self._file.seek(offset)  # type: ignore[union-attr]
            header = offset == 0 or not _first_line(self._file, self.filename)
        self._buffer = io.StringIO()
        self._writer = csv.DictWriter(
            self._buffer,
            fieldnames=[self._index, *self.keys],  # type: ignore[misc]
            delimiter=self.sep,
            extrasaction="ignore",
        )
        if header:
            self._writer.writeheader()
            self._write_whole()
        self._started = True

    def _write_whole(self) -> None:
        """Write the buffered rows whole or not at all (a full disk: cut back off, raised
        naming the file)."""
        data = self._buffer.getvalue().encode("utf-8")
        self._buffer.seek(0)
        self._buffer.truncate()
        checkpoint.write_whole(self._file, data, self.filename)  # type: ignore[arg-type]

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        if self.keys is None:
            self.keys = sorted(logs)
            if not any(k.startswith("val_") for k in self.keys):
                self.keys += [f"val_{k}" for k in self.keys if k != "learning_rate"]
        if self._file is None:  # driven without on_train_begin
            self.on_train_begin()
        if not self._started:
            self._start()
        row = {self._index: epoch, **{k: _cell(logs[k]) if k in logs else "NA" for k in self.keys}}
        self._writer.writerow(row)  # type: ignore[union-attr]
        self._write_whole()

    def on_validation_end(self, step: int, logs: dict[str, Any] | None = None) -> None:
        if self._validations is not None:
            epoch = getattr(getattr(self.model, "loop", None), "epoch", None)
            self._validations.on_epoch_end(step, {"epoch": epoch, **(logs or {})})

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._writer = None
        if self._validations is not None:
            self._validations._close()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._close()
        self._write_summary()

    def _write_summary(self) -> None:
        """``<filename>.json``: why training stopped, ``fit``'s parameters and the model's
        hyper-parameters as training began (what ``History.save`` writes besides the logs).
        A local file that already holds exactly this is left as it is (its time too)."""
        history = getattr(self.model, "history", None) if self.model is not None else None
        record = {
            "log": os.path.basename(self.filename),
            "stop_reason": getattr(history, "stop_reason", None),
            "params": {k: v for k, v in self.params.items() if _is_plain(v)},
            "hyperparameters": getattr(self, "_hyperparameters", {}),
        }
        data = json.dumps(record, indent=2, default=str).encode()
        path = f"{self.filename}.json"
        if not checkpoint.is_url(path) and _holds(path, data):
            return  # fit called again (an epoch a call, say): the same summary is there
            # (temp files of an interrupted earlier write stay until the next real write)
        checkpoint.atomic_write(path, lambda f: f.write(data))

    def on_exception(self, exception: BaseException) -> None:
        self._close()

    def state_dict(self) -> dict[str, Any]:
        """Where this run's rows end: a resumed run cuts the file back to it."""
        if self._file is not None and self._started:
            offset = self._file.tell()
        elif self._resume_offset is not None:
            offset = self._resume_offset
        else:
            offset = getattr(self, "_start_offset", 0)
        state: dict[str, Any] = {"keys": self.keys, "offset": offset}
        if self._validations is not None:
            state["validations"] = self._validations.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.keys = state["keys"]
        self._resume_offset = state["offset"]
        self._started = False
        if self._validations is not None and "validations" in state:
            self._validations.load_state_dict(state["validations"])


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _holds(path: str, data: bytes) -> bool:
    """Whether the local file ``path`` holds exactly ``data`` (read back whole: cheaper than
    an atomic rewrite, whose fsyncs cost a millisecond)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(data) + 1) == data
    except OSError:
        return False


def _first_line(handle: Any, path: str) -> str:
    if isinstance(handle, checkpoint.ObjectAppender):  # a URL's content, kept in memory
        return handle.getvalue().split(b"\n", 1)[0].decode("utf-8").strip()
    with open(checkpoint.location(path), encoding="utf-8") as f:
        return f.readline().strip()


def _cell(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    if isinstance(value, Iterable):
        return f'"[{", ".join(map(str, value))}]"'
    return value
