"""Where the training loop is: the counters and position callbacks read and backups record."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
    - ``epoch_done``: the epoch's batches and validation are over (from ``on_epoch_end``).
    - ``last_logs``: the logs of the last finished epoch.
    - ``interrupt``: a signal received (0: none); see :meth:`request_interrupt`.

    While ``fit`` runs (``running`` is True) a callback can also ask the loop for work at the
    right moment: :meth:`at_step_boundary`, :meth:`request_interrupt` with an
    ``interrupt_handler``, :meth:`after_fit` and :meth:`training_state`. When ``fit`` returns
    or raises, the loop lets go of everything it held (data, callbacks, the last batch); the
    counters stay.

    Example:
        ```python
        class EveryHundredSteps(Callback):
            def on_train_batch_end(self, batch, logs=None):
                loop = self.model.loop
                if not loop.accumulating and loop.optimizer_steps % 100 == 0:
                    loop.at_step_boundary(lambda: print(loop.training_state()["epoch"]))
        ```
    """

    __slots__ = (
        "epoch",
        "batch",
        "global_step",
        "optimizer_steps",
        "micro_step",
        "accumulating",
        "epoch_done",
        "last_logs",
        "interrupt",
        "_fit",
    )

    def __init__(self) -> None:
        self.epoch = 0
        self.batch = -1
        self.global_step = 0
        self.optimizer_steps = 0
        self.micro_step = 0
        self.accumulating = False
        self.epoch_done = False
        self.last_logs: dict[str, Any] = {}
        # A signal this process received (SIGTERM, SIGINT; 0: none). The loop acts on it
        # between optimizer steps, at the same batch on every rank (a signal may reach one
        # rank only), by calling the interrupt handler.
        self.interrupt = 0
        self._fit: Any = None  # the running fit (loops.FitLoop); None outside fit

    @property
    def running(self) -> bool:
        """True while ``fit`` runs."""
        return self._fit is not None

    def _running_fit(self, what: str) -> Any:
        if self._fit is None:
            raise RuntimeError(f"model.loop.{what} works inside Model.fit only.")
        return self._fit

    def at_step_boundary(self, work: Callable[[], None]) -> None:
        """Run ``work()`` at the next point between two optimizer steps: after this training
        batch (after the last batch of its accumulation group), or after ``on_epoch_end``
        when asked from an epoch hook. Every callback has run its hook by then, so a state
        captured there is consistent (BackupAndRestore saves this way)."""
        self._running_fit("at_step_boundary").boundary_work.append(work)

    def after_fit(self, work: Callable[[], None]) -> None:
        """Run ``work()`` once ``fit`` has ended cleanly: every ``on_train_end`` has run and
        the checkpoints have landed, just before ``fit`` returns. An exception it raises
        leaves ``fit`` (OptunaPruning raises Optuna's ``TrialPruned`` this way); nothing runs
        if ``fit`` raised earlier."""
        self._running_fit("after_fit").after_fit.append(work)

    def request_interrupt(self, code: int) -> None:
        """Ask the loop to call ``interrupt_handler(code)`` at the next step boundary (every
        rank at the same batch under torchrun: the highest code asked on any rank wins).
        Signal numbers are the codes BackupAndRestore uses; ``TIME_UP`` is the Timer's."""
        self.interrupt = max(self.interrupt, code)

    @property
    def interrupt_handler(self) -> Callable[[int], None] | None:
        """Who handles :meth:`request_interrupt` in this fit (None: nobody; a request then
        does nothing). Set it in ``on_train_begin``."""
        return None if self._fit is None else self._fit.interrupt_handler

    @interrupt_handler.setter
    def interrupt_handler(self, handler: Callable[[int], None] | None) -> None:
        self._running_fit("interrupt_handler").interrupt_handler = handler

    def watch_loss(self, callback: Any, every: int, on_bad: Callable[[int, float], None]) -> Any:
        """Have ``fit`` check the training loss of the batch logs (its running mean) every
        ``every`` batches and after each epoch's last batch, calling ``on_bad(batch, loss)``
        with the first batch where it is NaN or infinite. ``callback``'s
        ``on_train_batch_end`` is then not called by this fit's callback list (unless a
        callback is appended to it later), and no batch logs are built for it. Call it from
        ``on_train_begin`` (from an epoch hook it counts from the next epoch's batches).
        Returns the watch (a :class:`~torcheras.logs.LossWatch`), or None where ``fit``
        cannot: another callback has a batch-end hook (it may read and change the batch
        logs; the progress bar of ``verbose=1`` or ``2`` has one), a watch is already set,
        or training runs on several ranks (whose stops must agree after every batch).
        ``on_bad`` runs between two batches: it may stop training (``model.stop_training``),
        not replace the model's optimizer, loss, metrics or module (the epoch's steps keep
        the ones they began with). TerminateOnNaN uses it."""
        return self._running_fit("watch_loss").watch_loss(callback, every, on_bad)

    @property
    def current_batch(self) -> Any:
        """The training batch on the device right now (None outside fit)."""
        return None if self._fit is None else self._fit.current_batch

    @property
    def callbacks(self) -> Any:
        """The running fit's ``CallbackList`` (None outside fit): the other callbacks."""
        return None if self._fit is None else self._fit.callbacks

    @property
    def batch_learning_rates(self) -> list[Any]:
        """The learning rate each training batch of this epoch used so far (inside fit;
        a schedule may change it per batch)."""
        return [] if self._fit is None else self._fit.batch_lrs

    def training_state(self, sharded: bool = False) -> dict[str, Any]:
        """Everything an exact resume needs, captured now (see ``state.py``); inside fit,
        at a step boundary (:meth:`at_step_boundary`). ``sharded``: without the weights and
        optimizers, which a sharded backup writes with ``torch.distributed.checkpoint``."""
        return self._running_fit("training_state()").training_state(sharded)

    def counters(self) -> dict[str, int]:
        """The counters a backup records."""
        return {"global_step": self.global_step, "optimizer_steps": self.optimizer_steps}
