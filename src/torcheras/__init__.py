"""torcheras: Keras-style training for PyTorch, built around callbacks.

Example:
    ```python
    import torch, torcheras
    model = torcheras.Model(torch.nn.Sequential(torch.nn.Linear(20, 3)))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(x, y, epochs=5, validation_split=0.2)
    ```
"""

from torcheras import callbacks, checkpoint, losses, metrics, optimizers, schedules
from torcheras.freezing import freeze, is_frozen, unfreeze
from torcheras.model import Model

__version__ = "0.1.0"
__all__ = [
    "Model",
    "callbacks",
    "checkpoint",
    "freeze",
    "is_frozen",
    "losses",
    "metrics",
    "optimizers",
    "schedules",
    "unfreeze",
    "__version__",
]


def __getattr__(name: str) -> object:
    """``torcheras.wrappers`` (scikit-learn) and ``torcheras.export`` load on first use, so
    ``import torcheras`` imports neither scikit-learn nor the exporters."""
    if name in ("wrappers", "export"):
        import importlib

        return importlib.import_module(f"torcheras.{name}")
    raise AttributeError(f"module 'torcheras' has no attribute {name!r}")
