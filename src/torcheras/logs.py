"""Running means kept on the device, and a lazy view of them for batch logs.

The training loop adds each step's returned values here without reading them back to the
host. Values are turned into Python floats only when somebody reads them: once per epoch
for the epoch logs, and for batch logs only when a callback actually looks at a key. That is
how ``fit`` avoids a device synchronisation per batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import torch

from torcheras.data import to_cpu

__all__ = ["BatchLogs", "RunningMeans", "to_float_logs"]


class RunningMeans:
    """Weighted running means of named values, accumulated on the values' own device.

    >>> means = RunningMeans()
    >>> means.add({"loss": torch.tensor(2.0)}, weight=4)
    >>> means.add({"loss": torch.tensor(1.0)}, weight=4)
    >>> means.result()
    {'loss': 1.5}
    """

    def __init__(self) -> None:
        self._totals: dict[str, torch.Tensor | float] = {}
        self._weights: dict[str, float] = {}

    def add(self, values: Mapping[str, Any], weight: float = 1.0) -> None:
        """Add one step's values (tensors or numbers), each counted ``weight`` times."""
        totals, weights = self._totals, self._weights
        for key, value in values.items():
            total = totals.get(key)
            if type(value) is torch.Tensor:
                value = value.detach()
                if value.ndim:
                    value = value.float().mean()
                if type(total) is torch.Tensor:
                    total.add_(value, alpha=weight)
                else:
                    totals[key] = value.float() * weight + (total or 0.0)
            else:
                totals[key] = (total if total is not None else 0.0) + float(value) * weight
            weights[key] = weights.get(key, 0.0) + weight

    def keys(self) -> list[str]:
        return list(self._totals)

    def result(self) -> dict[str, float]:
        """The means as Python floats; one device-to-host copy for all tensor values."""
        return dict(zip(self._totals, _as_floats(self.result_tensors())))

    def result_tensor(self, key: str) -> torch.Tensor | float:
        return self._totals[key] / self._weights[key]

    def result_tensors(self) -> list[torch.Tensor | float]:
        return [total / self._weights[key] for key, total in self._totals.items()]

    def reset(self) -> None:
        self._totals.clear()
        self._weights.clear()

    def state_dict(self) -> dict[str, Any]:
        """Exact state (CPU tensors): a resumed epoch logs what an unbroken one would."""
        return {"totals": to_cpu(self._totals, clone=True), "weights": dict(self._weights)}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device | None = None) -> None:
        self._totals = {
            k: (v.to(device) if isinstance(v, torch.Tensor) and device is not None else v)
            for k, v in state["totals"].items()
        }
        self._weights = dict(state["weights"])


def _as_floats(values: list[torch.Tensor | float]) -> list[float]:
    """Convert a list of scalars to floats with as few device reads as possible."""
    out: list[float | None] = [None] * len(values)
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(i)
        else:
            out[i] = float(v)
    for indices in by_device.values():
        stacked = torch.stack([values[i].detach().reshape(()).float() for i in indices])  # type: ignore[union-attr]
        for i, f in zip(indices, stacked.tolist()):
            out[i] = f
    return out  # type: ignore[return-value]


def to_float_logs(logs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Keras's ``pythonify_logs``: a new dict whose scalar tensors/arrays are Python floats."""
    if type(logs) is BatchLogs:  # lazy batch logs pass through untouched (the hot path)
        return logs  # type: ignore[return-value]
    if not logs:
        return {}
    out: dict[str, Any] = {}
    scalars: list[str] = []
    for key, value in logs.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            scalars.append(key)
            out[key] = value
        elif hasattr(value, "dtype") and getattr(value, "size", 0) == 1 and hasattr(value, "item"):
            out[key] = float(value.item())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
        else:
            out[key] = value
    if scalars:
        for key, f in zip(scalars, _as_floats([out[k] for k in scalars])):
            out[key] = f
    return out


class BatchLogs(MutableMapping[str, Any]):
    """Batch logs whose values are read from the device only when a callback reads one.

    Behaves like the ``dict`` of floats Keras passes: ``logs["loss"]``, ``logs.get("acc")``,
    ``dict(logs)`` and iteration all work. The keys are known without any device read; the
    first value read converts every value at once (a single synchronisation).
    """

    __slots__ = ("_keys", "_compute", "_raw", "_values", "_extra")

    def __init__(self, keys: list[str], compute: Any, raw: Any = None) -> None:
        self._keys = keys
        self._compute = compute
        self._raw = raw
        self._values: dict[str, Any] | None = None
        self._extra: dict[str, Any] = {}

    def _materialize(self) -> dict[str, Any]:
        if self._values is None:
            self._values = self._compute()
        return self._values

    def __getitem__(self, key: str) -> Any:
        if key in self._extra:
            return self._extra[key]
        if key not in self._keys:
            raise KeyError(key)
        return self._materialize()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._extra[key] = value

    def __delitem__(self, key: str) -> None:
        if key in self._extra:
            del self._extra[key]
        elif key in self._keys:
            self._keys = [k for k in self._keys if k != key]
        else:
            raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        yield from self._keys
        yield from (k for k in self._extra if k not in self._keys)

    def __len__(self) -> int:
        return len(self._keys) + sum(1 for k in self._extra if k not in self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._extra or key in self._keys

    def __repr__(self) -> str:
        return f"BatchLogs({dict(self)!r})"

    def raw(self, key: str) -> Any:
        """The value of ``key`` as it is on the device (a tensor), without synchronising."""
        if key in self._extra or self._raw is None:
            return self[key]
        if key not in self._keys:
            raise KeyError(key)
        return self._raw(key)

    @property
    def materialized(self) -> bool:
        """Whether a value has been read (and so the device was synchronised)."""
        return self._values is not None
