"""Inputs to batches.

Arrays and tensors are batched by index slicing (one gather per batch, never sample by
sample); a ``Dataset`` becomes a ``DataLoader``; a ``DataLoader`` or any iterable of batches is
used as it is. A batch is a tuple ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)``, where ``x``
is a tensor, a tuple of tensors (``forward(*x)``) or a dict (``forward(**x)``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

__all__ = [
    "ArraySource",
    "IterableSource",
    "batch_size_of",
    "concat_batches",
    "map_tensors",
    "make_fit_sources",
    "make_source",
    "to_cpu",
    "to_device",
    "to_numpy",
    "unpack",
]

Structure = Any  # a tensor, a tuple/list of tensors, or a dict of tensors


# ---- structures of tensors ------------------------------------------------------------------


def map_tensors(fn: Any, obj: Structure) -> Structure:
    """Apply ``fn`` to every tensor of a nested dict / list / tuple; other leaves stay."""
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


def _leaves(obj: Structure) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _leaves(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _leaves(v)]
    return []


def to_device(obj: Structure, device: torch.device) -> Structure:
    """Move every tensor of a (nested) batch to ``device``; CPU tensors stay untouched on CPU."""
    if device.type == "cpu":
        return obj
    non_blocking = device.type == "cuda"

    def move(t: torch.Tensor) -> torch.Tensor:
        if t.device == device:
            return t
        if non_blocking and t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()
        return t.to(device, non_blocking=non_blocking)

    return map_tensors(move, obj)


def batch_size_of(obj: Structure) -> int:
    """The number of samples in a batch: the first dimension of its first tensor."""
    if isinstance(obj, torch.Tensor):
        return obj.shape[0] if obj.dim() else 1
    leaves = _leaves(obj)
    return leaves[0].shape[0] if leaves and leaves[0].dim() else 1


def unpack(batch: Any) -> tuple[Any, Any, Any]:
    """Split a batch into ``(x, y, sample_weight)``; missing parts are None."""
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return batch[0], None, None
        if len(batch) == 2:
            return batch[0], batch[1], None
        if len(batch) == 3:
            return batch[0], batch[1], batch[2]
        raise ValueError(
            f"A batch must be (x,), (x, y) or (x, y, sample_weight); got a sequence of {len(batch)}"
            " items. Put several inputs in a tuple as the first item: ((x1, x2), y)."
        )
    return batch, None, None


# ---- arrays and tensors ---------------------------------------------------------------------


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value
    else:
        try:
            array = np.asarray(value)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"`{name}` could not be converted to an array: {exc}") from exc
        if array.dtype == object:
            raise TypeError(
                f"`{name}` has dtype object (ragged or mixed data); pass a numeric numpy array, "
                "a tensor, a Dataset or a DataLoader."
            )
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.is_floating_point() and tensor.dtype == torch.float64:
        tensor = tensor.to(torch.get_default_dtype())  # numpy's float64 -> float32, as Keras does
    if tensor.dim() == 0:
        raise ValueError(f"`{name}` is a scalar; it needs a first (batch) dimension.")
    return tensor


def _is_array_like(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray)) or (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and not _is_structure(value)
        and not _is_batch(value[0])
    )


def _is_batch(item: Any) -> bool:
    """An ``(x, y)`` batch as an element of a list of batches (not a row of numbers)."""
    return isinstance(item, Mapping) or (
        isinstance(item, (list, tuple))
        and any(isinstance(v, (torch.Tensor, np.ndarray, Mapping, tuple, list)) for v in item)
        and any(isinstance(v, (torch.Tensor, np.ndarray)) for v in item)
    )


def _is_structure(value: Any) -> bool:
    """A tuple/list/dict of arrays (several inputs) rather than a list of numbers."""
    if isinstance(value, Mapping):
        return True
    return isinstance(value, (list, tuple)) and all(
        isinstance(v, (torch.Tensor, np.ndarray, Mapping)) for v in value
    )


def _structure_to_tensors(value: Any, name: str) -> Structure:
    if isinstance(value, Mapping):
        return {k: _as_tensor(v, f"{name}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)) and _is_structure(value):
        return tuple(_as_tensor(v, f"{name}[{i}]") for i, v in enumerate(value))
    return _as_tensor(value, name)


def _length(structure: Structure, name: str) -> int:
    leaves = _leaves(structure)
    if not leaves:
        raise ValueError(f"`{name}` holds no arrays.")
    lengths = {t.shape[0] for t in leaves}
    if len(lengths) > 1:
        raise ValueError(f"The arrays inside `{name}` have different lengths: {sorted(lengths)}.")
    return lengths.pop()


def _take(structure: Structure, index: torch.Tensor | slice) -> Structure:
    return map_tensors(lambda t: t[index], structure)


class ArraySource:
    """Batches of in-memory arrays, sliced by index. ``order`` is the epoch's permutation."""

    def __init__(
        self,
        x: Structure,
        y: Structure | None,
        sample_weight: torch.Tensor | None,
        batch_size: int,
        shuffle: bool,
    ) -> None:
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self.num_samples = _length(x, "x")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.steps = math.ceil(self.num_samples / batch_size)
        self._parts = tuple(p for p in (x, y, sample_weight) if p is not None)

    def new_order(self) -> torch.Tensor | None:
        """The sample order of a new epoch (drawn from torch's global RNG), None when unshuffled."""
        return torch.randperm(self.num_samples) if self.shuffle else None

    def batches(self, order: torch.Tensor | None = None, start: int = 0) -> Iterator[tuple]:
        parts, bs, n = self._parts, self.batch_size, self.num_samples
        if len(parts) == 2 and all(isinstance(p, torch.Tensor) for p in parts):
            x, y = parts  # the common case, kept lean: it runs once per batch
            for i in range(start * bs, n, bs):
                index: torch.Tensor | slice = (
                    slice(i, i + bs) if order is None else order[i : i + bs]
                )
                yield x[index], y[index]
            return
        for i in range(start * bs, n, bs):
            index = slice(i, i + bs) if order is None else order[i : i + bs]
            yield tuple(_take(p, index) for p in parts)

    def split(self, fraction: float) -> tuple[ArraySource, ArraySource]:
        """Keras's ``validation_split``: the last ``fraction`` of the samples, before shuffling."""
        n_val = int(self.num_samples * fraction)
        n_train = self.num_samples - n_val
        if n_val == 0 or n_train == 0:
            raise ValueError(
                f"validation_split={fraction} of {self.num_samples} samples leaves "
                f"{n_train} for training and {n_val} for validation; both must be at least 1."
            )

        def part(sl: slice, shuffle: bool) -> ArraySource:
            return ArraySource(
                _take(self.x, sl),
                None if self.y is None else _take(self.y, sl),
                None if self.sample_weight is None else self.sample_weight[sl],
                self.batch_size,
                shuffle,
            )

        return part(slice(0, n_train), self.shuffle), part(slice(n_train, None), False)


# ---- datasets, loaders and other iterables --------------------------------------------------


class IterableSource:
    """Batches from a DataLoader or any iterable of batches, ``steps`` at most per epoch."""

    shuffle = False

    def __init__(self, iterable: Iterable[Any], steps: int | None, name: str) -> None:
        self.iterable = iterable
        self.is_iterator = iter(iterable) is iterable if hasattr(iterable, "__iter__") else False
        self.name = name
        known = _safe_len(iterable)
        self.steps = steps if steps is not None else known
        self._iterator: Iterator[Any] | None = None
        self.ran_out = False

    def new_order(self) -> None:
        return None

    def batches(self, order: None = None, start: int = 0) -> Iterator[tuple]:
        """This epoch's batches after the first ``start``.

        The iterator is created and the skipped batches are drawn now, not lazily, so that a
        resumed epoch consumes the RNG in the same order as an uninterrupted one.
        """
        if self._iterator is None or not self.is_iterator:
            self._iterator = iter(self.iterable)
        iterator = self._iterator
        skipped = 0
        while skipped < start:
            try:
                next(iterator)
            except StopIteration:
                break
            skipped += 1
        return self._rest(iterator, skipped)

    def _rest(self, iterator: Iterator[Any], step: int) -> Iterator[tuple]:
        while self.steps is None or step < self.steps:
            try:
                batch = next(iterator)
            except StopIteration:
                if self.steps is not None and step < self.steps:
                    self.ran_out = True
                    warnings.warn(
                        "Your input ran out of data; interrupting training. Make sure that your "
                        f"`{self.name}` can generate at least `steps_per_epoch * epochs` batches "
                        f"(it stopped after {step} of {self.steps} steps this epoch).",
                        stacklevel=4,
                    )
                break
            yield tuple(batch) if isinstance(batch, (list, tuple)) else (batch,)
            step += 1


def _safe_len(obj: Any) -> int | None:
    try:
        return len(obj)
    except TypeError:
        return None


def make_source(
    x: Any,
    y: Any = None,
    sample_weight: Any = None,
    *,
    batch_size: int | None,
    shuffle: bool,
    steps: int | None = None,
    class_weight: Mapping[int, float] | None = None,
    name: str = "x",
    need_y: bool = True,
) -> ArraySource | IterableSource:
    """Turn the user's input into a batch source, failing fast with a message that names it."""
    if x is None:
        raise ValueError(f"`{name}` is required: pass arrays, tensors, a Dataset or a DataLoader.")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"`batch_size` must be a positive integer; got {batch_size!r}.")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"The number of steps must be a positive integer; got {steps!r}.")
    if _is_map_dataset(x):
        _check_no_y(x, y, sample_weight, "a Dataset")
        if len(x) == 0:  # type: ignore[arg-type]
            raise ValueError(f"`{name}` is an empty Dataset.")
        loader = DataLoader(x, batch_size=batch_size or 32, shuffle=shuffle)
        return IterableSource(loader, steps, name)
    if isinstance(x, (DataLoader, IterableDataset)):
        _check_no_y(x, y, sample_weight, type(x).__name__)
        if batch_size is not None and isinstance(x, DataLoader):
            raise ValueError(
                "Do not pass `batch_size` with a DataLoader: it already batches. Set the batch size"
                " on the DataLoader."
            )
        if isinstance(x, IterableDataset):
            x = DataLoader(x, batch_size=batch_size or 32)
        return IterableSource(x, steps, name)
    if _is_structure(x) or _is_array_like(x):
        inputs = _structure_to_tensors(x, name)
        n = _length(inputs, name)
        if n == 0:
            raise ValueError(f"`{name}` is empty (0 samples); there is nothing to train on.")
        targets = None
        if y is not None:
            targets = _structure_to_tensors(y, "y")
            if _length(targets, "y") != n:
                raise ValueError(
                    f"`x` and `y` have different lengths: x has {n} samples, y has "
                    f"{_length(targets, 'y')}. Pass one target per sample."
                )
        elif need_y:
            raise ValueError("`y` is required when `x` is an array or tensor (pass targets).")
        weights = None
        if sample_weight is not None:
            weights = _as_tensor(sample_weight, "sample_weight").float().reshape(-1)
            if weights.shape[0] != n:
                raise ValueError(
                    f"`sample_weight` has {weights.shape[0]} values but `x` has {n} samples."
                )
        if class_weight is not None:
            weights = _class_weights(targets, class_weight, weights)
        return ArraySource(inputs, targets, weights, batch_size or 32, shuffle)
    if isinstance(x, Iterable) and not isinstance(x, (str, bytes)):
        _check_no_y(x, y, sample_weight, "an iterable of batches")
        return IterableSource(x, steps, name)
    raise TypeError(
        f"`{name}` must be a numpy array, a tensor, a tuple/list/dict of them, a Dataset, a "
        f"DataLoader or an iterable of (x, y) batches; got {type(x).__name__}."
    )


def _is_map_dataset(x: Any) -> bool:
    return isinstance(x, Dataset) and not isinstance(x, IterableDataset)


def _check_no_y(x: Any, y: Any, sample_weight: Any, what: str) -> None:
    if y is not None:
        raise ValueError(
            f"`y` must not be given when `x` is {what}: the batches already hold the targets."
        )
    if sample_weight is not None:
        raise ValueError(
            f"`sample_weight` must not be given when `x` is {what}: yield (x, y, sample_weight)."
        )


def _class_weights(
    targets: Structure | None, class_weight: Mapping[int, float], weights: torch.Tensor | None
) -> torch.Tensor:
    if not isinstance(targets, torch.Tensor):
        raise ValueError("`class_weight` needs a single target array `y`.")
    labels = targets
    if labels.dim() > 1 and labels.shape[-1] > 1:
        labels = labels.argmax(dim=-1)
    labels = labels.reshape(labels.shape[0], -1)[:, 0].long()
    n_classes = int(labels.max()) + 1
    table = torch.ones(max(n_classes, max(class_weight) + 1))
    for cls, w in class_weight.items():
        table[int(cls)] = float(w)
    per_sample = table[labels]
    return per_sample if weights is None else per_sample * weights


def _split_dataset(dataset: Dataset, fraction: float) -> tuple[Subset, Subset]:
    """``validation_split`` for a map-style Dataset: the last fraction, as for arrays."""
    n = len(dataset)  # type: ignore[arg-type]
    n_val = int(n * fraction)
    if n_val == 0 or n_val == n:
        raise ValueError(
            f"validation_split={fraction} of {n} samples leaves {n - n_val} for training and "
            f"{n_val} for validation; both must be at least 1."
        )
    return Subset(dataset, range(0, n - n_val)), Subset(dataset, range(n - n_val, n))


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


def to_numpy(obj: Any) -> Any:
    return map_tensors(lambda t: t.numpy(), obj)


def make_fit_sources(
    x: Any,
    y: Any,
    sample_weight: Any,
    *,
    batch_size: int | None,
    shuffle: bool,
    class_weight: Mapping[int, float] | None,
    steps_per_epoch: int | None,
    epochs_to_run: int,
    validation_split: float,
    validation_data: Any,
    validation_steps: int | None,
    validation_batch_size: int | None,
    validation_freq: Any,
) -> tuple[ArraySource | IterableSource, ArraySource | IterableSource | None]:
    """``fit``'s training and validation sources; every data argument is checked here."""
    if not (isinstance(validation_split, (int, float)) and 0 <= validation_split < 1):
        raise ValueError(
            f"`validation_split` must be a float in [0, 1); got {validation_split!r}. "
            "It is the fraction of the training data held out (the last samples)."
        )
    if not (
        (isinstance(validation_freq, int) and validation_freq >= 1)
        or (
            isinstance(validation_freq, (list, tuple))
            and all(isinstance(v, int) for v in validation_freq)
        )
    ):
        raise ValueError(
            "`validation_freq` must be a positive integer or a list of epochs "
            f"(1-based); got {validation_freq!r}."
        )
    val_dataset = None
    if validation_split and validation_data is None and _is_map_dataset(x):
        x, val_dataset = _split_dataset(x, validation_split)
    train = make_source(
        x,
        y,
        sample_weight,
        batch_size=batch_size,
        shuffle=shuffle,
        steps=steps_per_epoch,
        class_weight=class_weight,
    )
    if (
        isinstance(train, IterableSource)
        and train.is_iterator
        and steps_per_epoch is None
        and epochs_to_run > 1
    ):
        raise ValueError(
            "`x` is an iterator (a generator?) that can be consumed once, and fit() runs "
            f"{epochs_to_run} epochs: pass `steps_per_epoch` (batches per epoch), or pass a "
            "re-iterable object such as a list or a DataLoader."
        )
    if validation_data is not None:
        return train, _validation_source(
            validation_data, validation_batch_size or batch_size, validation_steps
        )
    if not validation_split:
        return train, None
    if val_dataset is not None:
        val_batch = validation_batch_size or batch_size
        return train, make_source(
            val_dataset, batch_size=val_batch, shuffle=False, steps=validation_steps
        )
    if not isinstance(train, ArraySource):
        raise ValueError(
            "`validation_split` works with arrays, tensors and Datasets (it takes the last "
            "fraction of the samples). With a DataLoader or an iterable, pass `validation_data`."
        )
    train, val = train.split(validation_split)
    if validation_batch_size:
        val.batch_size = validation_batch_size
        val.steps = math.ceil(val.num_samples / validation_batch_size)
    return train, val


def _validation_source(validation_data: Any, batch_size: int | None, steps: int | None) -> Any:
    """``(x_val, y_val)`` / ``(x_val, y_val, sample_weight)`` arrays, or a loader/iterable."""
    if (
        isinstance(validation_data, tuple)
        and len(validation_data) in (2, 3)
        and all(_is_array_like(v) or _is_structure(v) for v in validation_data)
    ):
        vx, vy, *rest = validation_data
        return make_source(
            vx,
            vy,
            rest[0] if rest else None,
            batch_size=batch_size,
            shuffle=False,
            steps=steps,
            name="validation_data",
        )
    return make_source(
        validation_data, batch_size=None, shuffle=False, steps=steps, name="validation_data"
    )
