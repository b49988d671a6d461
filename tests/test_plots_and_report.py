"""History.plot, `torcheras plot RUN.csv` and `torcheras report RUN_DIR`, read back as a user
would see them: PNG files decoded, the figure's panels and marks, the HTML page's content."""

from __future__ import annotations

import base64
import csv
import html
import io
import re

import pytest
import torch
from conftest import make_model

import torcheras
from torcheras import callbacks as cb
from torcheras import cli, plots

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")


@pytest.fixture
def run(blobs, tmp_path):
    """A run that stops early, with a CSV log, a best checkpoint and a saved history."""
    x, y = blobs
    model = make_model()
    model.compile(torch.optim.SGD(model.parameters(), lr=0.05), "sparse_categorical_crossentropy",
                  metrics=["accuracy"], device="cpu")  # fmt: skip
    history = model.fit(
        x, y, epochs=30, batch_size=16, validation_split=0.25, verbose=0,
        callbacks=[
            cb.CSVLogger(tmp_path / "log.csv"),
            cb.ModelCheckpoint(tmp_path / "best.pt", save_best_only=True),
            cb.EarlyStopping(patience=2, min_delta=0.02, restore_best_weights=True),
            cb.ReduceLROnPlateau(patience=1, factor=0.5),
        ],
    )  # fmt: skip
    assert history.stop_reason is not None  # the fixture is meant to stop early
    history.save(tmp_path / "history.json")
    return history, tmp_path


def decoded(png: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(png))
    image.load()
    assert image.format == "PNG"
    return image.size


def test_history_plot_draws_every_metric_the_rate_and_marks_best_and_stop(run):
    history, folder = run
    figure = history.plot(folder / "curves.png")
    width, height = decoded((folder / "curves.png").read_bytes())
    assert width > 600 and height > 250
    axes = {ax.get_title(): ax for ax in figure.axes if ax.get_visible()}
    assert set(axes) == {"loss", "accuracy", "learning rate"}
    lines = {line.get_label(): line for line in axes["loss"].get_lines()}
    epochs = [e + 1 for e in history.epoch]
    assert list(lines["train"].get_xdata()) == epochs
    assert list(lines["validation"].get_ydata()) == history.history["val_loss"]
    best = 1 + history.history["val_loss"].index(min(history.history["val_loss"]))
    marks = {line.get_linestyle(): line.get_xdata()[0] for line in axes["accuracy"].get_lines()}
    assert marks[":"] == best and marks["--"] == epochs[-1]  # best, and where it stopped
    assert axes["learning rate"].get_yscale() == "log"
    assert figure._suptitle.get_text() == f"Stopped: {history.stop_reason}"


def test_the_plot_command_reads_a_csvlogger_file(run):
    history, folder = run
    assert cli.main(["plot", str(folder / "log.csv"), "-o", str(folder / "from_csv.png")]) == 0
    decoded((folder / "from_csv.png").read_bytes())
    curves = plots.curves_from_csv(folder / "log.csv")
    for key, values in history.history.items():
        assert curves[key][1] == pytest.approx(values, rel=1e-6), key


def test_validation_every_other_epoch_is_drawn_where_it_was_measured(blobs, tmp_path):
    x, y = blobs
    history = make_model().fit(
        x, y, epochs=4, validation_split=0.25, validation_freq=2, verbose=0,
        callbacks=[cb.CSVLogger(tmp_path / "log.csv")],
    )  # fmt: skip
    from_history = plots.curves_from_history(history.history, history.epoch)
    from_csv = plots.curves_from_csv(tmp_path / "log.csv")
    assert from_history["val_loss"][0] == from_csv["val_loss"][0] == [2, 4]


def test_the_report_is_one_page_with_plots_metrics_reason_settings_and_checkpoints(run, capsys):
    history, folder = run
    assert cli.main(["report", str(folder)]) == 0
    page = (folder / "report.html").read_text()
    assert str(folder / "report.html") in capsys.readouterr().out
    assert history.stop_reason in page
    image = re.search(r'src="data:image/png;base64,([^"]+)"', page)
    assert image is not None  # embedded: the page is self-contained
    decoded(base64.b64decode(image.group(1)))
    assert "best.pt" in page and "log.csv" not in re.findall(r"<td>([^<]*)</td>", page)
    cells = re.findall(r"<td>([^<]*)</td>", page)
    assert cells[cells.index("lr") + 1] == "0.05"  # the rate training started with
    assert cells[cells.index("optimizer") + 1] == "SGD"
    final_loss = cells[cells.index("val_loss") + 1]
    assert float(final_loss) == pytest.approx(history.history["val_loss"][-1], rel=1e-5)
    with open(folder / "log.csv") as f:
        assert len(list(csv.DictReader(f))) == len(history.epoch)


def test_report_and_plot_fail_clearly_without_a_log(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "No training log" in capsys.readouterr().err
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    assert cli.main(["plot", str(tmp_path / "other.csv")]) == 2
    assert "no 'epoch' column" in capsys.readouterr().err


def test_a_report_of_one_epoch_says_1_epoch(blobs, tmp_path):
    x, y = blobs
    make_model().fit(x, y, epochs=1, verbose=0, callbacks=[cb.CSVLogger(tmp_path / "log.csv")])
    assert cli.main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "<p>1 epoch, logs from" in page


def test_the_report_shows_why_a_run_stopped_without_a_saved_history(blobs, tmp_path, capsys):
    """CSVLogger + TensorBoard + EarlyStopping, nothing saved by hand: the CSV's sidecar
    (and TensorBoard's text) hold the stop reason, and ``torcheras report`` shows it."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = blobs
    history = make_model().fit(
        x, y, epochs=30, batch_size=16, validation_split=0.25, verbose=0,
        callbacks=[
            cb.CSVLogger(tmp_path / "log.csv"),
            cb.TensorBoard(tmp_path / "tb"),
            cb.EarlyStopping(patience=1, min_delta=0.5),
        ],
    )  # fmt: skip
    assert history.stop_reason and history.stop_reason.startswith("EarlyStopping")
    assert not list(tmp_path.glob("history*.json"))
    assert cli.main(["report", str(tmp_path)]) == 0
    assert str(tmp_path / "report.html") in capsys.readouterr().out
    page = (tmp_path / "report.html").read_text()
    stopped = re.search(r'<p class="stop"><b>Stopped:</b> ([^<]*)</p>', page)
    assert stopped is not None and stopped.group(1) == html.escape(history.stop_reason)
    cells = re.findall(r"<td>([^<]*)</td>", page)
    assert cells[cells.index("optimizer") + 1] == "KerasAdam"  # the hyper-parameters came too
    events = EventAccumulator(str(tmp_path / "tb" / "train"), size_guidance={"tensors": 0})
    events.Reload()
    (text,) = events.Tensors("stop_reason/text_summary")
    assert text.tensor_proto.string_val[0].decode() == history.stop_reason
    assert text.step == history.epoch[-1]


def test_the_report_says_every_epoch_ran_from_the_csv_alone(blobs, tmp_path):
    x, y = blobs
    make_model().fit(x, y, epochs=2, verbose=0, callbacks=[cb.CSVLogger(tmp_path / "log.csv")])
    assert cli.main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "Every epoch ran (no early stop)." in page and "Stopped:" not in page


def test_a_metric_of_several_values_is_shown_value_by_value_everywhere(tmp_path, capsys):
    """F1Score() per class (Keras's default): the bar, History's plot, the report and
    TensorBoard show each class's value; none of them crashes or drops it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from torcheras import metrics
    from torcheras.report import write_report

    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    model = torcheras.Model(torch.nn.Linear(4, 3))
    model.compile("adam", "sparse_categorical_crossentropy", metrics=[metrics.F1Score()])
    history = model.fit(
        x, y, epochs=2, validation_split=0.25, verbose=2,
        callbacks=[cb.TensorBoard(tmp_path / "tb"), cb.CSVLogger(tmp_path / "log.csv")],
    )  # fmt: skip
    per_class = history.history["f1_score"][-1]
    assert isinstance(per_class, list) and len(per_class) == 3
    shown = ", ".join(f"{v:.4f}" for v in per_class)
    assert f"f1_score: [{shown}]" in capsys.readouterr().out
    history.plot(tmp_path / "curves.png")
    history.save(tmp_path / "history.json")
    assert "f1_score[2]" in write_report(tmp_path).read_text()
    events = EventAccumulator(str(tmp_path / "tb" / "train"))
    events.Reload()
    assert {"epoch_f1_score/0", "epoch_f1_score/2"} <= set(events.Tags()["scalars"])
    value = events.Scalars("epoch_f1_score/1")[-1].value
    assert value == pytest.approx(per_class[1], rel=1e-6)
