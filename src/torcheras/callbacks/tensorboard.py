"""TensorBoard: event files that TensorBoard reads, written without TensorFlow."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import struct
import time
import uuid
import warnings
from collections.abc import Callable
from typing import Any

import torch

from torcheras import checkpoint
from torcheras.callbacks.callback import Callback

__all__ = ["TensorBoard"]


def _naming_file_errors(hook: Callable[..., None]) -> Callable[..., None]:
    """A hook whose event writes fail (a full disk, a read-only folder: raised by the event
    writer's thread at the next write) raises naming the log folder, the cause and the fix."""

    @functools.wraps(hook)
    def wrapped(self: TensorBoard, *args: Any, **kwargs: Any) -> None:
        with checkpoint.naming_file_errors(self.log_dir, "write TensorBoard events to"):
            hook(self, *args, **kwargs)

    return wrapped


def _parse_profile_batch(profile_batch: Any) -> tuple[int, int] | None:
    error = ValueError(
        "profile_batch must be a non-negative integer or 2-tuple of positive integers. A pair "
        "of positive integers signifies a range of batches to profile. "
        f"Found: {profile_batch!r}"
    )
    value = profile_batch
    if isinstance(value, str):
        try:
            value = tuple(int(v) for v in value.split(","))
        except ValueError:
            raise error from None
    if isinstance(value, bool):
        raise error
    if isinstance(value, int):
        if value < 0:
            raise error
        return None if value == 0 else (value, value)
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        start, stop = value
        if 0 <= start <= stop:
            return None if stop == 0 else (max(start, 1), stop)
    raise error


class TensorBoard(Callback):
    """Write TensorBoard logs: scalars, histograms, images, the graph, embeddings, profiles.

    Args:
        log_dir: the root folder; runs go to ``log_dir/train`` and ``log_dir/validation``.
            A local folder: URLs (``s3://``) are refused, since event files grow as training
            goes; copy the folder to the store after training.
        histogram_freq: every N epochs, histograms of the weights and of their gradients
            (0: never).
        write_graph: the model's graph, traced from a training batch at the end of epoch 1.
        write_images: weights as images (with ``histogram_freq``).
        write_steps_per_second: ``epoch_steps_per_second`` (and ``batch_`` at batch level).
        update_freq: ``"epoch"``, ``"batch"`` or N: also write ``batch_*`` scalars every N
            batches (1-based global step; reading them costs one device sync each time).
        profile_batch: profile batches ``(start, stop)`` (1-based) with ``torch.profiler``,
            traces in ``log_dir/train``; an int profiles one batch; 0 disables.
        embeddings_freq: every N epochs, write the weights of each ``nn.Embedding`` for the
            projector (0: never), as ``log_dir/train/embeddings/<layer>/tensors.tsv``.
        embeddings_metadata: as in Keras, a dict ``{layer name: metadata file}`` (or one file
            name for every embedding layer), relative to ``log_dir``; written into
            ``log_dir/projector_config.pbtxt`` when the model is set, and read by TensorBoard.

    Scalars: ``epoch_loss``, ``epoch_<metric>``, ``epoch_learning_rate`` at step = epoch
    (0-based), validation ones under ``validation`` without the ``val_`` prefix, and
    ``evaluation_<metric>_vs_iterations`` at the global batch step. When training stopped
    early, the text ``stop_reason`` (``History.stop_reason``) at the last epoch.

    Example:
        ```python
        model.fit(x, y, epochs=10, validation_split=0.2, callbacks=[TensorBoard("runs/tb")])
        # then: tensorboard --logdir runs/tb
        ```
    """

    state_key_attributes = ("log_dir",)

    rank_zero_only = True

    def __init__(
        self,
        log_dir: str | os.PathLike[str] = "logs",
        histogram_freq: int = 0,
        write_graph: bool = True,
        write_images: bool = False,
        write_steps_per_second: bool = False,
        update_freq: str | int = "epoch",
        profile_batch: int | tuple[int, int] | str = 0,
        embeddings_freq: int = 0,
        embeddings_metadata: str | dict[str, str] | None = None,
    ) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "The TensorBoard callback needs the tensorboard package: "
                "pip install 'torcheras[tensorboard]'."
            ) from exc
        for name, value in (
            ("histogram_freq", histogram_freq),
            ("embeddings_freq", embeddings_freq),
        ):
            if not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"TensorBoard: `{name}` must be a non-negative integer; got {value!r}."
                )
        if update_freq == "batch":
            update_freq = 1
        if update_freq != "epoch" and not (isinstance(update_freq, int) and update_freq > 0):
            raise ValueError(
                "TensorBoard: `update_freq` must be 'epoch', 'batch' or a positive "
                f"integer; got {update_freq!r}."
            )
        self.log_dir = os.fspath(log_dir)
        if checkpoint.is_url(self.log_dir):  # event files stay local (a file:// URL: its path)
            self.log_dir = str(checkpoint.local_folder(self.log_dir, "TensorBoard"))
        self.histogram_freq = histogram_freq
        self.write_graph = write_graph
        self.write_images = write_images
        self.write_steps_per_second = write_steps_per_second
        self.update_freq = update_freq
        self.profile_range = _parse_profile_batch(profile_batch)
        self.embeddings_freq = embeddings_freq
        self.embeddings_metadata = embeddings_metadata
        self._writers: dict[str, Any] = {}
        self._own_files: dict[str, list[str]] = {}  # event files this run wrote, per run
        # Ends the name of every event file this training run writes, kept through resumes:
        # a resume trims all of them, also those written after the backup it resumes from.
        self._run_id: str | None = None
        self._in_fit = False
        self._state: dict[str, Any] = {}
        self._global_step = 0
        self._epochs_logged = 0
        self._evaluated_step = -1  # the step of the last evaluation logged
        self._trim: tuple[int, int, int] | None = None
        self._graph_written = False
        self._profiler: Any = None
        skip = []
        if update_freq == "epoch" and self.profile_range is None:
            skip += ["on_train_batch_end", "on_train_batch_begin"]
        self.unused_hooks = tuple(skip)

    # --- writers --------------------------------------------------------------------------------
    def _writer(self, run: str) -> Any:
        if run not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            run_dir = os.path.join(self.log_dir, run)
            if self._run_id is None:
                self._run_id = uuid.uuid4().hex[:12]
            suffix = f".torcheras-{self._run_id}"
            if self._trim is not None:  # only this run's files: those it wrote before the
                ours = set(self._own_files.get(run, []))  # backup, and any written since
                if os.path.isdir(run_dir):
                    ours.update(n for n in os.listdir(run_dir) if n.endswith(suffix))
                _trim_events(run_dir, sorted(ours), *self._trim)
            writer = SummaryWriter(run_dir, filename_suffix=suffix)
            self._writers[run] = writer
            name = os.path.basename(writer.file_writer.event_writer._file_name)
            self._own_files.setdefault(run, []).append(name)
        return self._writers[run]

    def _close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers = {}
        if self._profiler is not None:
            self._profiler.stop()
            self._profiler = None

    def set_model(self, model: Any) -> None:
        super().set_model(model)
        self._close()
        self._check_embeddings()
        if self.embeddings_freq and self._embedding_layers():
            self._write_projector_config()

    def _embedding_layers(self) -> dict[str, torch.nn.Embedding]:
        model = self.model
        if not isinstance(model, torch.nn.Module):
            return {}
        return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}

    def _check_embeddings(self) -> None:
        if not self.embeddings_freq or not isinstance(self.embeddings_metadata, dict):
            return
        unknown = set(self.embeddings_metadata) - set(self._embedding_layers())
        if unknown:
            raise ValueError(
                "Unrecognized `Embedding` layer names passed to TensorBoard's "
                f"`embeddings_metadata` argument: {sorted(unknown)}. Embedding layers of this "
                f"model: {sorted(self._embedding_layers())}."
            )

    # --- hooks ----------------------------------------------------------------------------------
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._global_step = 0
        self._epochs_logged = 0
        self._trim = None
        self._graph_written = False
        self._own_files = {}
        self._run_id = None  # a new run (a resume's backup brings back its own)
        self._in_fit = True

    @_naming_file_errors
    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self.state_dict()  # keep the final position for a state_dict() after fit
        reason = getattr(getattr(self.model, "history", None), "stop_reason", None)
        if reason:  # TensorBoard's Text tab: why training stopped, at the last epoch
            self._writer("train").add_text("stop_reason", reason, max(self._epochs_logged - 1, 0))
        self._close()
        self._in_fit = False

    def on_exception(self, exception: BaseException) -> None:
        with contextlib.suppress(OSError):  # the writer's own failure may be what is leaving
            self._close()
        self._writers = {}
        self._in_fit = False

    def _loop_step(self) -> int:
        """The global training step: the loop's count in ``fit``, our own count elsewhere."""
        loop = getattr(self.model, "loop", None)
        return loop.global_step if loop is not None else self._global_step

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch_start = self._rate_start = time.perf_counter()
        self._epoch_first_step = self._rate_step = self._loop_step()

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self.profile_range is not None:
            start = self.profile_range[0]
            warmup_step = start - 1 if start > 1 else start  # one warm-up batch when possible
            if self._global_step + 1 == warmup_step:
                self._start_profiler(warmup=int(warmup_step < start))

    @_naming_file_errors
    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._global_step += 1
        step = self._global_step
        if self.update_freq != "epoch" and step % self.update_freq == 0:
            writer = self._writer("train")
            for key, value in (logs or {}).items():
                if isinstance(value, (int, float)):
                    writer.add_scalar(f"batch_{key}", value, step)
            if self.write_steps_per_second:  # steps done since the last write, over wall time
                now = time.perf_counter()
                steps = self._loop_step() - self._rate_step
                writer.add_scalar(
                    "batch_steps_per_second", steps / max(now - self._rate_start, 1e-9), step
                )
                self._rate_start, self._rate_step = now, self._loop_step()
        if self._profiler is not None:
            self._profiler.step()
            if step >= self.profile_range[1]:  # type: ignore[index]
                self._profiler.stop()
                self._profiler = None

    def _start_profiler(self, warmup: int) -> None:
        from torch.profiler import ProfilerActivity

        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        start, stop = self.profile_range  # type: ignore[misc]
        with warnings.catch_warnings():  # "no warmup" when profiling the very first batch
            warnings.simplefilter("ignore")
            self._profiler = self._make_profiler(activities, warmup, stop - start + 1)
        self._profiler.start()

    def _make_profiler(self, activities: list[Any], warmup: int, active: int) -> Any:
        from torch.profiler import profile, schedule, tensorboard_trace_handler

        return profile(
            activities=activities,
            schedule=schedule(wait=0, warmup=warmup, active=active, repeat=1),
            on_trace_ready=tensorboard_trace_handler(os.path.join(self.log_dir, "train")),
            record_shapes=True,
        )

    @_naming_file_errors
    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        train, val = {}, {}
        for key, value in _scalars(logs):
            if key.startswith("val_"):
                val[key[4:]] = value
            else:
                train[key] = value
        self._epochs_logged = epoch + 1
        writer = self._writer("train")
        for key, value in train.items():
            writer.add_scalar(f"epoch_{key}", value, epoch)
        if self.write_steps_per_second:
            steps = self._loop_step() - self._epoch_first_step
            seconds = max(time.perf_counter() - self._epoch_start, 1e-9)
            writer.add_scalar("epoch_steps_per_second", steps / seconds, epoch)
        self._write_batch_learning_rates(writer)
        if val:
            val_writer = self._writer("validation")
            for key, value in val.items():
                val_writer.add_scalar(f"epoch_{key}", value, epoch)
        if self.write_graph and not self._graph_written:
            self._write_graph()
        if self.histogram_freq and epoch % self.histogram_freq == 0:
            self._write_histograms(epoch)
        if self.embeddings_freq and epoch % self.embeddings_freq == 0:
            self._write_embeddings(epoch)
        for w in self._writers.values():
            w.flush()

    def _write_batch_learning_rates(self, writer: Any) -> None:
        """A per-batch schedule changes the rate inside the epoch: write each batch's rate."""
        loop = getattr(self.model, "loop", None)
        rates = [float(r) for r in getattr(loop, "batch_learning_rates", [])]
        if len(set(rates)) > 1:
            first = loop.global_step - len(rates)  # type: ignore[union-attr]
            for i, rate in enumerate(rates, first + 1):
                writer.add_scalar("batch_learning_rate", rate, i)

    @_naming_file_errors
    def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
        if logs:
            writer = self._writer("validation")
            for key, value in logs.items():
                if isinstance(value, (int, float)):
                    writer.add_scalar(f"evaluation_{key}_vs_iterations", value, self._loop_step())
            self._evaluated_step = self._loop_step()
        if not self._in_fit:  # a standalone evaluate: nothing else will close the writer
            self._close()

    # --- heavier summaries ----------------------------------------------------------------------
    def _write_graph(self) -> None:
        self._graph_written = True
        model = self.model
        loop = getattr(model, "loop", None)
        batch = getattr(loop, "current_batch", None)
        if not isinstance(model, torch.nn.Module) or batch is None:
            return
        inputs = batch[0] if isinstance(batch, tuple) else batch
        if isinstance(inputs, dict):
            warnings.warn(
                "TensorBoard: the graph of a model taking keyword inputs cannot be "
                "traced; skipping write_graph.",
                stacklevel=2,
            )
            return
        module = (
            getattr(model, "module", model)
            if isinstance(getattr(model, "module", None), torch.nn.Module)
            else model
        )
        was_training = model.training
        model.eval()
        chatter = io.StringIO()  # torch's tracer prints its own pages of trace on failure
        try:
            with (
                warnings.catch_warnings(),
                contextlib.redirect_stdout(chatter),
                contextlib.redirect_stderr(chatter),
            ):
                warnings.simplefilter("ignore")
                self._writer("train").add_graph(
                    module, tuple(inputs) if isinstance(inputs, list) else inputs
                )
        except Exception as exc:  # tracing fails on data-dependent control flow, and more
            reason = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            warnings.warn(
                f"TensorBoard: the graph of {type(module).__name__} cannot be traced "
                f"({reason[:160]}); skipping write_graph. Pass write_graph=False to silence this.",
                stacklevel=2,
            )
        finally:
            model.train(was_training)

    def _write_histograms(self, epoch: int) -> None:
        writer = self._writer("train")
        for name, param in self.model.named_parameters():
            writer.add_histogram(f"{name}/histogram", param.detach().float().cpu(), epoch)
            if param.grad is not None:
                writer.add_histogram(f"{name}/gradient", param.grad.detach().float().cpu(), epoch)
            if self.write_images and param.dim() in (1, 2, 4):
                image = param.detach().float().cpu()
                if image.dim() == 1:  # biases: one row, as Keras draws them
                    image = image.reshape(1, -1)
                elif image.dim() == 4:  # conv kernels: one tile per (out, in) pair
                    image = image.reshape(-1, image.shape[-1])
                image = (image - image.min()) / (image.max() - image.min() + 1e-12)
                writer.add_image(f"{name}/image", image.unsqueeze(0), epoch)

    def _embedding_metadata(self) -> dict[str, str]:
        """Keras's ``embeddings_metadata``: a file name per embedding layer (or one for all),
        relative to ``log_dir``; TensorBoard's projector opens it, we never do."""
        layers = self._embedding_layers()
        if isinstance(self.embeddings_metadata, dict):
            return {k: str(v) for k, v in self.embeddings_metadata.items() if k in layers}
        if self.embeddings_metadata:
            return dict.fromkeys(layers, str(self.embeddings_metadata))
        return {}

    def _write_projector_config(self) -> None:
        """``log_dir/projector_config.pbtxt``: each embedding's tensor file and metadata."""
        metadata = self._embedding_metadata()
        lines = []
        for name in self._embedding_layers():
            lines.append("embeddings {")
            lines.append(f'  tensor_name: "{name}"')
            lines.append(f'  tensor_path: "train/embeddings/{name}/tensors.tsv"')
            if name in metadata:
                lines.append(f'  metadata_path: "{metadata[name]}"')
            lines.append("}")
        text = "\n".join(lines) + "\n"
        checkpoint.atomic_write(
            os.path.join(self.log_dir, "projector_config.pbtxt"), lambda f: f.write(text.encode())
        )

    def _write_embeddings(self, epoch: int) -> None:
        """The current weights of every ``nn.Embedding`` as the projector's TSV tensors."""
        for name, layer in self._embedding_layers().items():
            rows = layer.weight.detach().float().cpu().tolist()
            text = "".join("\t".join(f"{v:.6g}" for v in row) + "\n" for row in rows)
            path = os.path.join(self.log_dir, "train", "embeddings", name, "tensors.tsv")
            checkpoint.atomic_write(path, lambda f, text=text: f.write(text.encode()))

    # --- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if not self._in_fit:  # what was captured or loaded last (outside fit, no loop to read)
            return dict(self._state) if self._state else self._own_state(None)
        self._state = self._own_state(getattr(self.model, "loop", None))
        return dict(self._state)

    def _own_state(self, loop: Any) -> dict[str, Any]:
        step = loop.global_step if loop is not None else self._global_step
        # Validation of the current epoch is logged at this step too, but only once the epoch
        # is done; a backup taken before that must not keep it. A validation already logged
        # at this step (fit's validation_interval, mid-epoch) is kept.
        done = loop is None or loop.epoch_done or self._evaluated_step == step
        evaluated = step if done else step - 1
        return {
            "global_step": step,
            "epochs_logged": self._epochs_logged,
            "evaluated_step": evaluated,
            "files": {run: list(names) for run, names in self._own_files.items()},
            "run_id": self._run_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: events written after the backup are dropped from the files this run wrote
        (once, when a writer opens), so no step is ever logged twice; files of other runs in
        the same folder are never touched."""
        self._global_step = state["global_step"]
        self._epochs_logged = state["epochs_logged"]
        self._own_files = {run: list(names) for run, names in state.get("files", {}).items()}
        self._run_id = state.get("run_id")
        self._state = dict(state)
        self._trim = (self._epochs_logged, self._global_step, state["evaluated_step"])


def _read_records(path: str) -> list[bytes]:
    """The raw records of an event file; a record cut short by a kill ends the list."""
    records = []
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                break
            (length,) = struct.unpack("<Q", header[:8])
            body = f.read(length + 4)
            if len(body) < length + 4:
                break
            records.append(header + body)
    return records


def _trim_events(
    run_dir: str, files: list[str], epochs_logged: int, global_step: int, evaluated_step: int
) -> None:
    """Drop events past a backup from ``files`` (this run's): epoch-level steps >=
    ``epochs_logged``, ``batch_*`` steps > ``global_step``, ``evaluation_*`` steps >
    ``evaluated_step``. Rewritten atomically."""
    from tensorboard.compat.proto import event_pb2

    for name in files:
        path = os.path.join(run_dir, name)
        if not os.path.isfile(path):
            continue
        kept, dropped = [], 0
        for record in _read_records(path):
            event = event_pb2.Event.FromString(record[12:-4])
            tags = [v.tag for v in event.summary.value]
            if any(t.startswith("batch_") for t in tags):
                limit_ok = event.step <= global_step
            elif any(t.startswith("evaluation_") for t in tags):
                limit_ok = event.step <= evaluated_step
            else:
                limit_ok = event.step < epochs_logged
            if not tags or limit_ok:
                kept.append(record)
            else:
                dropped += 1
        if dropped or os.path.getsize(path) != sum(map(len, kept)):
            data = b"".join(kept)
            checkpoint.atomic_write(path, lambda f, data=data: f.write(data))


def _scalars(logs: dict[str, Any]) -> list[tuple[str, float]]:
    """The logs' numbers as scalars; a metric of several values (F1 per class) as one scalar
    per value, ``f1_score/0``, ``f1_score/1``..."""
    out: list[tuple[str, float]] = []
    for key, value in logs.items():
        if isinstance(value, (int, float)):
            out.append((key, value))
        elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
            out.extend((f"{key}/{i}", v) for i, v in enumerate(value))
    return out
