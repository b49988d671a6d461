"""torchrun: rank, world size, reductions, agreement, rank-zero I/O; the strategies.

Everything here is a no-op in a single process. Under ``torchrun`` (``WORLD_SIZE`` > 1),
``fit`` joins the process group (gloo on the CPU, NCCL on CUDA) unless the script already
did, and the loops use these helpers so that every rank sees the same logs and takes the
same decisions.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "FSDP",
    "STRATEGIES",
    "agree",
    "agree_max",
    "Vote",
    "all_reduce_sum",
    "average_",
    "barrier",
    "broadcast",
    "decide_on_main",
    "checkpoint_group",
    "is_active",
    "is_main",
    "norms",
    "original_class",
    "resolve_strategy",
    "launched_by_torchrun",
    "rank",
    "gather_objects",
    "setup",
    "shared_seed",
    "world_size",
]

# A rank that died leaves the others waiting in a collective: they fail after this long.
TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("TORCHERAS_DIST_TIMEOUT", "60")))


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by ``torchrun``."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def is_active() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    """Rank 0, the only rank that writes files (or the single process)."""
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group if the script has not; the device this rank trains on
    (``cuda:LOCAL_RANK`` on CUDA)."""
    if not launched_by_torchrun():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT)
        atexit.register(_destroy_process_group)  # the group is ours: we end it too
    global _HOST_GROUP
    if _HOST_GROUP is None and dist.get_backend() == "nccl":
        _HOST_GROUP = dist.new_group(backend="gloo", timeout=TIMEOUT)
    return device


_HOST_GROUP: Any = None


def _destroy_process_group() -> None:
    """At exit, end the process group :func:`setup` started, while the interpreter is whole:
    left to finalization, gloo's worker threads can release tensors after Python is gone and
    abort the process (SIGABRT, a failed exit code for a run that succeeded), and NCCL warns
    that the group was never destroyed."""
    global _HOST_GROUP
    if dist.is_initialized():
        # A run that ends normally first waits for every rank: a rank that tears its group
        # down while another still talks to it can abort either at exit (SIGABRT, about 1
        # launch in 200 without the wait). A rank leaving on an uncaught error does not wait
        # (the others may be inside a collective; torchrun stops them).
        # Then a plain barrier (the default group on gloo, the host group on NCCL), which
        # waits for the work still queued on that group's worker threads (an async
        # collective nobody waited for), and a moment with the GIL released, in which a
        # worker frees the tensors of the work it finished last: either, left to
        # finalization, aborts the same way.
        if not hasattr(sys, "last_value"):
            with contextlib.suppress(Exception):
                if dist.get_backend() == "gloo":
                    dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
                    dist.barrier()
                else:
                    dist.barrier(group=_HOST_GROUP)
                time.sleep(0.05)
        _HOST_GROUP = None
        dist.destroy_process_group()
    _HOST_GROUP = None
    _CHECKPOINT_GROUP.clear()


def _host_group() -> Any:
    """The group for small host-side agreements: the default group on gloo; on NCCL a gloo
    group created at :func:`setup` (every rank creates it at the same point)."""
    return _HOST_GROUP if dist.get_backend() == "nccl" else None


_CHECKPOINT_GROUP: list[Any] = []  # the group made for DCP's sharded checkpoints, once


def checkpoint_group() -> Any:
    """A gloo group of every rank for ``torch.distributed.checkpoint``, made at the first call
    (every rank must call it at the same point: a backup's first save or load). A save in the
    background talks to the other ranks over this group while training's own collectives
    (DDP's gradient reductions, the logs) use the default one; None in a single process."""
    if not is_active():
        return None
    if not _CHECKPOINT_GROUP:
        _CHECKPOINT_GROUP.append(dist.new_group(backend="gloo", timeout=TIMEOUT))
    return _CHECKPOINT_GROUP[0]


def _device_of_group() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[torch.Tensor | float]) -> list[torch.Tensor | float]:
    """Sum each value over the ranks, in one collective: floats, and tensors of any shape
    (a metric's counts per threshold) alike."""
    if not is_active() or not values:
        return values
    device = _device_of_group()
    flat = torch.cat(
        [torch.as_tensor(v, dtype=torch.float64).to(device).reshape(-1) for v in values]
    )
    dist.all_reduce(flat)
    out: list[torch.Tensor | float] = []
    start = 0
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(flat[start : start + v.numel()].reshape(v.shape).to(v.device, v.dtype))
            start += v.numel()
        else:
            out.append(float(flat[start]))
            start += 1
    return out


def average_(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor (gradients) by its mean over the ranks, in place; one collective
    per dtype."""
    if not is_active():
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        flat = _flatten_dense_tensors(group)
        dist.all_reduce(flat)
        flat /= world_size()
        for tensor, mean in zip(group, _unflatten_dense_tensors(flat, group)):
            tensor.copy_(mean)


def agree(flag: bool) -> bool:
    """True on every rank if it is True on any rank (a stop, a NaN)."""
    return bool(agree_max(int(flag)))


def agree_max(value: int) -> int:
    """The largest of every rank's ``value`` (a signal number, 0 for none). Over the host
    group: no GPU synchronisation."""
    if not is_active():
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_host_group())
    return int(tensor.item())


def decide_on_main(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (a save rank 0's clock asks for). Over the host group:
    no GPU synchronisation."""
    if not is_active():
        return flag
    tensor = torch.tensor([int(flag)], dtype=torch.int64)
    dist.broadcast(tensor, src=0, group=_host_group())
    return bool(tensor.item())


class Vote:
    """:func:`agree_max` once per step, answered one step late so that no rank waits for it:
    ``submit(value)`` starts this step's vote and returns the previous one's result (0 for
    the first). Every rank must call it at the same steps, and :meth:`finish` at the end."""

    def __init__(self) -> None:
        self._tensor: torch.Tensor | None = None
        self._work: Any = None

    def submit(self, value: int) -> int:
        previous = self.finish()
        self._tensor = torch.tensor([value], dtype=torch.int64)
        self._work = dist.all_reduce(
            self._tensor, op=dist.ReduceOp.MAX, group=_host_group(), async_op=True
        )
        return previous

    def finish(self) -> int:
        """The result of the vote still open (0 if none)."""
        if self._work is None or self._tensor is None:
            return 0
        self._work.wait()
        self._work = None
        return int(self._tensor.item())


def broadcast(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """Rank 0's tensor on every rank (a sample order drawn once)."""
    if not is_active() or tensor is None:
        return tensor
    device = _device_of_group()
    moved = tensor.to(device)
    dist.broadcast(moved, src=0)
    return moved.to(tensor.device)


def shared_seed() -> int:
    """A seed every rank agrees on (rank 0's ``torch.initial_seed()``), drawing nothing from
    the RNG: a ``DistributedSampler``'s shuffle seed."""
    seed = torch.tensor(torch.initial_seed() % 2**62, dtype=torch.int64)
    agreed = broadcast(seed)
    assert agreed is not None
    return int(agreed.item())


def barrier() -> None:
    """Wait for every rank (before anything reads a file rank 0 wrote)."""
    if is_active():
        dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (picklable objects: CPU tensors, lists)."""
    if not is_active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# ---- strategies --------------------------------------------------------------------------------
STRATEGIES = ("auto", "ddp", "fsdp")

# The layers sharded on their own by default when the network holds any: torch's transformer
# layers (each is a natural unit of all-gather and free).
_TRANSFORMER_LAYERS = (torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer)


class FSDP:
    """``compile(strategy=FSDP(...))``: shard the parameters, gradients and optimizer state
    over the ranks with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``).
    ``strategy="fsdp"`` is ``FSDP()``.

    Each block is sharded on its own (its parameters are gathered just before it runs and
    freed after), then the root, which holds what is left. In a single process (no
    ``torchrun``) nothing is sharded and the model trains as it does without a strategy.

    Args:
        blocks: which modules are blocks: a tuple of module classes (``(MyBlock,)``), or a
            callable ``policy(module) -> bool``. Default: torch's transformer layers if the
            network holds any; otherwise each direct child of the network that holds
            parameters (the children of a ``ModuleList`` / ``ModuleDict`` rather than the
            list itself). A block must be called as a module (its ``forward`` runs): the
            layers inside ``nn.MultiheadAttention``, whose weights it uses directly, are
            never taken as blocks.
        reshard_after_forward: free each block's gathered parameters after its forward pass
            (``True``: least memory, gathered again for the backward) or keep them until the
            backward (``False``: less communication). An ``int`` reshards to that many ranks,
            as FSDP2 does.

    Example:
        ```python
        from torcheras.distributed import FSDP

        model.compile("adamw", "cross_entropy", strategy="fsdp")
        model.compile("adamw", "cross_entropy",
                      strategy=FSDP(blocks=(Block,), reshard_after_forward=False))
        ```
    """

    name = "fsdp"

    def __init__(
        self,
        blocks: tuple[type[torch.nn.Module], ...] | Callable[[torch.nn.Module], bool] | None = None,
        *,
        reshard_after_forward: bool | int = True,
    ) -> None:
        if isinstance(blocks, type):
            blocks = (blocks,)
        if blocks is not None and not callable(blocks):
            if not isinstance(blocks, (tuple, list)) or not all(
                isinstance(b, type) and issubclass(b, torch.nn.Module) for b in blocks
            ):
                raise TypeError(
                    "FSDP(blocks=...) takes a tuple of nn.Module classes, e.g. "
                    f"blocks=(MyBlock,), or a callable policy(module) -> bool; got {blocks!r}."
                )
            blocks = tuple(blocks)
        if isinstance(reshard_after_forward, bool):
            pass
        elif not isinstance(reshard_after_forward, int) or reshard_after_forward < 1:
            raise ValueError(
                "FSDP(reshard_after_forward=...) takes True, False or a positive number of "
                f"ranks; got {reshard_after_forward!r}."
            )
        self.blocks = blocks
        self.reshard_after_forward = reshard_after_forward

    def __repr__(self) -> str:
        return f"FSDP(blocks={self.blocks!r}, reshard_after_forward={self.reshard_after_forward!r})"

    def select(self, root: torch.nn.Module) -> list[torch.nn.Module]:
        """The blocks of ``root`` (never ``root`` itself), parents before their children."""
        blocks = self.blocks
        if blocks is None:
            found = [m for m in root.modules() if isinstance(m, _TRANSFORMER_LAYERS)]
            return found or _children_with_parameters(root)
        chosen: Callable[[torch.nn.Module], bool] = (
            blocks if not isinstance(blocks, tuple) else (lambda m: isinstance(m, blocks))
        )
        # A block's forward must run for FSDP to gather it: MultiheadAttention uses its
        # out_proj's weights without calling it, so nothing inside it can be a block.
        inside = {
            id(sub)
            for m in root.modules()
            if isinstance(m, torch.nn.MultiheadAttention)
            for sub in m.modules()
            if sub is not m
        }
        return [m for m in root.modules() if m is not root and id(m) not in inside and chosen(m)]

    def shard(self, root: torch.nn.Module, param_dtype: torch.dtype | None) -> torch.nn.Module:
        """``fully_shard`` each block, children first, then ``root``; in place (the modules
        become FSDP modules, their parameters DTensors). ``param_dtype``: the mixed
        precision's dtype (``MixedPrecisionPolicy``, gradients reduced in float32)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = (
            MixedPrecisionPolicy()
            if param_dtype is None
            else MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        )
        for block in reversed(self.select(root)):  # the innermost first
            if any(p.numel() for p in block.parameters()):
                fully_shard(
                    block, reshard_after_forward=self.reshard_after_forward, mp_policy=policy
                )
        # The root's own parameters are gathered at the start of the forward pass and kept
        # for the backward (FSDP2's default for the root).
        fully_shard(root, reshard_after_forward=self.reshard_after_forward, mp_policy=policy)
        return root


def _children_with_parameters(root: torch.nn.Module) -> list[torch.nn.Module]:
    found: list[torch.nn.Module] = []
    for child in root.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            found += _children_with_parameters(child)
        elif any(True for _ in child.parameters()):
            found.append(child)
    return found


def resolve_strategy(strategy: str | FSDP) -> str | FSDP:
    """``"auto"`` / ``"ddp"`` as given, ``"fsdp"`` as :class:`FSDP` ``()``; anything else is
    refused naming the choices."""
    if isinstance(strategy, FSDP):
        return strategy
    if strategy == "fsdp":
        return FSDP()
    if strategy in ("auto", "ddp"):
        return strategy
    raise ValueError(
        f"`strategy` must be one of {', '.join(repr(s) for s in STRATEGIES)}, or "
        f"torcheras.distributed.FSDP(...); got {strategy!r}."
    )


def original_class(module: torch.nn.Module) -> type:
    """The class the user wrote: ``fully_shard`` swaps a module's class for a subclass named
    ``FSDP<Name>``."""
    cls = type(module)
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None and issubclass(cls, fsdp.FSDPModule):
        for base in cls.__mro__[1:]:
            if base is not fsdp.FSDPModule and not issubclass(base, fsdp.FSDPModule):
                return base
    return cls


def _is_sharded(tensor: torch.Tensor) -> bool:
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


def norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's L2 norm, in float32: over the whole tensor when it is sharded over the
    ranks (FSDP's DTensors: one all-reduce of the squared local norms for all of them, so
    every rank must call it at the same point), plain tensors as they are."""
    if not any(_is_sharded(t) for t in tensors):
        return [n.float() for n in torch._foreach_norm(tensors)]
    local = [t.to_local() if _is_sharded(t) else t for t in tensors]  # type: ignore[attr-defined]
    squares = torch.stack([n.float() for n in torch._foreach_norm(local)]).square()
    shards = torch.tensor([_is_sharded(t) for t in tensors], device=squares.device)
    summed = squares.where(shards, torch.zeros_like(squares))
    if is_active():
        dist.all_reduce(summed)
    return list(squares.where(~shards, summed).sqrt().unbind())


def whole(tensor: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """The whole tensor: a DTensor gathered from every rank (every rank must call it at the
    same point), or ``tensor`` itself. ``like``: a DTensor parameter whose local shard
    ``tensor`` is (as the weight average keeps them): gathered as that parameter is sharded."""
    if like is not None and _is_sharded(like) and not _is_sharded(tensor):
        from torch.distributed.tensor import DTensor

        tensor = DTensor.from_local(
            tensor, like.device_mesh, like.placements, shape=like.shape, stride=like.stride()
        )  # type: ignore[attr-defined]
    return tensor.full_tensor() if _is_sharded(tensor) else tensor  # type: ignore[attr-defined]


def local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a whole tensor, cut as the DTensor ``like`` is sharded (no
    communication: every rank holds ``full``); ``full`` itself when ``like`` is not sharded."""
    if not _is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    placed = distribute_tensor(
        full.to(like.device),
        like.device_mesh,  # type: ignore[attr-defined]
        like.placements,  # type: ignore[attr-defined]
        src_data_rank=None,
    )
    return placed.to_local()


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (a shard of a tensor spread over the ranks)."""
    return _is_sharded(tensor)
