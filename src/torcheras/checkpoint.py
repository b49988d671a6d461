"""The one home of state files: atomic writes, safe loads, formats.

Every file torcheras writes goes through :func:`atomic_write`: a temp file in the same folder,
flushed and fsynced, then ``os.replace``d over the target and the folder fsynced. A process
killed at any point leaves either the old file or the new one, never a truncated one.
Every file is read with ``torch.load(weights_only=True)`` (or safetensors), so a checkpoint
cannot run code when it is loaded.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import random
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch

from torcheras.data import to_cpu

__all__ = [
    "CheckpointError",
    "capture_training_state",
    "restore_training_state",
    "FORMAT",
    "atomic_write",
    "save",
    "load",
    "save_weights",
    "load_weights_into",
    "state_dict_of",
]

FORMAT = "torcheras.checkpoint"
FORMAT_VERSION = 1
TEMP_PREFIX = ".torcheras-tmp-"


class CheckpointError(OSError):
    """A state file could not be written or read; the message names the path and the cause."""


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/filesystem lets us open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file so that readers only ever see the old or the complete new content.

    ``write`` receives a binary file object. The parent folder is created if missing.
    Stale temp files of earlier interrupted writes to the same target are removed once the
    new file is in place.
    """
    target = Path(path)
    if target.is_dir():
        raise CheckpointError(
            errno.EISDIR,
            f"Cannot save to {str(target)!r}: it is an existing directory. Pass a file path "
            "such as 'ckpt/best.pt'.",
        )
    folder = target.parent if str(target.parent) else Path(".")
    tmp_name = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{target.name}.", dir=folder)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
        tmp_name = None
        _fsync_dir(folder)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        hint = {
            errno.ENOSPC: " The disk is full: free space or save elsewhere.",
            errno.EACCES: " Check the folder's permissions or choose another path.",
            errno.EROFS: " The filesystem is read-only: choose another path.",
        }.get(exc.errno or 0, "")
        raise CheckpointError(
            exc.errno or errno.EIO,
            f"Could not save {str(target)!r}: {reason}.{hint} Files saved earlier are unchanged.",
        ) from exc
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
    for stale in folder.glob(f"{TEMP_PREFIX}{target.name}.*"):
        with contextlib.suppress(OSError):
            stale.unlink()
    return target


def is_safetensors(path: str | os.PathLike[str]) -> bool:
    return str(path).endswith(".safetensors")


def save(obj: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Save a dict of tensors and plain values atomically (``torch.save`` format)."""
    buffer = io.BytesIO()
    torch.save(dict(obj), buffer)
    data = buffer.getvalue()
    return atomic_write(path, lambda f: f.write(data))


def save_weights(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save weights: safetensors for ``.safetensors`` names, otherwise our torch format."""
    if is_safetensors(path):
        try:
            from safetensors.torch import save as st_save
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "Saving '.safetensors' files needs the safetensors package: "
                "pip install 'torcheras[safetensors]'."
            ) from exc
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
        meta = {k: str(v) for k, v in (metadata or {}).items()}
        data = st_save(tensors, metadata=meta or None)
        return atomic_write(path, lambda f: f.write(data))
    payload: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": "weights",
        "model": to_cpu(state_dict),
    }
    if metadata:
        payload.update(metadata)
    return save(payload, path)


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a state file safely. Raises :class:`CheckpointError` naming the path and the cause."""
    target = Path(path)
    if not target.exists():
        raise CheckpointError(errno.ENOENT, f"No checkpoint at {str(target)!r}.")
    if target.is_dir():
        raise CheckpointError(errno.EISDIR, f"{str(target)!r} is a directory, not a checkpoint.")
    if is_safetensors(target):
        from safetensors.torch import load_file

        try:
            return {"format": "safetensors", "model": load_file(str(target))}
        except Exception as exc:
            raise CheckpointError(
                errno.EIO, f"{str(target)!r} is not a readable safetensors file ({exc})."
            ) from exc
    try:
        obj = torch.load(target, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            errno.EPERM,
            f"Refusing to load {str(target)!r}: it contains Python objects other than tensors and "
            "plain values, which could run code when unpickled (torch.load(weights_only=True) "
            f"refused it: {str(exc).splitlines()[0]}). Only load files you trust, and save "
            "state with torcheras or torch.save(state_dict).",
        ) from exc
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(
            errno.EIO, f"{str(target)!r} is truncated or corrupt and cannot be loaded ({exc})."
        ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(errno.EINVAL, f"{str(target)!r} does not hold a dict of state.")
    return obj


def state_dict_of(checkpoint: Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
    """The model weights inside any file we read: ours, safetensors, or a bare state_dict."""
    if checkpoint.get("format") in (FORMAT, "safetensors") and "model" in checkpoint:
        return checkpoint["model"]
    return checkpoint  # a plain torch.save(model.state_dict())


def load_weights_into(
    module: torch.nn.Module, path: str | os.PathLike[str], strict: bool = True
) -> dict[str, Any]:
    """Load weights from ``path`` into ``module``; accepts keys with or without ``module.``."""
    checkpoint = load(path)
    weights = dict(state_dict_of(checkpoint))
    own = module.state_dict()
    if own and weights and not (own.keys() & weights.keys()):
        prefixed = {f"module.{k}": v for k, v in weights.items()}
        stripped = {k.removeprefix("module."): v for k, v in weights.items()}
        for candidate in (prefixed, stripped):
            if own.keys() & candidate.keys():
                weights = candidate
                break
    try:
        module.load_state_dict(weights, strict=strict)
    except RuntimeError as exc:
        raise ValueError(f"The weights in {str(path)!r} do not fit this model: {exc}") from exc
    return checkpoint


def save_model(
    model: Any,
    path: str | os.PathLike[str],
    *,
    weights_only: bool,
    epoch: int | None = None,
    logs: Mapping[str, Any] | None = None,
) -> Path:
    """Save a model (a torcheras Model or any nn.Module) for ModelCheckpoint and friends.

    Weights only: the state_dict (safetensors for ``.safetensors`` names). Otherwise a full
    checkpoint: weights, optimizer state, the epoch (0-based) and that epoch's logs.
    """
    weights = model.state_dict()
    meta: dict[str, Any] = {}
    if epoch is not None:
        meta["epoch"] = epoch
    plain_logs = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float, str))}
    if weights_only:
        return save_weights(
            weights, path, {**meta, "logs": plain_logs} if not is_safetensors(path) else meta
        )
    state: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": "checkpoint",
        "model": to_cpu(weights),
        **meta,
        "logs": plain_logs,
    }
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        state["optimizer"] = to_cpu(optimizer.state_dict())
    return save(state, path)


# ---- training state: everything an exact resume needs ------------------------------------------


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python RNG states, in weights_only-safe types."""
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (
            name,
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _attributes_of_type(model: Any, kind: type) -> dict[str, Any]:
    """The model's attributes of a kind, by name: ``model.optimizer`` and any other optimizer
    (a GAN's two), or the LR schedulers a custom ``train_step`` keeps on the model."""
    return dict(sorted((k, v) for k, v in vars(model).items() if isinstance(v, kind)))


def capture_training_state(model: Any, callbacks: Any) -> dict[str, Any]:
    """The whole training state at a batch boundary of ``fit``: resuming from it continues
    exactly where the run was (weights, optimizers, data order, RNG, every callback)."""
    loop = model.loop
    done = loop.epoch_done
    state: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": "training_state",
        "created": time.time(),
        "epoch": loop.epoch + 1 if done else loop.epoch,
        "batch": 0 if done else loop.batch + 1,
        "global_step": loop.global_step,
        "model": to_cpu(model.state_dict()),
        "optimizers": {
            k: to_cpu(v.state_dict())
            for k, v in _attributes_of_type(model, torch.optim.Optimizer).items()
        },
        "schedulers": {
            k: v.state_dict()
            for k, v in _attributes_of_type(model, torch.optim.lr_scheduler.LRScheduler).items()
        },
        "callbacks": to_cpu(callbacks.state_dict()),
        "rng": rng_state(),
        "logs": dict(loop.last_logs),
    }
    scaler = getattr(model, "scaler", None)
    if scaler is not None and hasattr(scaler, "state_dict"):
        state["scaler"] = scaler.state_dict()
    if not done:
        state["order"] = loop.order
        state["means"] = model.train_means.state_dict()
        state["metrics"] = [m.state_dict() for m in model.compiled_metrics]
        state["epoch_lr"] = loop.epoch_lr
        state["epoch_rng"] = loop.epoch_rng
    return state


def restore_training_state(model: Any, callbacks: Any, state: Mapping[str, Any]) -> dict[str, Any]:
    """Load weights, optimizers and callbacks' state; return the position to resume from."""
    if state.get("kind") != "training_state":
        raise CheckpointError(
            errno.EINVAL, f"This file is not a training-state backup (kind={state.get('kind')!r})."
        )
    model.load_state_dict(state["model"])
    for kind, key in (
        (torch.optim.Optimizer, "optimizers"),
        (torch.optim.lr_scheduler.LRScheduler, "schedulers"),
    ):
        mine = _attributes_of_type(model, kind)
        for name, saved in state.get(key, {}).items():
            if name not in mine:
                raise CheckpointError(
                    errno.EINVAL,
                    f"The backup holds {key[:-1]} {name!r}, which this model does not have.",
                )
            mine[name].load_state_dict(saved)
    scaler = getattr(model, "scaler", None)
    if "scaler" in state and scaler is not None:
        scaler.load_state_dict(state["scaler"])
    callbacks.load_state_dict(state["callbacks"])
    return dict(state)
