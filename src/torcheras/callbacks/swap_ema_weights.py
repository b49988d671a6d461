"""SwapEMAWeights: validate (and checkpoint) on the moving average of the weights."""

from __future__ import annotations

from typing import Any

from torcheras.callbacks.callback import Callback

__all__ = ["SwapEMAWeights"]


class SwapEMAWeights(Callback):
    """Swap the exponential moving average of the weights (``compile(ema_momentum=0.99)``)
    into the model for validation, ``evaluate`` and ``predict``, and back for training, as
    Keras's callback does. With ``swap_on_epoch=True`` the average also stays in the model
    from the end of each epoch to the start of the next, so the callbacks after this one
    (ModelCheckpoint: put it after SwapEMAWeights in the list) save the averaged weights.

    The swap exchanges tensors in place on the device. The average is part of ``model.save``
    and of backups, and ``fit`` ends with it in the model (Keras's behaviour), whichever
    weights were in the model when training stopped.

    Example:
        ```python
        model.compile("adam", "mse", ema_momentum=0.99)
        model.fit(x, y, epochs=10, validation_split=0.2,
                  callbacks=[SwapEMAWeights(swap_on_epoch=True), ModelCheckpoint("ema.pt")])
        ```
    """

    def __init__(self, swap_on_epoch: bool = False) -> None:
        self.swap_on_epoch = swap_on_epoch

    def _ema(self) -> Any:
        ema = getattr(self.model, "ema", None)
        if ema is None:
            raise ValueError(
                "SwapEMAWeights needs a moving average of the weights: compile the model with "
                "ema_momentum=0.99 (Keras: use_ema=True)."
            )
        return ema

    def _put(self, average: bool) -> None:
        ema = self._ema()
        if ema.updates and ema.swapped != average:
            ema.swap()

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._ema()  # fail before training, not at the first validation

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._put(average=False)  # train on the weights

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.swap_on_epoch:
            self._put(average=True)

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._put(average=True)

    def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
        self._put(average=False)

    def on_predict_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._put(average=True)

    def on_predict_end(self, logs: dict[str, Any] | None = None) -> None:
        self._put(average=False)

    def on_exception(self, exception: BaseException) -> None:
        ema = getattr(self.model, "ema", None)
        if ema is not None and ema.swapped:
            ema.swap()  # leave the weights the model trains on
