"""Export a trained network for serving: a ``torch.export`` program or an ONNX file.

``Model.export`` is the entry point; this module holds the machinery. The network is exported
alone (the wrapped module, or the subclass's ``forward``), in eval mode, on the CPU, with a
dynamic batch dimension; neither the optimizer nor the loss or metrics go into the file.
"""

from __future__ import annotations

import copy
import os
import re
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

__all__ = ["ExportError", "export_module"]

FORMATS = ("torch", "onnx")
_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.abspath(__file__))  # torcheras's own frames are not yours


class ExportError(RuntimeError):
    """``Model.export`` could not trace the network: the message names the construct, where it
    is in your code and how to fix it; torch's own error is chained (``__cause__``)."""


def export_module(
    module: nn.Module,
    filepath: str | os.PathLike[str],
    example: Any,
    *,
    format: str = "torch",
    dynamic_batch: bool = True,
) -> Path:
    """Export ``module`` called on ``example`` (a tensor, a tuple of positional inputs or a dict
    of keyword inputs) to ``filepath`` (a local path, or a URL written through fsspec);
    returns the path written (the URL as a string)."""
    if format not in FORMATS:
        raise ValueError(f"`format` must be 'torch' or 'onnx'; got {format!r}.")
    from torcheras import checkpoint

    target = checkpoint.location(filepath)
    if isinstance(target, str):  # a URL: exported to a local file, then sent whole (fsspec)
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            local = Path(folder) / target.rsplit("/", 1)[-1]
            export_module(module, local, example, format=format, dynamic_batch=dynamic_batch)
            data = local.read_bytes()
        checkpoint.atomic_write(target, lambda f: f.write(data), every_rank=True)
        return target  # type: ignore[return-value]
    path = target
    other = {"torch": ".onnx", "onnx": ".pt2"}[format]
    if path.suffix.lower() == other:
        raise ValueError(
            f"{str(path)!r} ends in {other} but format={format!r}: pass "
            f"format={'onnx' if format == 'torch' else 'torch'!r}, or change the file name."
        )
    args, kwargs = _as_call(example)
    module = _on_cpu(module)
    dynamic = _batch_shapes(args, kwargs) if dynamic_batch else None
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            try:
                program = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic)
            except Exception as exc:
                raise ExportError(_explain(exc, "torch.export", dynamic_batch)) from exc
            path.parent.mkdir(parents=True, exist_ok=True)
            if format == "torch":
                torch.export.save(program, path)
            else:
                _to_onnx(program, args, kwargs, dynamic, path, dynamic_batch)
    finally:
        module.train(was_training)
    return path


def _to_onnx(
    program: Any, args: tuple, kwargs: dict, dynamic: Any, path: Path, dynamic_batch: bool
) -> None:
    try:
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise ImportError(
            "format='onnx' needs onnx and onnxscript: pip install 'torcheras[onnx]'."
        ) from None
    try:
        torch.onnx.export(
            program,
            args,
            str(path),
            kwargs=kwargs or None,
            dynamic_shapes=dynamic,
            external_data=False,
            verbose=False,
        )
    except Exception as exc:
        raise ExportError(_explain(exc, "torch.onnx.export", dynamic_batch, program)) from exc


def _as_call(example: Any) -> tuple[tuple, dict]:
    """``example`` as ``forward``'s arguments, as ``fit`` calls the model; numpy arrays become
    tensors, and a batch of one sample is doubled (a batch of 1 would fix the batch size)."""
    example = pytree.tree_map(
        lambda v: torch.from_numpy(v) if isinstance(v, np.ndarray) else v, example
    )
    if isinstance(example, dict):
        args, kwargs = (), dict(example)
    elif isinstance(example, (tuple, list)):
        args, kwargs = tuple(example), {}
    else:
        args, kwargs = (example,), {}
    if not any(isinstance(t, Tensor) for t in pytree.tree_leaves((args, kwargs))):
        raise ValueError(
            "`input_example` must hold at least one tensor (or numpy array): a batch as fit "
            f"takes it; got {type(example).__name__}."
        )

    def at_least_two(t: Any) -> Any:
        if isinstance(t, Tensor):
            t = t.detach().cpu()
            if t.dim() > 0 and t.shape[0] == 1:
                t = torch.cat([t, t])
        return t

    return pytree.tree_map(at_least_two, (args, kwargs))


def _on_cpu(module: nn.Module) -> nn.Module:
    """``module`` itself when it lives on the CPU; a CPU copy otherwise (the model stays put)."""
    tensors = [*module.parameters(), *module.buffers()]
    if all(t.device.type == "cpu" for t in tensors):
        return module
    return copy.deepcopy(module).cpu()


def _batch_shapes(args: tuple, kwargs: dict) -> Any:
    """``dynamic_shapes`` with dimension 0 of every tensor input as one shared batch dimension."""
    batch = torch.export.Dim("batch")

    def spec(v: Any) -> Any:
        return {0: batch} if isinstance(v, Tensor) and v.dim() > 0 else None

    return pytree.tree_map(spec, kwargs) if kwargs else pytree.tree_map(spec, args)


# ---- errors ----------------------------------------------------------------------------------
_DATA_DEPENDENT = (
    "data-dependent Python control flow: an `if`, `while`, `bool()`, `.item()` or `.tolist()` "
    "on a tensor's value"
)
_FIX_DATA_DEPENDENT = (
    "compute both branches and pick with torch.where(condition, a, b), use torch.cond for real "
    "branches, or move the decision out of forward()"
)


def _explain(exc: BaseException, exporter: str, dynamic_batch: bool, program: Any = None) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # no terminal colours in the message
    summary = text.split("## Exception summary", 1)[-1]  # the ONNX exporter's own summary
    lines = [line.strip() for line in summary.splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    where = _user_frame(exc)
    at = f" at {where}" if where else ""
    name = type(exc).__name__
    if name == "GuardOnDataDependentSymNode" or "data-dependent" in text:
        return (
            f"{exporter} cannot trace {_DATA_DEPENDENT}{at}. Fix: {_FIX_DATA_DEPENDENT}. "
            f"(torch: {first})"
        )
    if dynamic_batch and ("Constraints violated" in text or "specialized" in text):
        return (
            f"{exporter} found that the network fixes the batch size{at} (a reshape or view "
            "with the batch size written in, or a batch-size-specific branch). Fix: use "
            "x.reshape(x.shape[0], ...) / -1 in forward(), or export with dynamic_batch=False "
            f"for a fixed batch size. (torch: {first})"
        )
    ops = sorted(set(re.findall(r"No ONNX function found for <OpOverload\(op='([\w.]+)'", text)))
    if ops:
        where = where or _node_source(program, ops)
        at = f" at {where}" if where else ""
        return (
            f"{exporter} has no ONNX translation for the operator {', '.join(ops)}{at}. Fix: "
            "compute it with other operations in forward(), register a translation with "
            "torch.onnx.export(custom_translation_table=...), or export with format='torch'."
        )
    hint = (
        "torch.export.draft_export lists every problem at once"
        if exporter == "torch.export"
        else "format='torch' may take the network as it is"
    )
    return (
        f"{exporter} could not export the network ({name}){at}: {first} "
        f"See the chained error above for torch's full report; {hint}."
    )


def _user_frame(exc: BaseException) -> str | None:
    """The innermost line of the user's code in ``exc``'s traceback (or the one torch quotes)."""
    quoted = re.search(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.+)', str(exc))
    if quoted and not quoted.group(1).startswith(_TORCH_DIR):
        file, line, func, code = quoted.groups()
        return f"{file}:{line} in {func}: `{code.strip()}`"
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        file = os.path.abspath(frame.filename)
        if file.startswith((_TORCH_DIR, _OWN_DIR)) or "site-packages" in file:
            continue
        return f"{frame.filename}:{frame.lineno} in {frame.name}: `{(frame.line or '').strip()}`"
    return None


def _node_source(program: Any, ops: list[str]) -> str | None:
    """Where in the user's code the traced program called one of ``ops`` (from the graph's
    recorded stack traces)."""
    if program is None:
        return None
    for node in program.graph.nodes:
        target = str(getattr(node, "target", ""))
        if any(target == op or target.startswith(op + ".") for op in ops):
            calls = re.findall(
                r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.+)', node.meta.get("stack_trace") or ""
            )
            for file, line, func, code in reversed(calls):
                if not file.startswith(_TORCH_DIR):
                    return f"{file}:{line} in {func}: `{code.strip()}`"
    return None
