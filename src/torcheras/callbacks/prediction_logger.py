"""PredictionLogger: what the model predicts on validation data, and where it is most wrong,
collected during the validation pass itself."""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any

import torch
from torch import Tensor

from torcheras import checkpoint, images
from torcheras.callbacks.callback import Callback

__all__ = ["PredictionLogger"]

FIELDS = ["epoch", "kind", "index", "target", "prediction", "score"]


class PredictionLogger(Callback):
    """After every ``every_n_epochs``-th validation, write to ``directory/predictions.csv``
    the first ``num_samples`` validation samples with their targets and predictions, and the
    ``num_worst`` worst ones: the misclassified samples with the largest margin of error
    (classification), or the largest absolute errors (regression). For image inputs the
    worst samples also go to ``directory/worst_epoch{E}.png`` and, with ``log_dir``, to
    TensorBoard (run ``predictions``, with the true and predicted classes as text).

    The outputs come from the validation pass that ``fit`` runs anyway (no second pass): each
    batch keeps its worst candidates on the device (a ``topk``, no synchronisation) and they
    are read once, at the end of the validation.

    CSV columns: ``epoch`` (1-based), ``kind`` (``sample``, ``misclassified`` or ``worst``),
    ``index`` (position in the validation data), ``target``, ``prediction`` (the class, or
    the values as a JSON list), ``score`` (classification: the output of the true class minus
    the best other one, negative when wrong; regression: the mean absolute error).

    Args:
        directory: where ``predictions.csv`` and the image grids go: a folder, or a URL
            such as ``"s3://bucket/run/predictions"`` (through fsspec; the CSV object is
            rewritten whole at each logged epoch). TensorBoard's ``log_dir`` stays local.
        every_n_epochs: log every N-th validation.
        num_samples: the first N validation samples, the same ones every epoch.
        num_worst: how many of the worst samples.
        task: ``"auto"`` (from the compiled loss: cross-entropies classify), ``"classification"``
            or ``"regression"``.
        log_dir: a TensorBoard folder for the image grids.

    Under torchrun, rank 0 logs its part of the validation data.

    Example:
        ```python
        model.fit(x, y, validation_split=0.2, epochs=10,
                  callbacks=[PredictionLogger("runs/a/predictions", every_n_epochs=5)])
        ```
    """

    rank_zero_only = True
    state_key_attributes = ("directory",)

    def __init__(
        self,
        directory: str | os.PathLike[str],
        every_n_epochs: int = 1,
        num_samples: int = 16,
        num_worst: int = 16,
        task: str = "auto",
        log_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if task not in ("auto", "classification", "regression"):
            raise ValueError(
                f"PredictionLogger: `task` must be 'auto', 'classification' or 'regression'; "
                f"got {task!r}."
            )
        for name, value in (("every_n_epochs", every_n_epochs), ("num_samples", num_samples),
                            ("num_worst", num_worst)):  # fmt: skip
            if not isinstance(value, int) or value < (1 if name == "every_n_epochs" else 0):
                raise ValueError(f"PredictionLogger: `{name}` must be a non-negative integer.")
        self.directory = checkpoint.location(directory)
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.num_worst = num_worst
        self.task = task
        self.log_dir = (
            None
            if log_dir is None
            else checkpoint.local_folder(log_dir, "PredictionLogger(log_dir=...)")
        )
        self.csv_path = checkpoint.join(self.directory, "predictions.csv")
        self._in_fit = False
        self._collecting = False  # this validation pass is one to log
        self._writer: Any = None
        self._rows_written, self._resumed, self._file_ready = 0, False, False
        self._reset()

    def _reset(self) -> None:
        self._seen = 0  # validation samples so far in this pass
        self._samples: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        self._worst: list[tuple[Tensor, Tensor, Tensor, Tensor, Any]] = []

    # --- hooks ---------------------------------------------------------------------------------
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._in_fit = True
        self._rows_written, self._resumed, self._file_ready = 0, False, False

    def _prepare_file(self) -> None:
        """A new fit starts the file anew; a resumed one keeps the rows written before its
        backup and drops those of the epochs it runs again."""
        kept: list[list[str]] = []
        if self._resumed and checkpoint.exists(self.csv_path):
            text = checkpoint.read_bytes(self.csv_path).decode("utf-8")
            kept = list(csv.reader(io.StringIO(text, newline="")))[1 : 1 + self._rows_written]
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(FIELDS)
        writer.writerows(kept)
        checkpoint.atomic_write(self.csv_path, lambda f: f.write(text.getvalue().encode("utf-8")))
        self._file_ready = True

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self._rows_written}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rows_written, self._resumed = int(state["rows"]), True

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._in_fit = False
        self._close()

    def on_exception(self, exception: BaseException) -> None:
        self._in_fit = self._collecting = False
        self._close()

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        loop = getattr(self.model, "loop", None)
        if not self._in_fit or loop is None or (loop.epoch + 1) % self.every_n_epochs:
            return
        self._reset()
        self._classify = self._is_classification()
        self._collecting = True

    def on_test_batch_outputs(self, batch: int, x: Any, y: Any, y_pred: Any) -> None:
        if self._collecting:
            self._collect(x, y, y_pred)

    def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
        if not self._collecting:
            return
        self._collecting = False
        self._write(self.model.loop.epoch)

    # --- collecting, on the device -------------------------------------------------------------
    def _is_classification(self) -> bool:
        if self.task != "auto":
            return self.task == "classification"
        loss = getattr(self.model, "compiled_loss", None)
        return getattr(loss, "target", None) in ("sparse", "categorical", "binary")

    def _collect(self, x: Any, y: Any, y_pred: Any) -> None:
        if not isinstance(y_pred, Tensor) or not isinstance(y, Tensor):
            return  # several outputs: not handled
        y_pred = y_pred.detach().float()
        n = y_pred.shape[0]
        index = torch.arange(self._seen, self._seen + n, device=y_pred.device)
        self._seen += n
        if self._classify:
            target, prediction, score = self._classes(y, y_pred)
        else:
            target = y.detach().float().reshape(n, -1)
            prediction = y_pred.reshape(n, -1)
            score = (prediction - target).abs().mean(dim=1)
        wanted = self.num_samples - sum(len(s[0]) for s in self._samples)
        if wanted > 0:
            self._samples.append(
                (index[:wanted], target[:wanted], prediction[:wanted], score[:wanted])
            )
        if self.num_worst:
            k = min(self.num_worst, n)  # worst first: lowest margin, or largest error
            picked = (-score if self._classify else score).topk(k).indices
            inputs = x[picked] if images.is_image_batch(x) else None
            self._worst.append(
                (index[picked], target[picked], prediction[picked], score[picked], inputs)
            )

    def _classes(self, y: Tensor, y_pred: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n = y_pred.shape[0]
        if y_pred.dim() == 1 or y_pred.shape[-1] == 1:  # binary: one output
            out = y_pred.reshape(n)
            logits = getattr(self.model.compiled_loss, "output_kind", None) == "logits"
            threshold = 0.0 if logits else 0.5
            prediction = (out > threshold).long()
            target = y.reshape(n).round().long()
            signed = torch.where(target == 1, out - threshold, threshold - out)
            return target, prediction, signed
        if y.dim() == y_pred.dim() and y.shape == y_pred.shape:
            target = y.argmax(dim=-1)  # one-hot
        else:
            target = y.reshape(n).long()
        true = y_pred.gather(1, target.view(n, 1)).view(n)
        others = y_pred.scatter(1, target.view(n, 1), float("-inf")).max(dim=1).values
        return target, y_pred.argmax(dim=-1), true - others

    # --- writing, once per logged validation ---------------------------------------------------
    def _write(self, epoch: int) -> None:
        rows: list[list[Any]] = []
        for index, target, prediction, score in self._samples:
            rows += self._rows(epoch, "sample", index, target, prediction, score)
        worst_inputs = None
        if self._worst:
            index, target, prediction, score = (
                torch.cat([w[i] for w in self._worst]) for i in range(4)
            )
            k = min(self.num_worst, len(score))
            order = (-score if self._classify else score).topk(k).indices
            if self._classify:
                order = order[score[order] < 0]  # misclassified only (one read, here)
            kind = "misclassified" if self._classify else "worst"
            rows += self._rows(epoch, kind, index[order], target[order], prediction[order],
                               score[order])  # fmt: skip
            if all(w[4] is not None for w in self._worst) and len(order):
                worst_inputs = torch.cat([w[4] for w in self._worst])[order]
                labels = [f"{t}→{p}" for t, p in zip(target[order].tolist(),
                                                     prediction[order].tolist())]  # fmt: skip
        if not self._file_ready:
            self._prepare_file()
        text = io.StringIO()
        csv.writer(text).writerows(rows)
        checkpoint.append_whole(self.csv_path, text.getvalue().encode("utf-8"))
        self._rows_written += len(rows)
        if worst_inputs is not None:
            self._write_images(epoch, worst_inputs, labels)
        self._reset()

    def _rows(self, epoch: int, kind: str, index: Tensor, target: Tensor, prediction: Tensor,
              score: Tensor) -> list[list[Any]]:  # fmt: skip
        def value(t: Tensor) -> Any:
            v = t.tolist()
            return json.dumps([round(e, 6) for e in v]) if isinstance(v, list) else v

        return [
            [epoch + 1, kind, int(i), value(t), value(p), round(float(s), 6)]
            for i, t, p, s in zip(index.cpu(), target.cpu(), prediction.cpu(), score.cpu())
        ]

    def _write_images(self, epoch: int, inputs: Tensor, labels: list[str]) -> None:
        grid = images.make_grid(inputs, nrow=8)
        images.save_png(grid, checkpoint.join(self.directory, f"worst_epoch{epoch + 1:03d}.png"),
                        scale=max(1, 64 // inputs.shape[-1]))  # fmt: skip
        if self.log_dir is not None:
            with checkpoint.naming_file_errors(self.log_dir / "predictions", "write images to"):
                if self._writer is None:
                    from torch.utils.tensorboard import SummaryWriter

                    self._writer = SummaryWriter(str(self.log_dir / "predictions"))
                self._writer.add_image("worst", grid, epoch, dataformats="HWC")
                self._writer.add_text("worst (target→prediction)", ", ".join(labels), epoch)
                self._writer.flush()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
