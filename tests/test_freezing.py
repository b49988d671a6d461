"""torcheras.freeze: Keras's ``trainable = False``, BatchNorm in inference mode included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torcheras


def _transfer_model():
    """keras-io's transfer learning in small: a base with BatchNorm, a new head."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5))
    model = torcheras.Model(nn.Sequential(base, nn.Linear(16, 1)))
    return base, model


def _data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(128, 6, generator=gen) * 3 + 1  # statistics far from BatchNorm's start
    return x, (x[:, :1] > 1).float()


def test_a_frozen_base_keeps_its_weights_and_batchnorm_statistics_through_fit():
    base, model = _transfer_model()
    torcheras.freeze(base)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    head_before = model.module[1].weight.clone()
    model.compile("adam", "bce_with_logits", metrics=["accuracy"])
    model.fit(*_data(), epochs=3, batch_size=32, verbose=0, validation_split=0.25)
    for key, value in base.state_dict().items():  # running_mean/var and num_batches too
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    assert not torch.equal(model.module[1].weight, head_before)  # the head learned
    assert not base[1].training  # BatchNorm in inference mode
    assert base[3].training and model.module[1].training  # Dropout still drops, as in Keras
    assert torcheras.is_frozen(base) and torcheras.is_frozen(base[1])


def test_requires_grad_alone_lets_batchnorm_statistics_move_which_freeze_prevents():
    """The trap the issue reports: fit's model.train() moves a base that is only
    requires_grad=False (by 0.017 in the keras-io port)."""
    base, model = _transfer_model()
    for p in base.parameters():
        p.requires_grad_(False)
    before = base[1].running_mean.clone()
    model.compile("adam", "bce_with_logits")
    model.fit(*_data(), epochs=1, batch_size=32, verbose=0)
    assert not torch.allclose(base[1].running_mean, before)


def test_unfreeze_trains_the_base_again_in_train_mode():
    base, model = _transfer_model()
    torcheras.freeze(base)
    model.compile("adam", "bce_with_logits")
    model.fit(*_data(), epochs=1, batch_size=32, verbose=0)
    torcheras.unfreeze(base)
    assert not torcheras.is_frozen(base)
    model.compile(torch.optim.Adam(model.parameters(), lr=1e-3), "bce_with_logits")  # as Keras
    weights, stats = base[0].weight.clone(), base[1].running_mean.clone()
    model.fit(*_data(), epochs=1, batch_size=32, verbose=0)
    assert not torch.equal(base[0].weight, weights)
    assert not torch.equal(base[1].running_mean, stats)
    assert model.training and base.training


def test_summary_counts_a_frozen_base_as_non_trainable():
    base, model = _transfer_model()
    torcheras.freeze(base)
    lines = []
    model.summary(lines.append, input_shape=(6,), show_trainable=True)
    frozen = sum(p.numel() for p in base.parameters())  # 6*16+16 + 16+16 = 144
    assert f"Non-trainable params: {frozen:,}" in lines
    assert "Trainable params: 17" in lines  # the head: 16 weights + 1 bias
    rows = {line.split()[0]: line.split()[-1] for line in lines if "(" in line}
    assert rows["0.0"] == "N" and rows["0.1"] == "N" and rows["0.2"] == "-" and rows["1"] == "Y"
    assert not base[1].training  # summary's own forward pass leaves the mode as it was


def test_a_frozen_base_holds_with_the_other_features(tmp_path):
    """freeze with compiled steps, accumulation, bf16 autocast, the weight average, clipping
    and an exact resume: the base's weights and statistics never move, the head learns."""
    from torcheras.callbacks import BackupAndRestore, Callback

    class Crash(Callback):
        def on_train_batch_end(self, batch, logs=None):
            if self.model.loop.global_step == 5:
                raise KeyboardInterrupt("crash")

    def run(crash):
        base, model = _transfer_model()
        torcheras.freeze(base)
        before = {k: v.clone() for k, v in base.state_dict().items()}
        model.compile(
            "adam",
            "bce_with_logits",
            jit_compile=True,
            gradient_accumulation_steps=2,
            precision="bf16-mixed",
            ema_momentum=0.9,
            clipnorm=1.0,
        )
        callbacks = [BackupAndRestore(tmp_path / "backup", save_freq=1)]
        if crash:
            callbacks.append(Crash())
        model.fit(*_data(), epochs=2, batch_size=32, verbose=0, callbacks=callbacks)
        return base, model, before

    with pytest.raises(KeyboardInterrupt):
        run(crash=True)
    base, model, before = run(crash=False)  # resumes from the backup at step 5
    for key, value in base.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    assert not base[1].training and model.module[1].training
    assert torcheras.is_frozen(base)


def test_unfreezing_a_child_of_a_frozen_base_trains_it_in_train_mode():
    """Fine-tuning the top of a base: the unfrozen BatchNorm follows the model's mode."""
    base, model = _transfer_model()
    torcheras.freeze(base)
    torcheras.unfreeze(base[1])
    model.compile("adam", "bce_with_logits")
    weight, stats = base[0].weight.clone(), base[1].running_mean.clone()
    model.fit(*_data(), epochs=1, batch_size=32, verbose=0)
    assert base[1].training and base[1].weight.requires_grad
    assert not torch.equal(base[1].running_mean, stats)
    torch.testing.assert_close(base[0].weight, weight, rtol=0, atol=0)  # still frozen
