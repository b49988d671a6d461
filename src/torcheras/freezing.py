"""Keras's ``layer.trainable = False`` for torch modules: :func:`freeze` and :func:`unfreeze`.

In Keras, a frozen layer neither learns nor updates its BatchNormalization statistics: its
BatchNormalization runs in inference mode (Dropout still drops). Turning off ``requires_grad``
alone does not give that in PyTorch, because ``fit`` (like any training loop) calls
``model.train()`` every epoch, and a BatchNorm in train mode keeps moving its running mean and
variance. A frozen module's normalization layers are marked, and ``Model.train()`` puts them
back in eval mode, so the mark holds through ``fit``.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["freeze", "is_frozen", "unfreeze"]

_MARK = "_torcheras_frozen"


def freeze(module: nn.Module) -> nn.Module:
    """Freeze ``module`` as Keras's ``trainable = False`` does: its parameters get no
    gradients, and its normalization layers with running statistics (BatchNorm,
    InstanceNorm with ``track_running_stats``) run in inference mode, using and keeping their
    statistics, even while ``fit`` trains the rest. Dropout still drops, as in Keras.
    Returns ``module``.

    Example:
        ```python
        base = torchvision.models.resnet18(weights="DEFAULT")
        torcheras.freeze(base)  # base.trainable = False in Keras
        model = torcheras.Model(nn.Sequential(base, nn.Linear(1000, 2)))
        ```
    """
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    for sub in module.modules():
        setattr(sub, _MARK, True)
        if isinstance(sub, _NormBase):
            sub.training = False
    return module


def unfreeze(module: nn.Module) -> nn.Module:
    """Undo :func:`freeze` (Keras's ``trainable = True``): the parameters learn again, and the
    module follows the model's mode (``fit`` puts it in train mode each epoch). Recompile, as
    in Keras, if the optimizer was built without these parameters. Returns ``module``."""
    for parameter in module.parameters():
        parameter.requires_grad_(True)
    for sub in module.modules():
        sub.__dict__.pop(_MARK, None)
    return module


def is_frozen(module: nn.Module) -> bool:
    """Whether ``module`` was frozen with :func:`freeze` (and not unfrozen since)."""
    return bool(module.__dict__.get(_MARK, False))


def keep_frozen_in_eval(root: nn.Module) -> None:
    """Put the normalization layers of every frozen module under ``root`` back in inference
    mode (after ``root.train()``), each on its own: an unfrozen child of a frozen module
    follows the model's mode."""
    for module in root.modules():
        if module.training and isinstance(module, _NormBase) and module.__dict__.get(_MARK):
            module.training = False
