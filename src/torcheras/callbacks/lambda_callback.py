"""LambdaCallback: a callback from plain functions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torcheras.callbacks.callback import Callback

__all__ = ["LambdaCallback"]


class LambdaCallback(Callback):
    """Build a callback from functions, as Keras's ``LambdaCallback``.

    Epoch hooks are called as ``fn(epoch, logs)``, train begin/end as ``fn(logs)`` and batch
    hooks as ``fn(batch, logs)``. Any other keyword (``on_test_begin=...``,
    ``on_after_backward=...``) becomes an attribute, so it overrides that hook too.

    Example:
        ```python
        log = LambdaCallback(on_epoch_end=lambda epoch, logs: print(epoch, logs["loss"]))
        model.fit(x, y, epochs=3, callbacks=[log])
        ```
    """

    def __init__(
        self,
        on_epoch_begin: Callable[..., Any] | None = None,
        on_epoch_end: Callable[..., Any] | None = None,
        on_train_begin: Callable[..., Any] | None = None,
        on_train_end: Callable[..., Any] | None = None,
        on_train_batch_begin: Callable[..., Any] | None = None,
        on_train_batch_end: Callable[..., Any] | None = None,
        **kwargs: Any,
    ) -> None:
        hooks = {
            "on_epoch_begin": on_epoch_begin,
            "on_epoch_end": on_epoch_end,
            "on_train_begin": on_train_begin,
            "on_train_end": on_train_end,
            "on_train_batch_begin": on_train_batch_begin,
            "on_train_batch_end": on_train_batch_end,
        }
        for name, fn in hooks.items():
            if fn is not None:
                setattr(self, name, fn)
        self.__dict__.update(kwargs)
