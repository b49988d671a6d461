"""What each file torcheras writes holds, and how it is captured and restored.

One family of files, one place that decides their content (``checkpoint.py`` turns them into
bytes and back):

- ``"weights"``: the state_dict alone (``save_weights``, ``ModelCheckpoint(save_weights_only=
  True)``; safetensors for ``.safetensors`` names).
- ``"model"``: everything training changes on the model — weights, every optimizer, the LR
  schedulers, the AMP scaler and the weight average kept on it — and the compile settings
  that are names (``model.save``, a full ``ModelCheckpoint`` file, with its epoch and logs).
- ``"training_state"``: a model's state plus everything an exact resume needs at a batch
  boundary of ``fit`` — the loop's position and counters, the epoch's sample order and running
  sums, the RNG states (of every rank under torchrun) and every callback's state by its
  ``state_key`` (BackupAndRestore's backups).

``Model.load`` reads the two kinds that hold a model (and format 1's ``"checkpoint"``).
"""

from __future__ import annotations

import errno
import os
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from torcheras import checkpoint, distributed
from torcheras.checkpoint import FORMAT, FORMAT_VERSION, CheckpointError
from torcheras.tensors import snapshot, to_cpu

__all__ = [
    "MODEL_KINDS",
    "capture_model_state",
    "model_file_state",
    "read_model_file",
    "save_model",
    "capture_training_state",
    "restore_model_state",
    "restore_training_state",
    "rng_state",
    "set_rng_state",
]


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


def _state_compatible(optimizer: torch.optim.Optimizer) -> set[str]:
    """The optimizer classes whose saved state this one loads: its own, and the torch class
    a Keras one keeps torch's state for (a file saved when ``"adam"`` was torch's Adam loads
    into KerasAdam, which reads the step count from it)."""
    cls = type(optimizer)
    return {cls.__name__, *getattr(cls, "loads_state_of", ())}


def _attributes_of_type(model: Any, kind: type) -> dict[str, Any]:
    """The model's attributes of a kind, by name: ``model.optimizer`` and any other optimizer
    (a GAN's two), or the LR schedulers a custom ``train_step`` keeps on the model."""
    return dict(sorted((k, v) for k, v in vars(model).items() if isinstance(v, kind)))


def capture_model_state(model: Any, copy: bool = False) -> dict[str, Any]:
    """Everything on the model that training changes: weights, every optimizer, the LR
    schedulers, the AMP scaler and the weight average kept on it, and the compile settings
    that are names. On the CPU; ``copy``: tensors that share nothing with the model (to be
    written while training goes on)."""
    cpu = snapshot if copy else to_cpu
    optimizers = _attributes_of_type(model, torch.optim.Optimizer)
    state: dict[str, Any] = {
        "model": cpu(model.state_dict()),
        "optimizers": {k: cpu(v.state_dict()) for k, v in optimizers.items()},
        "optimizer_classes": {k: type(v).__name__ for k, v in optimizers.items()},
        "schedulers": {
            k: v.state_dict()
            for k, v in _attributes_of_type(model, torch.optim.lr_scheduler.LRScheduler).items()
        },
    }
    scaler = getattr(model, "scaler", None)
    if scaler is not None and hasattr(scaler, "state_dict"):
        state["scaler"] = scaler.state_dict()
    ema = getattr(model, "ema", None)
    if ema is not None:
        state["ema"] = ema.state_dict()
    if getattr(model, "_compile_config", None):
        state["compile"] = dict(model._compile_config)
    return state


def restore_model_state(model: Any, state: Mapping[str, Any], source: str, fix: str) -> None:
    """Load what :func:`capture_model_state` captured; a mismatch names ``source`` and ``fix``."""

    def mismatch(what: str, exc: BaseException | str) -> CheckpointError:
        detail = " ".join(str(exc).split())  # torch's multi-line message on one line
        return CheckpointError(
            errno.EINVAL, f"{source} does not fit this model: {what} ({detail}). {fix}"
        )

    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as exc:
        raise mismatch("the weights differ (another architecture?)", exc) from exc
    classes = state.get("optimizer_classes", {})
    for kind, key in (
        (torch.optim.Optimizer, "optimizers"),
        (torch.optim.lr_scheduler.LRScheduler, "schedulers"),
    ):
        mine = _attributes_of_type(model, kind)
        for name, saved in state.get(key, {}).items():
            if name not in mine:
                raise mismatch(f"it holds {key[:-1]} {name!r}", "this model has none")
            saved_class = classes.get(name) if key == "optimizers" else None
            if saved_class is not None and saved_class not in _state_compatible(mine[name]):
                raise mismatch(
                    f"optimizer {name!r} is a {type(mine[name]).__name__} here",
                    f"saved from a {saved_class}",
                )
            try:
                mine[name].load_state_dict(saved)
            except (ValueError, KeyError, RuntimeError, TypeError) as exc:
                raise mismatch(f"{key[:-1]} {name!r} differs (another optimizer?)", exc) from exc
    scaler = getattr(model, "scaler", None)
    if "scaler" in state and scaler is not None:
        scaler.load_state_dict(state["scaler"])
    ema = getattr(model, "ema", None)
    if "ema" in state and ema is not None:
        try:
            ema.load_state_dict(state["ema"])
        except ValueError as exc:
            raise mismatch("the weight average differs", exc) from exc


def _header(kind: str) -> dict[str, Any]:
    return {"format": FORMAT, "version": FORMAT_VERSION, "kind": kind}


def _plain_logs(logs: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float, str))}


def model_file_state(
    model: Any,
    *,
    epoch: int | None = None,
    logs: Mapping[str, Any] | None = None,
    copy: bool = False,
) -> dict[str, Any]:
    """A saved model: what ``model.save`` and a full ``ModelCheckpoint`` file hold. The
    epoch (0-based) and its logs when a callback saves it during ``fit``; ``copy``: see
    :func:`capture_model_state`."""
    state = {**_header("model"), **capture_model_state(model, copy=copy)}
    if epoch is not None:
        state["epoch"] = epoch
    if logs is not None:
        state["logs"] = _plain_logs(logs)
    return state


def save_model(
    model: Any,
    path: str | os.PathLike[str],
    *,
    weights_only: bool,
    epoch: int | None = None,
    logs: Mapping[str, Any] | None = None,
    background: bool = False,
) -> Path | str:
    """Save ``model`` (a torcheras Model or any nn.Module) for ModelCheckpoint and friends:
    the weights alone (safetensors for ``.safetensors`` names), or a saved model that
    ``Model.load`` continues training from. ``background``: copy the state now, write it on
    the writer thread."""
    if weights_only:
        meta: dict[str, Any] = {} if epoch is None else {"epoch": epoch}
        if not checkpoint.is_safetensors(path):
            meta["logs"] = _plain_logs(logs)
        weights = own_weights(model)
        if background:
            copy = snapshot(weights)
            checkpoint.save_in_background(
                lambda: checkpoint.save_weights(copy, path, meta), str(path)
            )
            return checkpoint.location(path)
        return checkpoint.save_weights(weights, path, meta)
    state = model_file_state(model, epoch=epoch, logs=logs, copy=background)
    if background:  # copied once, now; written while training goes on
        checkpoint.save_in_background(lambda: checkpoint.save(state, path), str(path))
        return checkpoint.location(path)
    return checkpoint.save(state, path)


def own_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights as the network names them: a Model that wraps a module saves that
    module's own keys (``0.weight``, not ``module.0.weight``), so that PyTorch's
    ``net.load_state_dict(torch.load(path))`` reads the file; ``load_weights`` reads both."""
    weights = model.state_dict()
    prefix = "module."
    if "module" in model._modules and all(k.startswith(prefix) for k in weights):
        return {k[len(prefix) :]: v for k, v in weights.items()}
    return weights


MODEL_KINDS = ("model", "training_state", "checkpoint")


def read_model_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a file that holds a model to continue training (``Model.load``): a saved model,
    a full ModelCheckpoint file (format 1's ``"checkpoint"`` too) or a backup."""
    state = checkpoint.load(path)
    kind = state.get("kind")
    if kind not in MODEL_KINDS:
        raise ValueError(
            f"{str(path)!r} holds {kind or 'weights'} only, not a saved model: load it with "
            "load_weights(), or save with model.save() or ModelCheckpoint(save_weights_only="
            "False)."
        )
    if kind == "checkpoint" and "optimizer" in state:  # format 1: one optimizer, by this name
        state = {**state, "optimizers": {"optimizer": state["optimizer"]}}
    return state


def capture_training_state(
    model: Any,
    callbacks: Any,
    *,
    data_position: Mapping[str, Any] | None = None,
    epoch_position: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole training state at a batch boundary of ``fit``: resuming from it continues
    exactly where the run was (weights, optimizers, data order, RNG, every callback).
    ``data_position``: the data source's own (a loader's pass); ``epoch_position``: inside an
    epoch, its sample ``order``, running sums (``collector``), ``batch_lrs`` and the
    ``validated`` results of a validation run at this step."""
    loop = model.loop
    done = loop.epoch_done
    state: dict[str, Any] = {
        **_header("training_state"),
        "created": time.time(),
        "epoch": loop.epoch + 1 if done else loop.epoch,
        "batch": 0 if done else loop.batch + 1,
        **loop.counters(),
        "world_size": distributed.world_size(),
        **capture_model_state(model),
        "callbacks": to_cpu(callbacks.state_dict()),
        "logs": dict(loop.last_logs),
    }
    own: dict[str, Any] = {"rng": rng_state()}  # what differs from rank to rank
    if data_position:
        own["data"] = dict(data_position)
    if not done and epoch_position is not None:
        order = epoch_position["order"]
        state["order"] = None if order is None else order.cpu()
        own["collector"] = epoch_position["collector"]  # this rank's running sums
        state["batch_lrs"] = list(epoch_position["batch_lrs"])
        if epoch_position.get("pass"):  # what the position is counted in: checked on resume
            state["pass"] = dict(epoch_position["pass"])
        if epoch_position.get("validated"):  # fit(validation_interval=N) at this very step
            state["validated"] = dict(epoch_position["validated"])
    state.update(own)  # rank 0's (or the only process's) at the top level
    if distributed.is_active():  # every rank's, gathered into the file rank 0 writes
        state["ranks"] = distributed.gather_objects(own)
    return state


def restore_training_state(
    model: Any, callbacks: Any, state: Mapping[str, Any], path: str | os.PathLike[str] = "backup"
) -> dict[str, Any]:
    """Load weights, optimizers and callbacks' state; return the position to resume from."""
    if state.get("kind") != "training_state":
        raise CheckpointError(
            errno.EINVAL, f"This file is not a training-state backup (kind={state.get('kind')!r})."
        )
    folder = checkpoint.parent(checkpoint.location(path))
    saved_world = state.get("world_size", 1)
    if saved_world != distributed.world_size():
        raise CheckpointError(
            errno.EINVAL,
            f"The backup {str(path)!r} was written by a run of {saved_world} process(es); this "
            f"run has {distributed.world_size()}. Resume with the same number of processes "
            f"(torchrun --nproc_per_node={saved_world}), or move {folder!r} away to start over.",
        )
    restore_model_state(
        model,
        state,
        f"The backup {str(path)!r}",
        f"It was written by another run: move or delete the folder {folder!r} to start over.",
    )
    callbacks.load_state_dict(state["callbacks"])
    position = dict(state)
    if "ranks" in state:  # this rank's own RNG, running sums and data position
        position.update(state["ranks"][distributed.rank()])
    return position
