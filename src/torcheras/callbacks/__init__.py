"""Callbacks: Keras's hooks and built-ins, one per file."""

from torcheras.callbacks.callback import Callback
from torcheras.callbacks.callback_list import CallbackList
from torcheras.callbacks.history import History
from torcheras.callbacks.lambda_callback import LambdaCallback
from torcheras.callbacks.progbar_logger import ProgbarLogger

__all__ = ["Callback", "CallbackList", "History", "LambdaCallback", "ProgbarLogger"]
