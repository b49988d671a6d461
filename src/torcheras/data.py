"""Inputs to batches.

Arrays and tensors are batched by index slicing (one gather per batch, never sample by
sample); a ``Dataset`` becomes a ``DataLoader``; a ``DataLoader`` or any iterable of batches is
used as it is. A batch is a tuple ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)``, where ``x``
is a tensor, a tuple of tensors (``forward(*x)``) or a dict (``forward(**x)``).
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
)

from torcheras.losses import IGNORE_INDEX
from torcheras.tensors import (  # re-exported: data.to_cpu & co. are public names
    Structure,
    concat_batches,
    leaves,
    map_tensors,
    to_cpu,
    to_numpy,
)

__all__ = [
    "ArraySource",
    "PyDataset",
    "IterableSource",
    "batch_size_of",
    "concat_batches",
    "map_tensors",
    "make_fit_sources",
    "make_source",
    "to_cpu",
    "to_device",
    "DeviceStager",
    "shard",
    "to_numpy",
    "unpack",
]

# ---- batches on the device -----------------------------------------------------------------


def to_device(obj: Structure, device: torch.device) -> Structure:
    """Move every tensor of a (nested) batch to ``device``; CPU tensors stay untouched on CPU."""
    if device.type == "cpu":
        return obj
    non_blocking = device.type == "cuda"
    return map_tensors(
        lambda t: t if t.device == device else t.to(device, non_blocking=non_blocking), obj
    )


class DeviceStager:
    """Moves batches to the training device without stalling it.

    On CUDA, CPU tensors are copied into pinned host buffers that are reused from batch to
    batch (a ring of ``slots``, each reused only once its copy to the GPU has finished), then
    sent with a non-blocking copy: no pinning per batch, no synchronisation. Tensors already
    pinned (a ``DataLoader(pin_memory=True)``) or already on the device go as they are. On the
    CPU a batch is returned unchanged.
    """

    def __init__(self, device: torch.device, slots: int = 3) -> None:
        self.device = device
        self._cuda = device.type == "cuda"
        self._buffers: list[dict[int, torch.Tensor]] = [{} for _ in range(slots)]
        self._events: list[Any] = [None] * slots
        self._next = 0

    def __call__(self, batch: Structure) -> Structure:
        if self.device.type == "cpu":
            return batch
        if not self._cuda:
            return to_device(batch, self.device)
        slot = self._next
        self._next = (slot + 1) % len(self._buffers)
        event = self._events[slot]
        if event is not None and not event.query():  # normally long done: no wait
            event.synchronize()
        buffers, position = self._buffers[slot], [0]
        device = self.device

        def move(t: torch.Tensor) -> torch.Tensor:
            if t.device.type != "cpu" or t.is_pinned():
                return t if t.device == device else t.to(device, non_blocking=True)
            key = position[0]
            position[0] += 1
            buffer = buffers.get(key)
            if buffer is None or buffer.dtype != t.dtype or buffer.numel() < t.numel():
                buffer = buffers[key] = torch.empty(t.numel(), dtype=t.dtype, pin_memory=True)
            staged = buffer[: t.numel()].view(t.shape)
            staged.copy_(t)
            return staged.to(device, non_blocking=True)

        out = map_tensors(move, batch)
        self._events[slot] = torch.cuda.Event()
        self._events[slot].record()
        return out


def rank_part(size: int, rank: int, world_size: int) -> slice:
    """The ``rank``-th of ``world_size`` near-equal contiguous slices of ``size`` items (what
    ``loops._gather_in_order`` puts back together, in rank order)."""
    return slice(size * rank // world_size, size * (rank + 1) // world_size)


def shard(batch: Structure, rank: int, world_size: int) -> Structure:
    """This rank's part of a global batch (:func:`rank_part` along the batch axis; Keras's
    ``batch_size`` stays the global batch)."""
    if world_size == 1:
        return batch
    return map_tensors(lambda t: t[rank_part(t.shape[0], rank, world_size)], batch)


def batch_size_of(obj: Structure) -> int:
    """The number of samples in a batch: the first dimension of its first tensor."""
    if type(obj) is torch.Tensor or isinstance(obj, torch.Tensor):
        return obj.shape[0] if obj.dim() else 1
    found = leaves(obj)
    return found[0].shape[0] if found and found[0].dim() else 1


def unpack(batch: Any) -> tuple[Any, Any, Any]:
    """Split a batch into ``(x, y, sample_weight)``; missing parts are None."""
    if (type(batch) is tuple or type(batch) is list) and len(batch) == 2:  # the common case
        return batch[0], batch[1], None
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


def as_int(value: Any, name: str, minimum: int = 0) -> int:
    """``value`` as a Python int (numpy integers too), at least ``minimum``; else a ValueError."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum:
        return int(value)
    kind = "positive" if minimum == 1 else "non-negative"
    raise ValueError(f"`{name}` must be a {kind} integer; got {value!r}.")


def _is_pandas(value: Any) -> bool:
    return type(value).__module__.startswith("pandas") and hasattr(value, "to_numpy")


def _pandas_to_numpy(value: Any, name: str) -> np.ndarray:
    """A DataFrame or Series as one numeric array: columns of several kinds (floats, ints,
    booleans) in their common type; else a TypeError naming the columns (or the Series) that
    hold no numbers, and how to encode or drop them."""
    columns = getattr(value, "columns", None)
    if columns is None:  # a Series
        dtype = value.dtype
        if getattr(dtype, "kind", "O") not in "biufc":
            raise TypeError(
                f"`{name}` is a pandas Series of {dtype} ({value.name!r}), not numbers. Encode "
                "it first: class indices with series.astype('category').cat.codes, or one-hot "
                "columns with pd.get_dummies(series)."
            )
        return value.to_numpy()
    bad = [(c, t) for c, t in value.dtypes.items() if getattr(t, "kind", "O") not in "biufc"]
    if bad:
        names = [c for c, _ in bad]
        raise TypeError(
            f"`{name}` is a pandas DataFrame with columns that are not numbers: "
            + ", ".join(f"{c!r} ({t})" for c, t in bad)
            + f". Encode them (one-hot: pd.get_dummies(df, columns={names!r}); class indices: "
            f"df[{names[0]!r}].astype('category').cat.codes) or drop them "
            f"(df.drop(columns={names!r}))."
        )
    if len(set(value.dtypes)) > 1:  # to_numpy would give objects
        try:
            common = np.result_type(*(getattr(t, "numpy_dtype", t) for t in value.dtypes))
            return value.to_numpy(dtype=common)
        except (TypeError, ValueError):  # missing values in nullable ints: the error below
            pass
    return value.to_numpy()


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value
    else:
        if _is_pandas(value):
            value = _pandas_to_numpy(value, name)
        try:
            array = np.asarray(value)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"`{name}` could not be converted to an array: {exc}") from exc
        if array.dtype.kind in "USO":
            what = "strings" if array.dtype.kind in "US" else "objects (ragged or mixed data)"
            raise TypeError(
                f"`{name}` holds {what} (dtype {array.dtype}); a model needs numbers. Encode "
                "them first (class indices, one-hot or embeddings ids) and pass a numeric "
                "numpy array, a tensor, a Dataset or a DataLoader."
            )
        array = np.ascontiguousarray(array)
        if not array.flags.writeable:  # e.g. pandas' read-only views: torch wants to own it
            array = array.copy()
        tensor = torch.from_numpy(array)
    if tensor.is_floating_point() and tensor.dtype == torch.float64:
        tensor = tensor.to(torch.get_default_dtype())  # numpy's float64 -> float32, as Keras does
    if tensor.dim() == 0:
        raise ValueError(f"`{name}` is a scalar; it needs a first (batch) dimension.")
    return tensor


def _is_array_like(value: Any) -> bool:
    return (
        isinstance(value, (torch.Tensor, np.ndarray))
        or _is_pandas(value)
        or (
            isinstance(value, (list, tuple))
            and len(value) > 0
            and not _is_structure(value)
            and not _is_batch(value[0])
        )
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
    found = leaves(structure)
    if not found:
        raise ValueError(f"`{name}` holds no arrays.")
    lengths = {t.shape[0] for t in found}
    if len(lengths) > 1:
        raise ValueError(f"The arrays inside `{name}` have different lengths: {sorted(lengths)}.")
    return lengths.pop()


def _take(structure: Structure, index: torch.Tensor | slice) -> Structure:
    """The rows ``index`` of every tensor. Shuffled rows are gathered by ``index_select``:
    ``t[index]``'s values without Python's indexing machinery (about half the CPU work of a
    small batch's gather), and for sparse COO tensors too, which ``t[index]`` refuses."""
    if isinstance(index, slice):
        return map_tensors(lambda t: t[index], structure)
    return map_tensors(lambda t: t.index_select(0, index), structure)


class ArraySource:
    """Batches of in-memory arrays, sliced by index. ``order`` is the epoch's permutation.

    ``max_steps`` (``steps_per_epoch``) caps the batches of an epoch; asking for more than
    the arrays hold runs out of data, as in Keras.
    """

    def __init__(
        self,
        x: Structure,
        y: Structure | None,
        sample_weight: torch.Tensor | None,
        batch_size: int,
        shuffle: bool,
        max_steps: int | None = None,
        name: str = "x",
    ) -> None:
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self.num_samples = _length(x, "x")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.max_steps = max_steps
        self.name = name
        self.ran_out = False
        self._set_parts()

    per_rank = False  # every rank indexes the same batches, then keeps its slice (``shard``)

    @functools.cached_property
    def labels_may_pad(self) -> bool:
        """Whether any integer label is -100 (torch's ``ignore_index``, padding): looked at
        once, so that accuracies mask padding per batch only where the data has some."""
        return any(
            not (t.is_floating_point() or t.dtype == torch.bool) and bool((t == IGNORE_INDEX).any())
            for t in leaves(self.y)
        )

    def distribute(self, rank: int, world_size: int, *, training: bool, seed: int) -> None:
        """Nothing to do: the order is drawn once and shared; each rank slices each batch."""

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do: :meth:`new_order` draws each epoch's order."""

    def _set_parts(self) -> None:
        devices = {t.device for part in (self.x, self.y, self.sample_weight) for t in leaves(part)}
        self._device = devices.pop() if len(devices) == 1 else torch.device("cpu")
        available = math.ceil(self.num_samples / self.batch_size)
        self.steps = available if self.max_steps is None else self.max_steps
        self._parts = tuple(p for p in (self.x, self.y, self.sample_weight) if p is not None)

    def new_order(self) -> torch.Tensor | None:
        """The sample order of a new epoch, None when unshuffled. Drawn from torch's global RNG
        on the device the arrays live on, so arrays already on a GPU are indexed there (no
        index copied from the host per batch)."""
        if not self.shuffle:
            return None
        return torch.randperm(self.num_samples, device=self._device)

    def batches(self, order: torch.Tensor | None = None, start: int = 0) -> Iterator[tuple]:
        parts, bs, n = self._parts, self.batch_size, self.num_samples
        if order is not None and order.device != self._device:  # an order read from a backup
            order = order.to(self._device)
        end = n if self.max_steps is None else min(n, self.max_steps * bs)
        if len(parts) == 2 and all(isinstance(p, torch.Tensor) for p in parts):
            x, y = parts  # the common case, kept lean: it runs once per batch
            if order is None:
                for i in range(start * bs, end, bs):
                    yield x[i : i + bs], y[i : i + bs]
            else:
                for i in range(start * bs, end, bs):
                    index = order[i : i + bs]
                    yield x.index_select(0, index), y.index_select(0, index)
        elif len(parts) == 1 and isinstance(parts[0], torch.Tensor):  # inputs alone: predict
            (x,) = parts
            for i in range(start * bs, end, bs):
                yield (x[i : i + bs] if order is None else x.index_select(0, order[i : i + bs]),)
        else:
            for i in range(start * bs, end, bs):
                index = slice(i, i + bs) if order is None else order[i : i + bs]
                yield tuple(_take(p, index) for p in parts)
        if self.max_steps is not None and self.max_steps * bs > n:
            self.ran_out = True
            _warn_ran_out(self.name, math.ceil(n / bs), self.max_steps)

    def close(self) -> None:
        """Nothing to let go of: the arrays are the user's."""

    def split(self, fraction: float) -> tuple[ArraySource, ArraySource]:
        """Keras's ``validation_split``: the last ``fraction`` of the samples, before shuffling."""
        n_train = split_at(self.num_samples, fraction)

        def part(sl: slice, shuffle: bool, max_steps: int | None) -> ArraySource:
            return ArraySource(
                _take(self.x, sl),
                None if self.y is None else _take(self.y, sl),
                None if self.sample_weight is None else _take(self.sample_weight, sl),
                self.batch_size,
                shuffle,
                max_steps,
            )

        return (
            part(slice(0, n_train), self.shuffle, self.max_steps),
            part(slice(n_train, None), False, None),
        )

    def apply_class_weight(self, class_weight: Mapping[Any, float], one_hot: bool = False) -> None:
        """Multiply the sample weights by each sample's (or position's) class weight (training
        data only); ``one_hot``: the targets are one-hot rows, whatever their dtype."""
        self.sample_weight = _class_weights(self.y, class_weight, self.sample_weight, one_hot)
        self._set_parts()


def split_at(n: int, fraction: float) -> int:
    """Where ``validation_split=fraction`` cuts ``n`` samples: Keras's rule,
    ``floor(n * (1 - fraction))`` training samples, the rest (the last ones) for validation
    (5 samples, ``0.3``: 3 and 2). A ValueError when either side would be empty."""
    n_train = int(math.floor(n * (1.0 - fraction)))
    if n_train == 0 or n_train == n:
        raise ValueError(
            f"validation_split={fraction} of {n} samples leaves {n_train} for training and "
            f"{n - n_train} for validation (Keras's rule: floor(n * (1 - validation_split)) "
            "for training); both must be at least 1. Provide more data or another "
            "validation_split."
        )
    return n_train


def _warn_ran_out(name: str, step: int, steps: int) -> None:
    warnings.warn(
        "Your input ran out of data; interrupting training. Make sure that your "
        f"`{name}` can generate at least `steps_per_epoch * epochs` batches "
        f"(it stopped after {step} of {steps} steps this epoch).",
        stacklevel=5,
    )


# ---- datasets, loaders and other iterables --------------------------------------------------


class IterableSource:
    """Batches from a DataLoader or any iterable of batches, ``steps`` at most per epoch.

    With ``steps_per_epoch``, an epoch continues where the last one stopped (as in Keras) and
    the iterable is restarted only when it is exhausted; without it, each epoch is one pass.
    :meth:`state_dict` records the position (the RNG state the pass started from and the
    batches drawn from it) so that a resumed run draws the same batches.
    """

    shuffle = False
    labels_may_pad = True  # batches not seen yet: accuracies mask padding labels per batch

    def __init__(
        self, iterable: Iterable[Any], steps: int | None, name: str, batches_items: bool = False
    ) -> None:
        self.iterable = iterable
        # a Dataset torcheras batches itself, its items taken for samples (check_input_rank)
        self.batches_items = batches_items
        self.is_iterator = iter(iterable) is iterable if hasattr(iterable, "__iter__") else False
        self.name = name
        self.continues = False  # set by fit for training with steps_per_epoch
        known = _safe_len(iterable)
        self.steps = steps if steps is not None else known
        self._iterator: Iterator[Any] | None = None
        self._pass_rng: torch.Tensor | None = None
        self._consumed = 0
        self._restore: dict[str, Any] | None = None
        self.ran_out = False
        self.per_rank = False  # batches are already this rank's part (a DistributedSampler)
        self.sampler: DistributedSampler | None = None
        self.own_sampler = False  # the DistributedSampler is torcheras's (the batch is global)

    def new_order(self) -> None:
        return None

    def distribute(
        self, rank: int, world_size: int, *, training: bool, seed: int, force: bool = False
    ) -> None:
        """Under torchrun, let each rank load only its part of the data, once per source.

        A ``DataLoader`` that already has a ``DistributedSampler`` is used as it is (its
        ``batch_size`` is then per rank) and gets ``set_epoch`` every epoch. For training, a
        ``DataLoader`` over a Dataset with the default sampler is rebuilt with a
        ``DistributedSampler`` (shuffled if the loader was, seeded with ``seed``) and
        ``batch_size // world_size`` per rank: rank ``r`` takes every ``world_size``-th sample
        of the epoch's permutation, so each global batch is ``batch_size`` samples of it. For
        evaluation and prediction, each rank loads its contiguous slice of every batch (exact
        results: no sample padded or dropped). Any other iterable is read whole by every
        rank, which keeps its slice of each batch. ``force``: a ``DistributedSampler`` even
        for one process (a backup of several resumed alone continues their sampler's order).
        """
        loader = self.iterable
        if self.per_rank or (world_size == 1 and not force) or not isinstance(loader, DataLoader):
            return
        if isinstance(loader.sampler, DistributedSampler):
            self.per_rank, self.sampler = True, loader.sampler
            return
        default = (
            _is_map_dataset(loader.dataset)
            and type(loader.batch_sampler) is BatchSampler
            and type(loader.sampler) in (RandomSampler, SequentialSampler)
            and not getattr(loader.sampler, "replacement", False)
            and getattr(loader.sampler, "_num_samples", None) is None
        )
        if not default:
            return
        batch_size = loader.batch_size
        assert batch_size is not None  # a default BatchSampler has one
        if training:
            if batch_size % world_size:
                raise ValueError(
                    f"The training DataLoader's batch_size={batch_size} (the global batch) does "
                    f"not split evenly across {world_size} processes. Use a multiple of "
                    f"{world_size}, or give the DataLoader your own DistributedSampler (its "
                    "batch_size is then per process)."
                )
            self.own_sampler = True
            self.sampler = DistributedSampler(
                loader.dataset,
                num_replicas=world_size,
                rank=rank,
                shuffle=type(loader.sampler) is RandomSampler,
                seed=seed,
            )
            self.iterable = _rebuild_loader(
                loader,
                batch_size=batch_size // world_size,
                sampler=self.sampler,
                drop_last=loader.drop_last,
            )
        else:
            batches = _SliceOfEachBatch(loader.batch_sampler, rank, world_size)
            self.iterable = _rebuild_loader(loader, batch_sampler=batches)
        self.per_rank = True
        if self.steps is None or self.steps == _safe_len(loader):
            self.steps = _safe_len(self.iterable)

    @property
    def global_batch_size(self) -> int | None:
        """The batch of all processes together, where torcheras split it (its sampler)."""
        size = getattr(self.iterable, "batch_size", None)
        if size is None or self.sampler is None or not self.own_sampler:
            return size
        return size * self.sampler.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """A ``DistributedSampler``'s shuffle depends on the epoch: set it before the pass."""
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def _new_pass(self) -> Iterator[Any]:
        self._pass_rng = torch.get_rng_state()  # a DataLoader draws its shuffle seed at iter()
        self._consumed = 0
        self._iterator = iter(self.iterable)
        return self._iterator

    def batches(self, order: None = None, start: int = 0) -> Iterator[tuple]:
        """This epoch's batches (after the first ``start`` of it, for a resumed epoch).

        The iterator is created and skipped batches are drawn now, not lazily, so that a
        resumed epoch consumes the RNG in the same order as an uninterrupted one.
        """
        restore, self._restore = self._restore, None
        if restore is not None and (self.continues or start > 0):  # else a fresh pass is right
            rng = torch.get_rng_state()
            if restore["pass_rng"] is not None:
                torch.set_rng_state(restore["pass_rng"])
            iterator = self._new_pass()
            for _ in range(restore["consumed"]):
                if next(iterator, _END) is _END:
                    break
                self._consumed += 1
            torch.set_rng_state(rng)
            return self._rest(iterator, start)
        if self._iterator is None or not self.continues:
            iterator = self._new_pass()
        else:
            iterator = self._iterator
        skipped = 0
        while skipped < start:
            if next(iterator, _END) is _END:
                break
            self._consumed += 1
            skipped += 1
        return self._rest(iterator, skipped)

    def _rest(self, iterator: Iterator[Any], step: int) -> Iterator[tuple]:
        first = step
        while self.steps is None or step < self.steps:
            batch = next(iterator, _END)
            if batch is _END and step == first and self.continues and not self.is_iterator:
                iterator = self._new_pass()  # exhausted at an epoch boundary: a new pass
                batch = next(iterator, _END)
            if batch is _END:
                if self.steps is not None and step < self.steps:
                    self.ran_out = True
                    self._iterator = None
                    _warn_ran_out(self.name, step, self.steps)
                break
            self._consumed += 1
            yield tuple(batch) if isinstance(batch, (list, tuple)) else (batch,)
            step += 1

    def close(self) -> None:
        """Let go of the pass kept between epochs (``steps_per_epoch``). The workers of a
        DataLoader pass that fit started stop now, not whenever the garbage collector gets to
        them; what is the user's is only let go of: an iterator or generator they passed,
        and the pass a DataLoader with ``persistent_workers`` keeps for its next epoch."""
        iterator, self._iterator = self._iterator, None
        if iterator is None or self.is_iterator:
            return
        if getattr(self.iterable, "persistent_workers", False):
            return
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"pass_rng": self._pass_rng, "consumed": self._consumed}
        if self.sampler is not None:
            state["sampler_seed"] = self.sampler.seed
            state["shuffle"] = self.sampler.shuffle
            if not self.own_sampler:  # the user's: its batch_size is per process
                state["per_process_batches"] = True
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next :meth:`batches` call replays the pass up to where it was."""
        self._restore = dict(state)
        if self.sampler is not None and "sampler_seed" in state:
            self.sampler.seed = state["sampler_seed"]


class _SliceOfEachBatch:
    """A batch sampler yielding this rank's contiguous slice of each batch of ``batches``
    (the slices :func:`shard` takes from a batch of tensors)."""

    def __init__(self, batches: Iterable[list[int]], rank: int, world_size: int) -> None:
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        for indices in self.batches:
            yield list(indices)[rank_part(len(indices), self.rank, self.world_size)]

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]


def _rebuild_loader(loader: DataLoader, **changes: Any) -> DataLoader:
    """A DataLoader like ``loader`` (workers, collate, pinning...) with ``changes``."""
    settings: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
        "persistent_workers": loader.persistent_workers,
        "pin_memory_device": loader.pin_memory_device,
    }
    if loader.num_workers > 0:
        settings["prefetch_factor"] = loader.prefetch_factor
    settings.update(changes)
    return DataLoader(loader.dataset, **settings)


_END = object()


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
    name: str = "x",
    need_y: bool = True,
) -> ArraySource | IterableSource:
    """Turn the user's input into a batch source, failing fast with a message that names it."""
    if x is None:
        raise ValueError(f"`{name}` is required: pass arrays, tensors, a Dataset or a DataLoader.")
    if batch_size is not None:
        batch_size = as_int(batch_size, "batch_size", minimum=1)
    if steps is not None:
        steps = as_int(steps, "steps", minimum=1)
    if _is_py_dataset(x):
        _check_no_y(x, y, sample_weight, "a PyDataset")
        if batch_size is not None:
            raise ValueError(
                "Do not pass `batch_size` with a PyDataset: each of its items is a batch."
            )
        if len(x) == 0:
            raise ValueError(f"`{name}` is an empty PyDataset (no batches).")
        return IterableSource(_PyDatasetBatches(x, shuffle), steps, name)
    if _is_map_dataset(x):
        _check_no_y(x, y, sample_weight, "a Dataset")
        if len(x) == 0:  # type: ignore[arg-type]
            raise ValueError(f"`{name}` is an empty Dataset.")
        loader = DataLoader(x, batch_size=batch_size or 32, shuffle=shuffle)
        return IterableSource(loader, steps, name, batches_items=True)
    if isinstance(x, (DataLoader, IterableDataset)):
        _check_no_y(x, y, sample_weight, type(x).__name__)
        if batch_size is not None and isinstance(x, DataLoader):
            raise ValueError(
                "Do not pass `batch_size` with a DataLoader: it already batches. Set the batch size"
                " on the DataLoader."
            )
        if isinstance(x, IterableDataset):
            loader = DataLoader(x, batch_size=batch_size or 32)
            return IterableSource(loader, steps, name, batches_items=True)
        return IterableSource(x, steps, name)
    if _is_structure(x) or _is_array_like(x):
        inputs = _structure_to_tensors(x, name)
        n = _length(inputs, name)
        if n == 0:
            raise ValueError(f"`{name}` is empty (0 samples); there is nothing to train on.")
        targets = None
        if y is not None:
            y_name = "y" if name == "x" else f"{name}'s y"
            targets = _structure_to_tensors(y, y_name)
            if _length(targets, y_name) != n:
                raise ValueError(
                    f"`{name}` and `{y_name}` have different lengths: {n} samples and "
                    f"{_length(targets, y_name)} targets. Pass one target per sample."
                )
        elif need_y:
            raise ValueError(
                f"`y` is required when `{name}` is an array or tensor: the default train_step "
                "computes the loss against targets. Pass y, or override train_step to train "
                "on inputs alone."
            )
        weights: Any = None
        if isinstance(sample_weight, Mapping):  # several outputs: weights per output
            weights = {
                key: _sample_weights(value, f"sample_weight[{key!r}]", n, name)
                for key, value in sample_weight.items()
            }
        elif sample_weight is not None:
            weights = _sample_weights(sample_weight, "sample_weight", n, name)
        return ArraySource(inputs, targets, weights, batch_size or 32, shuffle, steps, name)
    if isinstance(x, Iterable) and not isinstance(x, (str, bytes)):
        _check_no_y(x, y, sample_weight, "an iterable of batches")
        return IterableSource(x, steps, name)
    raise TypeError(
        f"`{name}` must be a numpy array, a tensor, a pandas DataFrame, a tuple/list/dict of "
        f"them, a Dataset, a DataLoader or an iterable of (x, y) batches; got {type(x).__name__}."
    )


class PyDataset:
    """Keras's ``PyDataset`` (``keras.utils.Sequence``): a dataset of **batches**.

    Subclass it with ``__len__`` (the number of batches) and ``__getitem__(i)`` returning batch
    ``i``: ``(x, y)``, ``(x, y, sample_weight)`` or ``(x,)``, already batched. ``fit``,
    ``evaluate`` and ``predict`` take one batch per item, never batching again (a map-style
    ``Dataset`` of batches would be: use this class, or ``DataLoader(ds, batch_size=None)``).
    As in Keras, ``fit`` visits the batches in a new random order each epoch unless
    ``shuffle=False`` (evaluation and prediction keep their order), and calls
    ``on_epoch_begin()`` / ``on_epoch_end()`` around each pass. A ``keras.utils.PyDataset``
    instance is taken the same way. ``workers`` and friends are accepted and ignored: wrap the
    data in a ``DataLoader(ds, batch_size=None, num_workers=...)`` for parallel loading.

    Example:
        ```python
        class Batches(torcheras.data.PyDataset):
            def __len__(self):
                return math.ceil(len(x) / 32)

            def __getitem__(self, i):
                return x[i * 32 : (i + 1) * 32], y[i * 32 : (i + 1) * 32]

        model.fit(Batches(), epochs=5)
        ```
    """

    def __init__(
        self, workers: int = 1, use_multiprocessing: bool = False, max_queue_size: int = 10
    ) -> None:
        self.workers, self.use_multiprocessing = workers, use_multiprocessing
        self.max_queue_size = max_queue_size

    def __len__(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must define __len__ (its batches).")

    def __getitem__(self, index: int) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define __getitem__ (a batch).")

    def on_epoch_begin(self) -> None:
        """Called before each pass over the batches."""

    def on_epoch_end(self) -> None:
        """Called after each pass over the batches (reshuffle your samples here)."""


def _is_py_dataset(x: Any) -> bool:
    """Ours, or Keras's ``PyDataset`` / ``Sequence`` (recognised without importing Keras)."""
    return isinstance(x, PyDataset) or any(
        cls.__name__ in ("PyDataset", "Sequence") and cls.__module__.startswith("keras")
        for cls in type(x).__mro__
    )


class _PyDatasetBatches:
    """One pass over a PyDataset's batches: item by item, in a random order if ``shuffle``
    (torch's RNG, so ``torch.manual_seed`` fixes it), with its epoch hooks around the pass."""

    def __init__(self, dataset: Any, shuffle: bool) -> None:
        self.dataset, self.shuffle = dataset, shuffle

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[Any]:
        n = len(self.dataset)
        order = torch.randperm(n).tolist() if self.shuffle else range(n)
        begin = getattr(self.dataset, "on_epoch_begin", None)
        if callable(begin):
            begin()
        end = getattr(self.dataset, "on_epoch_end", None)
        for position, i in enumerate(order):
            batch = _numpy_to_tensors(self.dataset[i])
            if position == n - 1 and callable(end):  # every batch read: the pass is over
                end()
            yield batch


def _numpy_to_tensors(obj: Any) -> Any:
    """A batch's numpy arrays (Keras's PyDatasets return them) as tensors, float64 as the
    default float type, as for array inputs."""
    if isinstance(obj, np.ndarray) or _is_pandas(obj):
        return _as_tensor(obj, "a PyDataset batch")
    if isinstance(obj, Mapping):
        return {k: _numpy_to_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_numpy_to_tensors(v) for v in obj)
    return obj


def _is_map_dataset(x: Any) -> bool:
    return isinstance(x, Dataset) and not isinstance(x, IterableDataset)


def _sample_weights(value: Any, argument: str, n: int, name: str) -> torch.Tensor:
    weights = _as_tensor(value, argument).float()
    if weights.dim() == 0 or weights.shape[0] != n:
        size = weights.shape[0] if weights.dim() else "a single value (0-d)"
        raise ValueError(
            f"`{argument}` has {size} rows but `{name}` has {n} samples: give one weight per "
            "sample (N,), or one per position (N, T) for sequence outputs."
        )
    return weights


def _check_no_y(x: Any, y: Any, sample_weight: Any, what: str) -> None:
    if y is not None:
        raise ValueError(
            f"`y` must not be given when `x` is {what}: the batches already hold the targets."
        )
    if sample_weight is not None:
        raise ValueError(
            f"`sample_weight` must not be given when `x` is {what}: yield (x, y, sample_weight)."
        )


def check_class_weight(class_weight: Any) -> dict[int, float]:
    """``class_weight`` as ``{int class: float weight}``; a ValueError naming what is wrong."""
    if not isinstance(class_weight, Mapping):
        raise ValueError(
            f"`class_weight` must be a dict {{class index: weight}}; got "
            f"{type(class_weight).__name__}."
        )
    table: dict[int, float] = {}
    for key, weight in class_weight.items():
        if not isinstance(key, numbers.Integral) or isinstance(key, bool) or key < 0:
            raise ValueError(
                f"`class_weight` keys must be class indices (non-negative integers); got "
                f"{key!r}. Map each class index to its weight: {{0: 1.0, 1: 5.0}}."
            )
        try:
            table[int(key)] = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"`class_weight[{key!r}]` must be a number; got {weight!r}.") from None
    return table


def _class_weights(
    targets: Structure | None,
    class_weight: Mapping[Any, float],
    weights: torch.Tensor | None,
    one_hot: bool = False,
) -> torch.Tensor:
    """The weight of each target's class, times ``weights``: one per sample, or one per
    position for sequence labels ``(N, T)`` (Keras's temporal sample weights). One-hot or
    probability targets (floats whose last axis has more than one entry, or any targets when
    ``one_hot``, the compiled loss being categorical) give their argmax's class; a label of
    -100 (ignored by the cross-entropies) gets weight 1 and counts for nothing anyway."""
    class_weight = check_class_weight(class_weight)
    if not isinstance(targets, torch.Tensor):
        raise ValueError("`class_weight` needs a single target array `y`.")
    labels = targets
    if labels.dim() > 1 and labels.shape[-1] > 1 and (one_hot or labels.is_floating_point()):
        labels = labels.argmax(dim=-1)
    elif labels.dim() > 1 and labels.shape[-1] == 1:
        labels = labels.squeeze(-1)
    labels = labels.long()
    kept = labels[labels != IGNORE_INDEX]
    if kept.numel() and int(kept.min()) < 0:
        raise ValueError(
            f"`class_weight` needs class indices in `y`; found the label {int(kept.min())}."
        )
    n_classes = int(kept.max()) + 1 if kept.numel() else 0
    table = torch.ones(max(n_classes, max(class_weight, default=-1) + 1, 1))
    for cls, w in class_weight.items():
        table[int(cls)] = float(w)
    per_label = table[labels.clamp_min(0)]
    if weights is None:
        return per_label
    # a weight per sample and a class weight per position (or the converse) meet per position
    dims = max(per_label.dim(), weights.dim())

    def padded(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape + (1,) * (dims - t.dim()))

    return padded(per_label) * padded(weights)


def _split_dataset(dataset: Dataset, fraction: float) -> tuple[Subset, Subset]:
    """``validation_split`` for a map-style Dataset: the last fraction, as for arrays."""
    n = len(dataset)  # type: ignore[arg-type]
    n_train = split_at(n, fraction)
    return Subset(dataset, range(0, n_train)), Subset(dataset, range(n_train, n))


def make_fit_sources(
    x: Any,
    y: Any,
    sample_weight: Any,
    *,
    batch_size: int | None,
    shuffle: bool,
    class_weight: Mapping[Any, float] | None,
    steps_per_epoch: int | None,
    epochs_to_run: int,
    validation_split: float,
    validation_data: Any,
    validation_steps: int | None,
    validation_batch_size: int | None,
    validation_freq: Any,
    need_y: bool = True,
    one_hot_targets: bool = False,
) -> tuple[ArraySource | IterableSource, ArraySource | IterableSource | None]:
    """``fit``'s training and validation sources; every data argument is checked here.

    ``validation_split`` is taken before ``class_weight`` is applied: validation is never
    class-weighted (Keras). ``one_hot_targets``: the compiled loss takes one-hot rows, so
    ``class_weight`` reads integer rows as one-hot too (floats always are).
    """
    if not (
        isinstance(validation_split, numbers.Real)
        and not isinstance(validation_split, bool)
        and 0 <= validation_split < 1
    ):
        raise ValueError(
            f"`validation_split` must be a float in [0, 1); got {validation_split!r}. "
            "It is the fraction of the training data held out (the last samples)."
        )
    if isinstance(validation_freq, numbers.Integral) and not isinstance(validation_freq, bool):
        validation_freq = as_int(validation_freq, "validation_freq", minimum=1)
    elif not (
        isinstance(validation_freq, (list, tuple))
        and all(isinstance(v, numbers.Integral) for v in validation_freq)
    ):
        raise ValueError(
            "`validation_freq` must be a positive integer or a list of epochs "
            f"(1-based); got {validation_freq!r}."
        )
    if validation_steps is not None:
        validation_steps = as_int(validation_steps, "validation_steps", minimum=1)
    if validation_batch_size is not None:
        validation_batch_size = as_int(validation_batch_size, "validation_batch_size", minimum=1)
    if class_weight is not None:
        check_class_weight(class_weight)
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
        need_y=need_y,
    )
    if isinstance(train, IterableSource):  # Keras: epochs continue the pass (validation restarts)
        train.continues = steps_per_epoch is not None
    if class_weight is not None and not isinstance(train, ArraySource):
        raise ValueError(
            "`class_weight` works with array or tensor inputs. With a Dataset, a DataLoader or "
            "an iterable, yield (x, y, sample_weight) batches with the weights instead."
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
    val: ArraySource | IterableSource | None = None
    if validation_data is not None:
        val = _validation_source(
            validation_data, validation_batch_size or batch_size, validation_steps, train
        )
    elif val_dataset is not None:
        val = make_source(
            val_dataset,
            batch_size=validation_batch_size or batch_size,
            shuffle=False,
            steps=validation_steps,
        )
    elif validation_split:
        if not isinstance(train, ArraySource):
            raise ValueError(
                "`validation_split` works with arrays, tensors and Datasets (it takes the last "
                "fraction of the samples). With a DataLoader or an iterable, pass "
                "`validation_data`."
            )
        train, val = train.split(validation_split)
        if validation_batch_size:
            val.batch_size = validation_batch_size
            val._set_parts()
    if class_weight is not None:
        train.apply_class_weight(class_weight, one_hot_targets)  # type: ignore[union-attr]
    return train, val


_VALIDATION_FORMS = (
    "Pass a tuple (x_val, y_val) or (x_val, y_val, sample_weight_val) of arrays, a Dataset, "
    "a DataLoader or an iterable of (x, y) batches."
)


def _validation_source(
    validation_data: Any, batch_size: int | None, steps: int | None, train: Any
) -> Any:
    """``(x_val, y_val)`` / ``(x_val, y_val, sample_weight)`` arrays, or a loader/iterable."""
    name = "validation_data"
    if isinstance(validation_data, tuple):
        arrays = [_is_array_like(v) or _is_structure(v) for v in validation_data]
        if all(arrays) and validation_data:
            if len(validation_data) not in (2, 3):
                raise ValueError(
                    f"`{name}` is a tuple of {len(validation_data)} arrays; it needs 2 or 3. "
                    f"{_VALIDATION_FORMS}"
                )
            vx, vy, *rest = validation_data
            try:
                source = make_source(
                    vx,
                    vy,
                    rest[0] if rest else None,
                    batch_size=batch_size,
                    shuffle=False,
                    steps=steps,
                    name=name,
                )
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{exc} {_VALIDATION_FORMS}") from exc
            _check_same_shapes(train, source)
            return source
        if isinstance(validation_data, tuple) and any(arrays):
            raise ValueError(f"`{name}` mixes arrays and other objects. {_VALIDATION_FORMS}")
    try:
        return make_source(validation_data, batch_size=None, shuffle=False, steps=steps, name=name)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{exc} {_VALIDATION_FORMS}") from exc


def _sample_shapes(structure: Structure) -> list[tuple[int, ...]]:
    return [tuple(t.shape[1:]) for t in leaves(structure)]


def _check_same_shapes(train: Any, val: ArraySource) -> None:
    """Validation arrays must have the training arrays' per-sample shapes."""
    if not isinstance(train, ArraySource):
        return
    for part, a, b in (("x", train.x, val.x), ("y", train.y, val.y)):
        if a is None or b is None:
            continue
        shapes_a, shapes_b = _sample_shapes(a), _sample_shapes(b)
        squeeze = [tuple(d for d in s if d != 1) for s in shapes_a]
        if shapes_a != shapes_b and squeeze != [tuple(d for d in s if d != 1) for s in shapes_b]:
            raise ValueError(
                f"`validation_data`'s {part} has samples of shape {shapes_b}, but the training "
                f"{part} has {shapes_a}. {_VALIDATION_FORMS}"
            )
