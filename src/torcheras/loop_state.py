"""Where the training loop is: the position callbacks read and backups record."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

__all__ = ["LoopState"]


class LoopState:
    """Where the training loop is: read by callbacks (``model.loop``), cheap to update.

    ``epoch`` and ``batch`` are 0-based; ``global_step`` counts the training batches run in
    this fit (resumed runs included); ``order`` is the epoch's sample order; ``current_batch``
    is the batch being trained on (on the device); ``batch_lrs`` the learning rate each batch
    of the epoch used (first param group), so the epoch logs show a rate really used.
    """

    __slots__ = (
        "epoch",
        "batch",
        "global_step",
        "order",
        "current_batch",
        "epoch_done",
        "batch_lrs",
        "train_source",
        "last_logs",
        "pending",
    )

    def __init__(self) -> None:
        self.epoch = 0
        self.batch = -1
        self.global_step = 0
        self.order: Tensor | None = None
        self.current_batch: Any = None
        self.epoch_done = False
        self.batch_lrs: list[Any] = []
        self.train_source: Any = None
        self.last_logs: dict[str, Any] = {}
        self.pending: list[Callable[[], None]] = []

    def run_pending(self) -> None:
        """Run the work callbacks asked for at this batch boundary (backups), in order."""
        while self.pending:
            self.pending.pop(0)()
