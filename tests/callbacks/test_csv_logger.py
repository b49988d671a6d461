"""CSVLogger: columns, NA, append, separator, files closed on errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import drive, make_model

from torcheras.callbacks import Callback, CSVLogger, LambdaCallback


def _rows(path, sep=","):
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter=sep))


def test_one_row_per_epoch_zero_based_sorted_columns(tmp_path, blobs):
    x, y = blobs
    path = tmp_path / "log.csv"
    history = make_model().fit(
        x, y, epochs=3, validation_split=0.2, verbose=0, callbacks=[CSVLogger(path)]
    )
    rows = _rows(path)
    assert rows[0] == ["epoch", "accuracy", "learning_rate", "loss", "val_accuracy", "val_loss"]
    assert [r[0] for r in rows[1:]] == ["0", "1", "2"]
    assert [float(r[3]) for r in rows[1:]] == history.history["loss"]


def test_validation_freq_gives_na_and_val_columns_added_up_front(tmp_path, blobs):
    x, y = blobs
    path = tmp_path / "log.csv"
    make_model(metrics=[]).fit(
        x,
        y,
        epochs=3,
        validation_data=(x, y),
        validation_freq=2,
        verbose=0,
        callbacks=[CSVLogger(path)],
    )
    rows = _rows(path)
    assert rows[0] == ["epoch", "learning_rate", "loss", "val_loss"]
    assert rows[1][3] == "NA" and rows[2][3] != "NA" and rows[3][3] == "NA"


def test_without_validation_no_val_learning_rate_anywhere(tmp_path, blobs):
    """Keras adds a val_ column for every key when the first epoch did not validate, even
    val_learning_rate; the learning rate is no metric, and nothing else logs it with val_."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from torcheras.callbacks import TensorBoard

    x, y = blobs
    path = tmp_path / "log.csv"
    history = make_model().fit(
        x, y, epochs=2, verbose=0, callbacks=[CSVLogger(path), TensorBoard(tmp_path / "tb")]
    )
    rows = _rows(path)
    assert rows[0] == ["epoch", "accuracy", "learning_rate", "loss", "val_accuracy", "val_loss"]
    assert [r[4:] for r in rows[1:]] == [["NA", "NA"], ["NA", "NA"]]
    assert sorted(history.history) == ["accuracy", "learning_rate", "loss"]
    tags = set()
    for run in (tmp_path / "tb").iterdir():
        events = EventAccumulator(str(run))
        events.Reload()
        tags.update(events.Tags()["scalars"])
    assert "epoch_learning_rate" in tags and not any("val" in tag for tag in tags)


def test_append_writes_no_second_header_and_separator(tmp_path):
    path = tmp_path / "log.tsv"
    drive(CSVLogger(path, separator="\t"), [0.5, 0.4])
    drive(CSVLogger(path, separator="\t", append=True), [0.3])
    rows = _rows(path, "\t")
    assert rows[0][0] == "epoch" and [r[0] for r in rows[1:]] == ["0", "1", "0"]
    assert sum(1 for r in rows if r[0] == "epoch") == 1
    drive(CSVLogger(path, separator="\t"), [0.9])  # no append: overwritten
    assert len(_rows(path, "\t")) == 2


def test_keys_fixed_at_first_epoch_and_non_scalars(tmp_path):
    path = tmp_path / "log.csv"
    logger = CSVLogger(path)
    extra = iter([{"v": [1, 2, 3], "t": "txt", "z": np.array(2.5)}, {"late": 1.0}])
    cb = LambdaCallback(on_epoch_end=lambda e, logs: logs.update(next(extra)))
    from torcheras.callbacks import CallbackList

    cbs = CallbackList([cb, logger], model=make_model(), epochs=2)
    cbs.on_train_begin()
    for epoch in range(2):
        cbs.on_epoch_begin(epoch)
        cbs.on_epoch_end(epoch, {"loss": 0.5})
    cbs.on_train_end()
    rows = _rows(path)
    assert rows[0] == ["epoch", "loss", "t", "v", "z", "val_loss", "val_t", "val_v", "val_z"]
    assert rows[1][1:5] == ["0.5", "txt", '"[1, 2, 3]"', "2.5"]
    assert rows[2][2:5] == ["NA", "NA", "NA"] and "late" not in rows[0]


def test_file_closed_when_an_exception_leaves_fit(tmp_path, blobs):
    x, y = blobs
    path = tmp_path / "log.csv"
    logger = CSVLogger(path)

    class FailSecondEpoch(Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        make_model().fit(x, y, epochs=3, verbose=0, callbacks=[logger, FailSecondEpoch()])
    assert logger._file is None
    assert len(_rows(path)) == 2  # header + the finished epoch, flushed


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"filename": ""}, "`filename` is empty"),
        ({"filename": "a.csv", "separator": ";;"}, "`separator` must be one character"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CSVLogger(**kwargs)


def test_an_unwritable_path_fails_before_the_first_batch(tmp_path, blobs):
    x, y = blobs
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the folder should be")
    batches = []
    probe = LambdaCallback(on_train_batch_begin=lambda b, logs: batches.append(b))
    with pytest.raises(OSError):
        make_model().fit(
            x, y, epochs=1, verbose=0, callbacks=[CSVLogger(blocker / "log.csv"), probe]
        )
    assert batches == []


def test_a_fresh_run_overwrites_and_append_keeps_the_earlier_rows(tmp_path, blobs):
    x, y = blobs
    path = tmp_path / "log.csv"
    make_model().fit(x, y, epochs=2, verbose=0, callbacks=[CSVLogger(path)])
    make_model().fit(x, y, epochs=3, verbose=0, callbacks=[CSVLogger(path)])
    with open(path, newline="") as f:
        assert [r[0] for r in csv.reader(f)] == ["epoch", "0", "1", "2"]
    make_model().fit(x, y, epochs=1, verbose=0, callbacks=[CSVLogger(path, append=True)])
    with open(path, newline="") as f:
        assert [r[0] for r in csv.reader(f)] == ["epoch", "0", "1", "2", "0"]


def test_the_summary_beside_the_log_is_rewritten_only_when_it_changes(tmp_path, blobs):
    """``log.csv.json`` (why training stopped, fit's parameters, the hyper-parameters): a fit
    called again with the same settings (an epoch a call) leaves the file as it is, not
    rewritten; a summary edited or removed meanwhile is written again, and one whose content
    changed (other parameters) replaces it."""
    x, y = blobs
    model = make_model(optimizer="sgd")  # (Keras's Adam's epsilon moves with its steps)
    logger = CSVLogger(tmp_path / "log.csv", append=True)
    summary = tmp_path / "log.csv.json"

    def fit(epochs=1):
        model.fit(x, y, epochs=epochs, verbose=0, callbacks=[logger])
        return json.loads(summary.read_text())

    first = fit()
    assert first["log"] == "log.csv" and first["stop_reason"] is None
    assert first["params"]["epochs"] == 1
    inode = summary.stat().st_ino
    assert fit() == first
    assert summary.stat().st_ino == inode  # the same content: left as it was
    summary.write_text("{}")
    assert fit() == first
    written = summary.read_bytes()
    summary.write_bytes(written + b"\n")  # the same and more: rewritten too
    assert fit() == first and summary.read_bytes() == written
    summary.unlink()
    assert fit() == first
    changed = fit(epochs=2)
    assert (
        changed["params"]["epochs"] == 2 and changed["hyperparameters"] == first["hyperparameters"]
    )
    assert [r[0] for r in _rows(tmp_path / "log.csv")[1:]] == ["0"] * 5 + ["0", "1"]
