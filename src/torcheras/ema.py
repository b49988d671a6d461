"""An exponential moving average of the weights, kept on the device (``compile(ema_momentum=)``).

As Keras's ``use_ema``: after every optimizer step ``average = m * average + (1 - m) * w``
(the first step copies ``w``), and at the end of ``fit`` the weights become the average.
Trainable parameters only (BatchNorm's running statistics are not averaged, as in Keras).
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import nn

from torcheras import distributed

__all__ = ["ExponentialMovingAverage"]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view: writing to it writes the parameter); else itself."""
    to_local = getattr(tensor, "to_local", None)
    return tensor if to_local is None else to_local()


class ExponentialMovingAverage:
    """The moving average of ``params``; :meth:`swap` exchanges it with the weights in place
    (for validation or checkpoints on the averaged weights), :meth:`finalize` leaves the
    average in the model, whichever of the two is in it."""

    def __init__(self, params: list[nn.Parameter], momentum: float) -> None:
        if not (isinstance(momentum, numbers.Real) and 0 <= momentum < 1):
            raise ValueError(
                f"`ema_momentum` must be a number in [0, 1) (Keras's default is 0.99); got "
                f"{momentum!r}."
            )
        self.params = params
        self.momentum = float(momentum)
        self.average = [w.clone() for w in self._weights()]
        self.updates = 0
        self.swapped = False  # True while the average is in the model

    def _weights(self) -> list[torch.Tensor]:
        """The weights this process holds: under ``strategy="fsdp"`` its shard of each
        parameter (the average is sharded as the weights are: every rank averages its part)."""
        return [_local(p.detach()) for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step (on the device, no synchronisation)."""
        if self.swapped:
            raise RuntimeError(
                "The EMA weights are swapped into the model during a training step: swap them "
                "back first (SwapEMAWeights does so at the next epoch's start)."
            )
        if self.updates == 0:
            torch._foreach_copy_(self.average, self._weights())
        else:
            torch._foreach_lerp_(self.average, self._weights(), 1.0 - self.momentum)
        self.updates += 1

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the weights and the average (call again to swap back)."""
        weights = self._weights()
        kept = [w.clone() for w in weights]
        torch._foreach_copy_(weights, self.average)
        torch._foreach_copy_(self.average, kept)
        self.swapped = not self.swapped

    @torch.no_grad()
    def finalize(self) -> None:
        """Leave the average in the model (Keras's end of ``fit``); the average stays too."""
        if self.swapped:
            torch._foreach_copy_(self.average, self._weights())
            self.swapped = False
        else:
            torch._foreach_copy_(self._weights(), self.average)

    def state_dict(self) -> dict[str, Any]:
        """The average of the whole parameters, on the CPU: under ``strategy="fsdp"`` each
        rank's shards are gathered (every rank must call it), so the state loads on any
        number of processes."""
        return {
            "average": [
                distributed.whole(a, like=p).detach().cpu().clone()
                for a, p in zip(self.average, self.params)
            ],
            "updates": self.updates,
            "swapped": self.swapped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["average"]) != len(self.average):
            raise ValueError(
                f"The saved EMA holds {len(state['average'])} tensors; this model has "
                f"{len(self.average)} trainable parameters."
            )
        for i, (saved, p) in enumerate(zip(state["average"], self.params)):
            if tuple(saved.shape) != tuple(p.shape):
                raise ValueError(
                    f"The saved EMA's tensor {i} has shape {tuple(saved.shape)}; this model's "
                    f"parameter has {tuple(p.shape)} (a file of another network, or one part "
                    "of a sharded average)."
                )
        with torch.no_grad():
            for mine, saved, p in zip(self.average, state["average"], self.params):
                mine.copy_(distributed.local_part(saved.to(p.dtype), p.detach()))
        self.updates, self.swapped = int(state["updates"]), bool(state.get("swapped", False))
