"""Structures of tensors: what checkpoints, state capture, logs, metrics and the loops share.

A structure is a tensor, or a dict / list / tuple nesting them (other leaves pass through).
Nothing here knows about data sources, files or models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["concat_batches", "head", "leaves", "map_tensors", "snapshot", "to_cpu", "to_numpy"]

Structure = Any  # a tensor, a tuple/list of tensors, or a dict of tensors


def map_tensors(fn: Callable[[torch.Tensor], Any], obj: Structure) -> Structure:
    """Apply ``fn`` to every tensor of a nested dict / list / tuple; other leaves stay.

    Example:
        ```python
        map_tensors(lambda t: t * 2, {"a": torch.ones(2), "b": [torch.zeros(1), "text"]})
        ```
    """
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: map_tensors(fn, v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(fn, v) for v in obj) if type(obj) in (tuple, list) else obj
    return obj


def to_cpu(obj: Structure, clone: bool = False) -> Structure:
    """Detached CPU copies of every tensor in ``obj``; ``clone`` also copies CPU tensors (for
    state that keeps changing in place after it is captured)."""
    if clone:
        return map_tensors(lambda t: t.detach().cpu().clone(), obj)
    return map_tensors(lambda t: t.detach().cpu(), obj)


def snapshot(obj: Structure) -> Structure:
    """A copy of ``obj`` whose tensors are new CPU tensors: training may go on changing the
    originals (weights, optimizer moments) while the copy is written."""
    return map_tensors(lambda t: t.detach().to("cpu", copy=True), obj)


def head(obj: Structure, n: int) -> Structure:
    """The first ``n`` rows of every tensor that has a batch axis (0-d tensors stay)."""
    return map_tensors(lambda t: t[:n] if t.dim() else t, obj)


def to_numpy(obj: Structure) -> Structure:
    """Every (CPU) tensor of ``obj`` as a numpy array."""
    return map_tensors(lambda t: t.numpy(), obj)


def leaves(obj: Structure) -> list[torch.Tensor]:
    """The tensors of ``obj``, in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in leaves(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in leaves(v)]
    return []


def concat_batches(outputs: list[Any]) -> Any:
    """Concatenate per-batch outputs (tensors, tuples or dicts of them) along the batch axis."""
    if not outputs:
        return None
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, Mapping):
        return {k: concat_batches([o[k] for o in outputs]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(concat_batches([o[i] for o in outputs]) for i in range(len(first)))
    return outputs
