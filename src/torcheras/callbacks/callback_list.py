"""Dispatch every hook to a list of callbacks, in order; drives ``fit`` or your own loop."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torcheras import distributed
from torcheras.callbacks.callback import Callback
from torcheras.logs import BatchLogs, to_float_logs

__all__ = ["CallbackList", "HOOKS"]

HOOKS = (
    "on_train_begin",
    "on_train_end",
    "on_epoch_begin",
    "on_epoch_end",
    "on_train_batch_begin",
    "on_train_batch_end",
    "on_test_begin",
    "on_test_end",
    "on_test_batch_begin",
    "on_test_batch_end",
    "on_predict_begin",
    "on_predict_end",
    "on_predict_batch_begin",
    "on_predict_batch_end",
    "on_after_backward",
    "on_train_batches_end",
    "on_test_batch_outputs",
    "on_exception",
    "on_validation_end",
)
_ALIASES = {"on_train_batch_begin": "on_batch_begin", "on_train_batch_end": "on_batch_end"}


def _overrides(callback: Callback, hook: str) -> bool:
    if hook in callback.unused_hooks:  # hooks a callback's settings leave idle
        return False
    if hook in vars(callback):  # LambdaCallback and friends set hooks on the instance
        return True
    if getattr(type(callback), hook, None) is not getattr(Callback, hook):
        return True
    alias = _ALIASES.get(hook)
    if alias is None or getattr(type(callback), hook) is not getattr(Callback, hook):
        return False
    return alias in vars(callback) or getattr(type(callback), alias) is not getattr(Callback, alias)


def _flatten(callbacks: Iterable[Any] | Callback | None) -> list[Callback]:
    if callbacks is None:
        return []
    if isinstance(callbacks, Callback):
        return [callbacks]
    out: list[Callback] = []
    for cb in callbacks:
        if isinstance(cb, (list, tuple)):
            out.extend(_flatten(cb))
        elif isinstance(cb, Callback):
            out.append(cb)
        else:
            raise TypeError(
                f"Each callback must be a torcheras.callbacks.Callback; got {type(cb).__name__}."
                " Subclass Callback or wrap functions in LambdaCallback."
            )
    return out


class CallbackList(Callback):
    """Calls each hook on every callback in list order; only on those that override it.

    ``fit`` uses one; so can a hand-written loop::

        cbs = CallbackList([EarlyStopping(patience=2)], model=model, epochs=10, steps=len(loader))
        cbs.on_train_begin()
        for epoch in range(10):
            cbs.on_epoch_begin(epoch)
            ...  # your training
            cbs.on_epoch_end(epoch, {"loss": train_loss, "val_loss": val_loss})
            if model.stop_training:
                break
        cbs.on_train_end()
    """

    def __init__(
        self,
        callbacks: Iterable[Any] | Callback | None = None,
        add_history: bool = False,
        add_progbar: bool = False,
        model: Any = None,
        **params: Any,
    ) -> None:
        from torcheras.callbacks.history import History
        from torcheras.callbacks.progbar_logger import ProgbarLogger

        self.callbacks = _flatten(callbacks)
        if add_history and not any(isinstance(cb, History) for cb in self.callbacks):
            self.callbacks.append(History())
        if add_progbar and not any(isinstance(cb, ProgbarLogger) for cb in self.callbacks):
            self.callbacks.append(ProgbarLogger())
        self._open = {"train": 0, "epoch": 0, "test": 0, "predict": 0}
        self._build_dispatch()
        if model is not None:
            self.set_model(model)
        if params:
            self.set_params(params)

    def _build_dispatch(self) -> None:
        writer = distributed.is_main()  # under torchrun, rank 0 alone runs the writers
        overriding = {h: [cb for cb in self.callbacks if _overrides(cb, h)] for h in HOOKS}
        self._active = {
            h: [getattr(cb, h) for cb in cbs if writer or not cb.rank_zero_only]
            for h, cbs in overriding.items()
        }
        self._declared = {h: bool(cbs) for h, cbs in overriding.items()}

    def append(self, callback: Callback) -> None:
        self.callbacks.append(callback)
        self._build_dispatch()
        if self._model is not None:
            callback.set_model(self._model)
        if self.params:
            callback.set_params(self.params)

    def skip(self, hook: str, callback: Callback) -> None:
        """Stop calling ``callback``'s ``hook`` in this list (a callback that found another
        way to do its work in this ``fit``: TerminateOnNaN's loss watch)."""
        self._active[hook] = [
            fn for fn in self._active[hook] if getattr(fn, "__self__", None) is not callback
        ]

    def needs(self, hook: str, besides: Callback | None = None) -> bool:
        """Whether any callback (other than ``besides``) overrides ``hook`` (the loop skips
        building unused logs)."""
        if besides is None:
            return bool(self._active[hook])
        return any(getattr(fn, "__self__", None) is not besides for fn in self._active[hook])

    def declares(self, hook: str) -> bool:
        """Whether any callback overrides ``hook``, whether or not it runs on this rank."""
        return self._declared[hook]

    def set_model(self, model: Any) -> None:
        self._model = model
        for cb in self.callbacks:
            cb.set_model(model)

    def set_params(self, params: dict[str, Any]) -> None:
        self.params = params
        for cb in self.callbacks:
            cb.set_params(params)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.callbacks)

    def __len__(self) -> int:
        return len(self.callbacks)

    # --- dispatch ---------------------------------------------------------------------------------
    def _call(self, hook: str, logs: Any) -> None:
        logs = to_float_logs(logs)
        for fn in self._active[hook]:
            fn(logs)

    def _call_indexed(self, hook: str, index: int, logs: Any) -> None:
        if type(logs) is not BatchLogs:  # lazy batch logs go as they are (the hot path)
            logs = to_float_logs(logs)
        for fn in self._active[hook]:
            fn(index, logs)

    def _begin(self, phase: str) -> None:
        self._open[phase] += 1

    def _end(self, phase: str, hook: str) -> None:
        if self._open[phase] <= 0:
            raise ValueError(f"`{hook}` called without corresponding `on_{phase}_begin`.")
        self._open[phase] -= 1

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._begin("train")
        if self._model is not None and hasattr(self._model, "__dict__"):
            self._model.stop_reason = None  # Callback.stop_training gives one
        self._call("on_train_begin", logs)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._end("train", "on_train_end")
        reason = getattr(getattr(self, "_model", None), "stop_reason", None)
        if reason is not None:  # a hand-written loop: what fit copies to its History
            from torcheras.callbacks.history import History

            for cb in self.callbacks:
                if isinstance(cb, History) and cb.stop_reason is None:
                    cb.stop_reason = reason
        self._call("on_train_end", logs)

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._begin("epoch")
        self._call_indexed("on_epoch_begin", epoch, logs)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._end("epoch", "on_epoch_end")
        self._call_indexed("on_epoch_end", epoch, logs)

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._call_indexed("on_train_batch_begin", batch, logs)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._call_indexed("on_train_batch_end", batch, logs)

    def on_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.on_train_batch_begin(batch, logs)

    def on_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.on_train_batch_end(batch, logs)

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._begin("test")
        self._call("on_test_begin", logs)

    def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
        self._end("test", "on_test_end")
        self._call("on_test_end", logs)

    def on_test_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._call_indexed("on_test_batch_begin", batch, logs)

    def on_test_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._call_indexed("on_test_batch_end", batch, logs)

    def on_predict_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._begin("predict")
        self._call("on_predict_begin", logs)

    def on_predict_end(self, logs: dict[str, Any] | None = None) -> None:
        self._end("predict", "on_predict_end")
        self._call("on_predict_end", logs)

    def on_predict_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._call_indexed("on_predict_batch_begin", batch, logs)

    def on_predict_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._call_indexed("on_predict_batch_end", batch, logs)

    def on_after_backward(self, batch: int) -> None:
        for fn in self._active["on_after_backward"]:
            fn(batch)

    def on_train_batches_end(self, epoch: int) -> None:
        for fn in self._active["on_train_batches_end"]:
            fn(epoch)

    def on_test_batch_outputs(self, batch: int, x: Any, y: Any, y_pred: Any) -> None:
        for fn in self._active["on_test_batch_outputs"]:
            fn(batch, x, y, y_pred)

    def on_validation_end(self, step: int, logs: dict[str, Any] | None = None) -> None:
        self._call_indexed("on_validation_end", step, logs)

    def on_exception(self, exception: BaseException) -> None:
        """Tell every callback, even if one of them fails; the original exception wins."""
        for fn in self._active["on_exception"]:
            try:
                fn(exception)
            except Exception as inner:  # never mask the original error
                if hasattr(exception, "add_note"):
                    exception.add_note(f"(a callback's on_exception also failed: {inner!r})")
        for phase in self._open:
            self._open[phase] = 0

    def take_resume_state(self) -> dict[str, Any] | None:
        """A training state a callback (BackupAndRestore) loaded for ``fit`` to resume from."""
        for cb in self.callbacks:
            take = getattr(cb, "take_resume_state", None)
            if take is not None:
                state = take()
                if state is not None:
                    return state
        return None

    def _state_keys(self, legacy: bool = False) -> list[str]:
        """Each callback's ``state_key``, numbered when it repeats. ``legacy``: the class
        name alone, as backups written before keys named arguments have it."""
        keys, seen = [], {}
        for cb in self.callbacks:
            key = type(cb).__name__ if legacy else getattr(cb, "state_key", type(cb).__name__)
            seen[key] = seen.get(key, 0) + 1
            keys.append(key if seen[key] == 1 else f"{key}:{seen[key]}")
        return keys

    def state_dict(self) -> dict[str, Any]:
        """Each callback's state, keyed by its ``state_key``."""
        return {key: cb.state_dict() for key, cb in zip(self._state_keys(), self.callbacks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = zip(self._state_keys(), self._state_keys(legacy=True), self.callbacks)
        for key, legacy, cb in keys:
            if key in state:
                cb.load_state_dict(state[key])
            elif legacy in state:
                cb.load_state_dict(state[legacy])
