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
    "is_sharded",
    "load_sharded_tensors",
    "rng_mark",
    "sharded_tensors",
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


def rng_mark() -> list[torch.Tensor]:
    """A copy of torch's RNG states (CPU, and CUDA once used): compared with a later one, it
    tells whether training drew random numbers (dropout, random augmentation) in between."""
    mark = [torch.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        mark.extend(torch.cuda.get_rng_state_all())
    return mark


def _drew_since(mark: list[torch.Tensor] | None) -> bool:
    now = rng_mark()
    return mark is None or len(now) != len(mark) or any(map(_differs, now, mark))


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.equal(a, b)


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


def is_sharded(model: Any) -> bool:
    """Whether the model's parameters are sharded over the ranks (FSDP2's DTensors): its
    state is then gathered (a consolidated file) or saved per rank (DCP)."""
    import sys

    if "torch.distributed.tensor" not in sys.modules:  # no DTensor can exist yet
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _full_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _full_model_state(model: Any) -> dict[str, Any]:
    """The whole state_dict of a sharded model, gathered onto rank 0's CPU (every rank calls
    it; the others get an empty dict: only rank 0 writes)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def sharded_tensors(model: Any) -> dict[str, Any]:
    """The model's and every optimizer's state as ``torch.distributed.checkpoint`` saves
    them: each rank's own shards (FSDP2) or whole tensors (one process, DDP), keyed by the
    parameters' names, so that they load on any number of ranks. The tensors are the live
    ones: a template that :func:`load_sharded_tensors` fills in place."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    return {
        "model": get_model_state_dict(model),
        "optimizers": {
            k: get_optimizer_state_dict(model, v)
            for k, v in _attributes_of_type(model, torch.optim.Optimizer).items()
        },
    }


def load_sharded_tensors(model: Any, folder: Path) -> None:
    """Load a sharded folder's model and optimizer states into ``model`` (every rank)."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    template = sharded_tensors(model)
    checkpoint.load_sharded(folder, template, distributed.checkpoint_group())
    set_model_state_dict(model, template["model"])
    optimizers = _attributes_of_type(model, torch.optim.Optimizer)
    for name, saved in template["optimizers"].items():
        set_optimizer_state_dict(model, optimizers[name], saved)


def capture_model_state(model: Any, copy: bool = False, tensors: bool = True) -> dict[str, Any]:
    """Everything on the model that training changes: weights, every optimizer, the LR
    schedulers, the AMP scaler and the weight average kept on it, and the compile settings
    that are names. On the CPU; ``copy``: tensors that share nothing with the model (to be
    written while training goes on). A sharded model's weights and optimizers are gathered
    whole onto rank 0 (keyed by parameter name: ``"optimizer_keys": "names"``); ``tensors=
    False`` leaves weights and optimizers out (a sharded backup saves them with DCP)."""
    cpu = snapshot if copy else to_cpu
    optimizers = _attributes_of_type(model, torch.optim.Optimizer)
    state: dict[str, Any] = {
        "optimizer_classes": {k: type(v).__name__ for k, v in optimizers.items()}
    }
    if tensors and is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state["model"] = _full_model_state(model)
        state["optimizers"] = {
            k: get_optimizer_state_dict(model, v, options=_full_options())
            for k, v in optimizers.items()
        }
        state["optimizer_keys"] = "names"
    elif tensors:
        state["model"] = cpu(model.state_dict())
        state["optimizers"] = {k: cpu(v.state_dict()) for k, v in optimizers.items()}
    state["schedulers"] = {
        k: v.state_dict()
        for k, v in _attributes_of_type(model, torch.optim.lr_scheduler.LRScheduler).items()
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

    by_names = state.get("optimizer_keys") == "names"  # a sharded model's consolidated file
    if "sharded" in state and "model" not in state:  # a sharded folder
        _load_sharded_folder(model, state, source, fix)
    try:
        if "sharded" in state and "model" not in state:  # its tensors came from DCP, above
            pass
        elif by_names or is_sharded(model):
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
            )

            set_model_state_dict(
                model, state["model"], options=StateDictOptions(full_state_dict=True)
            )
        else:
            model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
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
                if key == "optimizers" and (by_names or is_sharded(model)):
                    _load_optimizer_by_names(model, mine[name], saved, full=by_names)
                else:
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


def _load_sharded_folder(model: Any, state: Mapping[str, Any], source: str, fix: str) -> None:
    """Read a sharded folder's tensors into ``model`` (every rank): DCP gives each rank its
    part of every tensor, whatever the number of ranks that wrote them."""
    mine = _attributes_of_type(model, torch.optim.Optimizer)
    for name, saved_class in state.get("optimizer_classes", {}).items():
        if name not in mine or saved_class not in _state_compatible(mine[name]):
            raise CheckpointError(
                errno.EINVAL,
                f"{source} does not fit this model: its optimizer {name!r} is a "
                f"{saved_class}, this model's {type(mine.get(name)).__name__}. {fix}",
            )
    try:
        load_sharded_tensors(model, Path(state["sharded"]))
    except CheckpointError as exc:
        raise CheckpointError(errno.EINVAL, f"{exc.strerror} {fix}") from exc


def _load_optimizer_by_names(
    model: Any, optimizer: torch.optim.Optimizer, saved: Any, full: bool
) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=full)
    set_optimizer_state_dict(model, optimizer, saved, options=options)


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
    sharded: bool = False,
) -> Path | str:
    """Save ``model`` (a torcheras Model or any nn.Module) for ModelCheckpoint and friends:
    the weights alone (safetensors for ``.safetensors`` names), or a saved model that
    ``Model.load`` continues training from. ``background``: copy the state now, write it on
    the writer thread. ``sharded`` (a saved model): a folder of DCP shards, each rank its
    own, written in the background; a sharded model's file is otherwise gathered whole."""
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
    if sharded:
        where = checkpoint.local_only(checkpoint.location(path), "A sharded checkpoint")
        meta = {**_header("model"), **capture_model_state(model, copy=True, tensors=False)}
        meta.update({} if epoch is None else {"epoch": epoch})
        meta.update({} if logs is None else {"logs": _plain_logs(logs)})
        parent = where.parent if str(where.parent) else Path(".")
        return checkpoint.save_sharded(
            sharded_tensors(model),
            meta,
            parent,
            where.name,
            keep=None,
            group=distributed.checkpoint_group(),
        )
    state = model_file_state(model, epoch=epoch, logs=logs, copy=background)
    if background:  # copied once, now; written while training goes on
        checkpoint.save_in_background(lambda: checkpoint.save(state, path), str(path))
        return checkpoint.location(path)
    return checkpoint.save(state, path)


def own_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights as the network names them: a Model that wraps a module saves that
    module's own keys (``0.weight``, not ``module.0.weight``), so that PyTorch's
    ``net.load_state_dict(torch.load(path))`` reads the file; ``load_weights`` reads both."""
    weights = _full_model_state(model) if is_sharded(model) else model.state_dict()
    prefix = "module."
    if "module" in model._modules and all(k.startswith(prefix) for k in weights):
        return {k[len(prefix) :]: v for k, v in weights.items()}
    return weights


MODEL_KINDS = ("model", "training_state", "checkpoint")


def read_model_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a file that holds a model to continue training (``Model.load``): a saved model,
    a full ModelCheckpoint file (format 1's ``"checkpoint"`` too) or a backup."""
    folder = checkpoint.location(path)
    if isinstance(folder, Path) and (folder / checkpoint.SHARDED_META).is_file():
        state = checkpoint.load(folder / checkpoint.SHARDED_META)  # a sharded folder
        state["sharded"] = str(folder)
    else:
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
    rng_since: list[torch.Tensor] | None = None,
    sharded: bool = False,
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
        **capture_model_state(model, tensors=not sharded),
        "callbacks": to_cpu(callbacks.state_dict()),
        "logs": dict(loop.last_logs),
    }
    own: dict[str, Any] = {"rng": rng_state(), "rng_drawn": _drew_since(rng_since)}  # per rank
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
    saved_world, world = state.get("world_size", 1), distributed.world_size()
    if saved_world != world:
        state = reshard_position(state, world, str(path), folder)
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


def reshard_position(
    state: Mapping[str, Any], world: int, path: str, folder: Path | str
) -> dict[str, Any]:
    """A backup taken on ``state["world_size"]`` processes, made to resume on ``world``.

    Exact when the position is global, which it is for torcheras's data: the epoch's sample
    order is drawn once and shared, and the global batch (``batch_size``) is cut into one part
    per process, so batch N holds the same samples on any number of processes. What is per
    process moves as follows: the running sums of an epoch in progress are added up into
    process 0's (the others start from zero: the epoch's end adds them all); each process
    takes its own RNG state where it had one, else process 0's, which draws the orders every
    process uses. Refused when training drew random numbers (dropout, random augmentation):
    each process drew from its own stream, and other processes cannot draw the same."""
    saved = state.get("world_size", 1)
    redo = (
        f"Resume with {saved} process(es) (torchrun --nproc_per_node={saved}), or move "
        f"{str(folder)!r} away to start over."
    )
    own_keys = ("rng", "rng_drawn", "data", "collector")  # one process's own, at the top
    ranks = list(state.get("ranks") or [{k: state[k] for k in own_keys if k in state}])
    drawn = [r for r, own in enumerate(ranks) if own.get("rng_drawn", True)]
    if drawn:
        raise CheckpointError(
            errno.EINVAL,
            f"The backup {path!r} was written by a run of {saved} process(es); this run has "
            f"{world}. It cannot resume exactly on {world}: training drew random numbers "
            f"(process {', '.join(map(str, drawn))}: dropout, random augmentation or a "
            "backup of an older torcheras), and each process draws from its own random "
            f"stream, which {world} process(es) cannot reproduce. {redo}",
        )
    if (ranks[0].get("data") or {}).get("per_process_batches"):
        raise CheckpointError(
            errno.EINVAL,
            f"The backup {path!r} was written by a run of {saved} process(es); this run has "
            f"{world}. Its training DataLoader has its own DistributedSampler, whose "
            f"batch_size is per process: on {world} process(es) the global batch and the "
            f"samples of each batch would change. {redo}",
        )
    moved = []
    for rank in range(world):
        own = dict(ranks[rank] if rank < len(ranks) else ranks[0])
        if "collector" in own:  # an epoch in progress: its running sums, all into process 0's
            sums = _add_up([r["collector"] for r in ranks], path, redo)
            own["collector"] = sums if rank == 0 else _zeros(sums)
        moved.append(own)
    out = {**state, **moved[0], "world_size": world, "resharded_from": saved}
    if world > 1:
        out["ranks"] = moved
    else:
        out.pop("ranks", None)
    return out


def _add_up(states: list[Any], path: str, redo: str) -> Any:
    """The sum of several ranks' running sums (tensors and numbers, leaf by leaf)."""
    first = states[0]
    if isinstance(first, torch.Tensor):
        return torch.stack([s.to(first.dtype) for s in states]).sum(0).to(first.dtype)
    if isinstance(first, bool) or first is None or isinstance(first, str):
        if any(s != first for s in states):
            raise CheckpointError(
                errno.EINVAL,
                f"The running metrics in {path!r} differ from process to process in a way "
                f"that cannot be added up ({states!r}). {redo}",
            )
        return first
    if isinstance(first, (int, float)):
        return type(first)(sum(states))
    if isinstance(first, Mapping):
        return {k: _add_up([s[k] for s in states], path, redo) for k in first}
    if isinstance(first, list) and all(isinstance(t, torch.Tensor) for s in states for t in s):
        return [t for s in states for t in s]  # gathered values (torchmetrics' "cat" states)
    if isinstance(first, (list, tuple)) and len({len(s) for s in states}) == 1:
        return type(first)(_add_up(list(parts), path, redo) for parts in zip(*states))
    raise CheckpointError(
        errno.EINVAL,
        f"The running metrics in {path!r} hold a {type(first).__name__}, which cannot be "
        f"added up over processes. {redo}",
    )


def _zeros(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    if isinstance(state, bool) or state is None or isinstance(state, str):
        return state
    if isinstance(state, (int, float)):
        return type(state)(0)
    if isinstance(state, Mapping):
        return {k: _zeros(v) for k, v in state.items()}
    if isinstance(state, list) and all(isinstance(t, torch.Tensor) for t in state):
        return []
    return type(state)(_zeros(v) for v in state)
