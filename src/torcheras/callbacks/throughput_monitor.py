"""ThroughputMonitor: samples, batches and tokens per second, FLOPs, MFU and peak memory."""

from __future__ import annotations

import numbers
import re
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from torcheras import data, distributed
from torcheras.callbacks.callback import Callback

__all__ = ["PEAK_FLOPS", "ThroughputMonitor", "clock", "peak_flops_of"]

clock = time.perf_counter  # the seam: read at batch boundaries (a test puts a fake clock here)

# Dense 16-bit (bf16, or fp16 where there is no bf16) tensor-core peaks per GPU, in FLOP/s,
# from NVIDIA's data sheets (the figures without sparsity). Matched in order against
# ``torch.cuda.get_device_name()``, lower-cased.
PEAK_FLOPS: list[tuple[str, float]] = [
    (r"h100.*pcie", 756e12),
    (r"h100.*nvl", 835e12),
    (r"h100", 989e12),  # SXM
    (r"h200.*nvl", 835e12),
    (r"h200", 989e12),  # SXM, GH200
    (r"a100", 312e12),
    (r"\ba10\b", 125e12),
    (r"\bl40s\b", 362e12),
    (r"\bl40\b", 181e12),
    (r"\bl4\b", 121e12),
    (r"\bt4\b", 65e12),  # fp16
    (r"v100.*pcie", 112e12),  # fp16
    (r"v100", 125e12),  # fp16, SXM2
]


def peak_flops_of(device_name: str) -> float | None:
    """The dense 16-bit peak FLOP/s of a known GPU (``"NVIDIA H100 80GB HBM3"``), else None."""
    name = device_name.lower()
    return next((flops for pattern, flops in PEAK_FLOPS if re.search(pattern, name)), None)


class ThroughputMonitor(Callback):
    """Log the speed of training: samples, batches and tokens per second, the FLOPs of a
    batch, the FLOP/s achieved, the model FLOPs utilisation (MFU) and the peak CUDA memory.

    Every epoch's logs get (so History, CSVLogger, TensorBoard and ``torcheras report`` show
    them, whatever the order of the callbacks):

    - ``samples_per_second``, ``batches_per_second``: over the epoch's training batches
      (validation excluded); samples of every process under torchrun, batches of one.
    - ``tokens_per_second``: when the inputs are integer tensors of shape (N, T) (token ids,
      or a dict's ``"input_ids"``): N * T tokens a batch; or what ``tokens_fn(batch)`` says.
    - ``flops_per_batch``: counted once with ``torch.utils.flop_counter.FlopCounterMode``
      around the whole first training step of a model (forward, backward and the optimizer
      step, as it really ran: not 3x a forward); matrix products, convolutions and attention
      count, elementwise operations do not. Later batches (and fits) count in proportion to
      their samples (their tokens, with tokens); a fit of another model counts again.
    - ``flops_per_second``: the FLOP/s achieved; ``mfu``: that over the peak of the devices,
      ``peak_flops`` per device, or for known GPUs (A100, H100, H200, L4, L40S, T4, V100...)
      their dense bf16/fp16 figure (:data:`PEAK_FLOPS`); no ``mfu`` without a peak.
    - ``peak_memory_gib``: the most CUDA memory allocated during the epoch (on CUDA; the
      mean over the processes under torchrun).

    No value is read from the device per batch: samples and tokens come from the shapes of
    each batch, time from ``time.perf_counter`` at batch boundaries, and the values join the
    logs through ``model.log`` (the epoch's logs, as the loop's own values). The clock is
    the module attribute ``clock`` (``time.perf_counter``), which a test may replace. With
    ``log_every_n_steps=N`` the batch logs show them too, updated every N batches: like every
    batch log, a mean over the epoch so far.

    Args:
        peak_flops: the peak FLOP/s of one device for ``mfu`` (e.g. ``989e12``); default: the
            table's figure for a known GPU.
        log_every_n_steps: also update the batch logs' values every N training batches.
        tokens_fn: ``batch -> tokens`` (an int, or a tensor summed on the device) for inputs
            the default does not see as tokens (padding excluded, several sequences).
        count_flops: False skips the FLOP count (and so ``flops_*`` and ``mfu``).

    Example:
        ```python
        model.fit(x, y, epochs=3, callbacks=[ThroughputMonitor(), CSVLogger("log.csv")])
        model.history.history["samples_per_second"]
        ```
    """

    def __init__(
        self,
        peak_flops: float | None = None,
        log_every_n_steps: int | None = None,
        tokens_fn: Callable[[Any], Any] | None = None,
        count_flops: bool = True,
    ) -> None:
        if peak_flops is not None and not (
            isinstance(peak_flops, numbers.Real)
            and not isinstance(peak_flops, bool)
            and peak_flops > 0
        ):
            raise ValueError(
                f"ThroughputMonitor: `peak_flops` must be a positive number of FLOP/s per "
                f"device, such as 989e12; got {peak_flops!r}."
            )
        if log_every_n_steps is not None and not (
            isinstance(log_every_n_steps, int)
            and not isinstance(log_every_n_steps, bool)
            and log_every_n_steps > 0
        ):
            raise ValueError(
                "ThroughputMonitor: `log_every_n_steps` must be a positive integer (batches) "
                f"or None (epoch logs only); got {log_every_n_steps!r}."
            )
        if tokens_fn is not None and not callable(tokens_fn):
            raise ValueError(
                f"ThroughputMonitor: `tokens_fn` must be a function batch -> number of tokens; "
                f"got {tokens_fn!r}."
            )
        self.peak_flops = peak_flops
        self.log_every_n_steps = log_every_n_steps
        self.tokens_fn = tokens_fn
        self.count_flops = count_flops
        self.flops_per_batch: int | None = None  # this process's first batch, as counted
        self._counter: Any = None  # the FlopCounterMode while it counts
        self._per_unit: float | None = None  # FLOPs per sample (per token with tokens)
        self._counted_model: Any = None

    # --- counting -------------------------------------------------------------------------------
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        model = self.model
        if not hasattr(model, "loop"):
            raise RuntimeError("ThroughputMonitor works inside torcheras Model.fit only.")
        self._loop = model.loop
        self._ranks = distributed.world_size()
        self._cuda = getattr(model, "device", torch.device("cpu")).type == "cuda"
        self._peak = self.peak_flops
        if self._peak is None and self._cuda:
            name = torch.cuda.get_device_name(model.device)
            self._peak = peak_flops_of(name)
            if self._peak is None and self.count_flops:
                warnings.warn(
                    f"ThroughputMonitor: the peak FLOP/s of {name!r} is not known, so no `mfu` "
                    "is logged; pass peak_flops= (one device's dense figure for your "
                    "precision, from its data sheet).",
                    stacklevel=2,
                )
        if self._counted_model is not model:  # counted once per model: again for another
            self.flops_per_batch, self._per_unit = None, None
            self._counted_model = model
        self._tokens_seen: bool | None = None if self.tokens_fn is None else True

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self.model.device)
        self._pending = False  # a batch ran but is not counted yet
        self._batches_in_epoch = 0
        self._flops_logged = False
        self._start_window(clock())

    def _start_window(self, now: float) -> None:
        self._window_start = now
        self._samples = 0
        self._batches = 0
        self._tokens: Any = 0

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        # The loop sets ``loop.current_batch`` after this hook: it still holds the batch
        # before this one, counted now (the epoch's last is counted in on_train_batches_end).
        if self._pending:
            self._count(self._loop.current_batch)
            if self._counter is not None:
                self._stop_counting()
            every = self.log_every_n_steps
            if every is not None and self._batches_in_epoch % every == 0:
                self._log(clock())
        if self.flops_per_batch is None and self._counter is None and self.count_flops:
            self._start_counting()
        self._pending = True

    def _count(self, batch: Any) -> None:
        if batch is None:
            return
        x = data.unpack(batch)[0]
        self._samples += data.batch_size_of(x)
        self._batches += 1
        self._batches_in_epoch += 1
        if self.tokens_fn is not None:
            self._tokens = self._tokens + self.tokens_fn(batch)
            return
        if self._tokens_seen is None:
            self._tokens_seen = _token_ids(x) is not None
        if self._tokens_seen:
            ids = _token_ids(x)
            self._tokens += 0 if ids is None else ids.numel()

    def on_train_batches_end(self, epoch: int) -> None:
        if self._pending:
            self._count(self._loop.current_batch)
            self._pending = False
        if self._counter is not None:
            self._stop_counting()
        self._log(clock())
        if self._cuda:
            peak = torch.cuda.max_memory_allocated(self.model.device) / 2**30
            self.model.log("peak_memory_gib", peak, weight=1.0)

    # --- FLOPs ----------------------------------------------------------------------------------
    def _start_counting(self) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        self._counter = FlopCounterMode(display=False)
        self._counter.__enter__()

    def _stop_counting(self) -> None:
        counter, self._counter = self._counter, None
        counter.__exit__(None, None, None)
        self.flops_per_batch = int(counter.get_total_flops())
        # the counted batch is the last one _count saw; its samples (tokens) set the rate
        units = self._last_units
        self._per_unit = self.flops_per_batch / units if units else None

    @property
    def _last_units(self) -> float:
        batch = self._loop.current_batch
        if batch is None:
            return 0.0
        if self.tokens_fn is not None:
            return float(self.tokens_fn(batch))
        x = data.unpack(batch)[0]
        ids = _token_ids(x) if self._tokens_seen else None
        return float(ids.numel() if ids is not None else data.batch_size_of(x))

    def on_exception(self, exception: BaseException) -> None:
        if self._counter is not None:  # never leave the counting mode on
            counter, self._counter = self._counter, None
            counter.__exit__(type(exception), exception, exception.__traceback__)

    # --- logging --------------------------------------------------------------------------------
    def _log(self, now: float) -> None:
        """Log the rates of the batches since the last log, weighted by their time: the logs'
        running mean over the epoch is then the epoch's samples over its time. Under torchrun
        the loop sums the totals of every process: counts are scaled so that the sum is the
        samples of every process over the processes' mean time."""
        seconds = now - self._window_start
        if seconds <= 0 or not self._batches:
            return
        log, ranks = self.model.log, self._ranks
        log("samples_per_second", ranks * self._samples / seconds, weight=seconds)
        log("batches_per_second", self._batches / seconds, weight=seconds)
        units: Any = self._samples
        if self._tokens_seen:
            tokens = self._tokens
            if isinstance(tokens, torch.Tensor):
                tokens = tokens.detach().to(torch.float64)  # stays on the device
            log("tokens_per_second", ranks * tokens / seconds, weight=seconds)
            units = tokens
        if self.flops_per_batch is not None and self._per_unit is not None:
            if not self._flops_logged:
                log("flops_per_batch", float(ranks * self.flops_per_batch), weight=1.0)
                self._flops_logged = True
            achieved = units * self._per_unit / seconds  # one device's FLOP/s
            log("flops_per_second", ranks * achieved, weight=seconds)
            if self._peak is not None:
                log("mfu", achieved / self._peak, weight=seconds)
        self._start_window(now)


def _token_ids(x: Any) -> torch.Tensor | None:
    """The token ids among the inputs: an integer tensor of shape (N, T), or a dict's
    ``"input_ids"`` of that kind."""
    if isinstance(x, dict):
        x = x.get("input_ids")
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        return None
    if x.is_floating_point() or x.is_complex() or x.dtype is torch.bool:
        return None
    return x
