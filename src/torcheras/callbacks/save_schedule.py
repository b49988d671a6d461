"""When ModelCheckpoint and BackupAndRestore save: ``save_freq`` read once, and a save timer.

``save_freq`` is ``"epoch"``, a number of batches, or an amount of training time: a
``datetime.timedelta`` or a string such as ``"30min"``, ``"2h"``, ``"90s"`` or ``"1h30min"``.
:func:`parse_save_freq` turns it into ``"epoch"``, an ``int`` or a :class:`SaveTimer`.

The timer costs one clock read per training batch. Under torchrun the ranks' clocks differ,
yet every rank must save at the same batch (a save may need every rank's part of the state):
rank 0's clock decides, and its decision reaches the other ranks in one small broadcast over
the host group (no GPU synchronisation) every :data:`SYNC_EVERY` batches, so a save may come
up to ``SYNC_EVERY - 1`` batches after its time; between broadcasts a batch costs a counter.

The clock is the module attribute :data:`clock` (``time.monotonic``), read at every check: a
test replaces it to move time on without sleeping, e.g.
``monkeypatch.setattr(torcheras.callbacks.save_schedule, "clock", fake_clock)``.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

from torcheras import distributed
from torcheras.callbacks.timer import parse_duration

__all__ = ["SYNC_EVERY", "SaveTimer", "clock", "parse_save_freq"]

clock = time.monotonic  # the seam: the time in seconds (a test puts a fake clock here)

# Under torchrun, rank 0's decision is broadcast every this many checks (training batches).
SYNC_EVERY = 10

ACCEPTED = (
    "'epoch', a positive integer (a number of batches), a datetime.timedelta, or a duration "
    "string such as '30min', '2h', '90s' or '1h30m' (Timer's forms: units w, d, h, min or m, "
    "s; or 'HH:MM:SS')"
)


def parse_save_freq(save_freq: Any) -> str | int | SaveTimer | None:
    """``"epoch"``, a number of batches, or a :class:`SaveTimer`; None for anything else (the
    callback raises its own error, naming :data:`ACCEPTED`)."""
    if save_freq == "epoch" and isinstance(save_freq, str):
        return "epoch"
    if isinstance(save_freq, int) and not isinstance(save_freq, bool):
        return save_freq if save_freq > 0 else None
    if not isinstance(save_freq, (str, datetime.timedelta)):
        return None
    try:
        return SaveTimer(parse_duration(save_freq))  # one reading of durations: Timer's
    except ValueError:
        return None


class SaveTimer:
    """Says, at each training batch, whether ``seconds`` of training time have passed since
    the last save (or the start of ``fit``); rank 0's clock decides under torchrun.

    Example:
        ```python
        timer = parse_save_freq("30min")
        timer.start()            # on_train_begin
        if timer.due():          # each training batch: one clock read
            save()
        ```
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self._since = 0.0  # the clock's reading at the last save (or the start)
        self._checks = 0  # batches checked since the start, counted alike on every rank
        self._sync = False

    def __repr__(self) -> str:
        return f"SaveTimer({datetime.timedelta(seconds=self.seconds)})"

    def start(self) -> None:
        """Start counting (``on_train_begin``): training time since the start of ``fit``."""
        self._since = clock()
        self._checks = 0
        self._sync = distributed.is_active()

    def due(self) -> bool:
        """Whether to save now; if so the count starts again from now. Call it at every
        training batch, on every rank alike."""
        if not self._sync:
            now = clock()
            if now - self._since < self.seconds:
                return False
            self._since = now
            return True
        self._checks += 1
        if self._checks % SYNC_EVERY:
            return False
        main = distributed.is_main()
        now = clock() if main else 0.0  # only rank 0's clock counts
        if not distributed.decide_on_main(main and now - self._since >= self.seconds):
            return False
        self._since = now
        return True

    def elapsed(self) -> float:
        """Seconds of training since the last save (rank 0's clock decides under torchrun)."""
        return clock() - self._since

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed": self.elapsed(), "checks": self._checks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resumed run goes on counting from the time the backup had recorded since its
        last save: the time between the kill and the restart does not count."""
        self._since = clock() - float(state.get("elapsed", 0.0))
        self._checks = int(state.get("checks", 0))
