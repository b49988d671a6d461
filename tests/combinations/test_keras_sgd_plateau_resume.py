"""KerasSGD with momentum while ReduceLROnPlateau changes the rate mid-run, interrupted and
resumed by BackupAndRestore, against Keras's SGD written out here (``m = momentum * m - lr *
g; w += m``; nesterov: ``w += momentum * m - lr * g``).

torch's SGD keeps ``buf = momentum * buf + g; w -= lr * buf``: the same while the rate is
constant, but a changed rate scales the whole history there and only the new gradient in
Keras. optimizers.py takes torch's step on the fast path and rescales the buffers when the
rate changed; the backup's state_dict round trip (floats that are new objects once loaded)
must keep Keras's formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torcheras
from torcheras import callbacks as cb
from torcheras.optimizers import KerasSGD

N, BATCH, EPOCHS, LR, MOMENTUM = 48, 16, 5, 0.2, 0.9  # 3 batches an epoch, in order
KILL_AT = 10  # global batch index: epoch 3, batch 1, after two reductions
# float32 throughout, the same operations in the same order except torch's foreach kernels
# and the buffer rescale (m = -lr * buf): measured max |w - w_ref| 3.6e-7, weights of scale 1
ATOL = 2e-6


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(N, 3, generator=gen)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(N, 1, generator=gen)


def net() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Linear(3, 1)


def keras_reference(nesterov: bool, rates: list[float]) -> dict[str, torch.Tensor]:
    """Keras's SGD over the same batches, epoch ``e`` at ``rates[e]``."""
    x, y = data()
    module = net()
    params = list(module.parameters())
    m = [torch.zeros_like(p) for p in params]
    for epoch in range(EPOCHS):
        lr = rates[epoch]
        for start in range(0, N, BATCH):
            loss = F.mse_loss(module(x[start : start + BATCH]), y[start : start + BATCH])
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g, v in zip(params, grads, m):
                    v.mul_(MOMENTUM).sub_(lr * g)
                    p.add_(MOMENTUM * v - lr * g if nesterov else v)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class Interrupt(cb.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        if self.model.loop.global_step == KILL_AT:
            raise KeyboardInterrupt("interrupted by the test")


def fit(nesterov: bool, backup, interrupt: bool = False) -> tuple[torcheras.Model, object]:
    x, y = data()
    model = torcheras.Model(net())
    model.compile(
        lambda p: KerasSGD(p, lr=LR, momentum=MOMENTUM, nesterov=nesterov), "mse", device="cpu"
    )
    # "loss" improves by less than min_delta after the first epoch (Keras's rule: the first
    # value always improves on None): with patience 1, a halving at the end of every epoch
    # from the second on
    callbacks = [
        cb.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=1, min_delta=100.0),
        cb.BackupAndRestore(backup, save_freq=1),
    ]
    if interrupt:
        callbacks.append(Interrupt())
    history = model.fit(
        x, y, epochs=EPOCHS, batch_size=BATCH, shuffle=False, verbose=0, callbacks=callbacks
    )
    return model, history


@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
def test_rate_changes_and_a_resume_keep_keras_momentum(nesterov, tmp_path):
    rates = [LR, LR, LR / 2, LR / 4, LR / 8]
    reference = keras_reference(nesterov, rates)
    # torch's own momentum (the whole history rescaled) ends elsewhere: the check can fail
    torch_like = net()
    torch_opt = torch.optim.SGD(torch_like.parameters(), lr=LR, momentum=MOMENTUM,
                                nesterov=nesterov)  # fmt: skip
    x, y = data()
    for epoch in range(EPOCHS):
        for group in torch_opt.param_groups:
            group["lr"] = rates[epoch]
        for start in range(0, N, BATCH):
            torch_opt.zero_grad()
            F.mse_loss(torch_like(x[start : start + BATCH]), y[start : start + BATCH]).backward()
            torch_opt.step()
    torch_gap = max((torch_like.state_dict()[k] - reference[k]).abs().max() for k in reference)
    assert torch_gap > 100 * ATOL

    whole, history = fit(nesterov, tmp_path / "whole")
    assert history.history["learning_rate"] == pytest.approx(rates, rel=1e-7)
    with pytest.raises(KeyboardInterrupt):
        fit(nesterov, tmp_path / "cut", interrupt=True)
    assert (tmp_path / "cut" / "latest.pt").exists()
    resumed, resumed_history = fit(nesterov, tmp_path / "cut")
    assert resumed_history.history["learning_rate"] == pytest.approx(rates, rel=1e-7)
    for name, expected in reference.items():
        live = whole.module.state_dict()[name]
        torch.testing.assert_close(live, expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(resumed.module.state_dict()[name], live, atol=0, rtol=0)
    assert resumed_history.history["loss"] == history.history["loss"]
