"""Where the training loop is: the one owner of the counters callbacks read and backups record."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

__all__ = ["LoopState", "StopFit", "TIME_UP"]

# ``LoopState.interrupt`` for a time budget spent (Timer): below every signal number.
TIME_UP = 1


class StopFit(Exception):
    """Raised inside ``fit`` to end it at once, cleanly (``fit`` returns): a Timer whose
    budget is spent, once BackupAndRestore has written where training stood."""


class LoopState:
    """Where the training loop is (``model.loop``): read it instead of counting hook calls.

    Counters (0-based positions, counts since the start of ``fit``, resumed runs included):

    - ``epoch``, ``batch``: the current epoch and training batch (as the hooks receive them).
    - ``global_step``: the training batches run (each micro-batch counts once).
    - ``optimizer_steps``: the optimizer updates applied. Equal to ``global_step`` unless
      ``gradient_accumulation_steps`` > 1.
    - ``micro_step``: the batch's place in its accumulation group (always 0 without
      accumulation); ``accumulating`` is True while the group is not complete, so the
      optimizer does not step after this batch.

    ``interrupt``: a signal received (see BackupAndRestore), handled by ``on_interrupt``.

    Also: ``order`` (the epoch's sample order), ``current_batch`` (the batch on the device),
    ``batch_lrs`` (the rate each batch used), ``last_logs`` (the last epoch's logs),
    ``callbacks`` (the running ``CallbackList``) and ``collector`` (the epoch's running logs).
    """

    __slots__ = (
        "epoch",
        "batch",
        "global_step",
        "optimizer_steps",
        "micro_step",
        "accumulating",
        "group_size",
        "loss_scale",
        "order",
        "current_batch",
        "epoch_done",
        "batch_lrs",
        "train_source",
        "last_logs",
        "pending",
        "end_of_batches",
        "callbacks",
        "collector",
        "interrupt",
        "on_interrupt",
    )

    def __init__(self) -> None:
        self.epoch = 0
        self.batch = -1
        self.global_step = 0
        self.optimizer_steps = 0
        self.micro_step = 0
        self.accumulating = False
        self.group_size = 1  # micro-batches in the current group (less than N for the last)
        # Under torchrun, this rank's share of the global batch times the number of ranks:
        # DDP averages gradients over ranks, so uneven shards weigh by their sizes.
        self.loss_scale = 1.0
        self.order: Tensor | None = None
        self.current_batch: Any = None
        self.epoch_done = False
        self.batch_lrs: list[Any] = []
        self.train_source: Any = None
        self.last_logs: dict[str, Any] = {}
        self.pending: list[Callable[[], None]] = []
        self.end_of_batches: list[Callable[[], None]] = []
        self.callbacks: Any = None
        self.collector: Any = None
        # A signal this process received (SIGTERM, SIGINT; 0: none) and who handles it
        # (BackupAndRestore). The loop acts on it between optimizer steps, at the same batch on
        # every rank (a signal may reach one rank only).
        self.interrupt = 0
        self.on_interrupt: Callable[[int], None] | None = None

    def run_pending(self) -> None:
        """Run the work callbacks asked for at this batch boundary (backups), in order."""
        while self.pending:
            self.pending.pop(0)()

    def counters(self) -> dict[str, int]:
        """The counters a backup records."""
        return {"global_step": self.global_step, "optimizer_steps": self.optimizer_steps}
