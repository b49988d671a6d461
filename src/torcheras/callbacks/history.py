"""History: every epoch's logs, returned by ``fit``."""

from __future__ import annotations

from typing import Any

from torcheras.callbacks.callback import Callback

__all__ = ["History"]


class History(Callback):
    """Records the logs of every epoch. ``fit`` adds one (a new one per fit) and returns it.

    ``history.history`` maps each log key to a list of values (a key seen in some epochs
    only, such as ``val_loss`` with ``validation_freq=2``, has a shorter list);
    ``history.epoch`` lists the 0-based epochs of the last fit; ``history.stop_reason``
    says why that fit stopped before its last epoch, naming the callback, where and why
    (``"EarlyStopping: val_loss did not improve for 3 epochs; best 0.412 at epoch 7"``), or is
    None when every epoch ran.

    Example::

        history = model.fit(x, y, epochs=5, validation_split=0.2)
        best = min(history.history["val_loss"])
    """

    def __init__(self) -> None:
        self.history: dict[str, list[Any]] = {}
        self.epoch: list[int] = []
        self.stop_reason: str | None = None

    def set_model(self, model: Any) -> None:
        super().set_model(model)
        if hasattr(model, "__dict__"):
            self.model.history = self  # as Keras: model.history is the History of the fit

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.epoch = []
        self.stop_reason = None

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epoch.append(epoch)
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(value)

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}, "epoch": list(self.epoch)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {k: list(v) for k, v in state["history"].items()}
        self.epoch = list(state["epoch"])
