"""A GAN with train_step overridden (two optimizers) on scikit-learn's 8x8 digits; ImageLogger
saves the generator's samples on fixed noise after every epoch (PNG and TensorBoard).

    python examples/gan.py [OUT_DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import torcheras
from torcheras import callbacks as cb

LATENT = 16


class GAN(torcheras.Model):
    """A generator (noise -> 8x8 image in [-1, 1]) and a discriminator, each with its own
    optimizer; ``fit`` gets images alone."""

    def __init__(self) -> None:
        super().__init__()
        self.generator = nn.Sequential(
            nn.Linear(LATENT, 128), nn.LeakyReLU(0.2), nn.Linear(128, 64), nn.Tanh()
        )
        self.discriminator = nn.Sequential(
            nn.Linear(64, 128), nn.LeakyReLU(0.2), nn.Dropout(0.2), nn.Linear(128, 1)
        )
        self.g_optimizer = torch.optim.Adam(self.generator.parameters(), 2e-3, betas=(0.5, 0.999))
        self.d_optimizer = torch.optim.Adam(
            self.discriminator.parameters(), 2e-3, betas=(0.5, 0.999)
        )

    def train_step(self, batch):
        (real,) = batch
        n = real.shape[0]
        bce = nn.functional.binary_cross_entropy_with_logits
        ones, zeros = torch.ones(n, 1), torch.zeros(n, 1)
        fake = self.generator(torch.randn(n, LATENT))
        d_loss = bce(self.discriminator(real), ones * 0.9) + bce(
            self.discriminator(fake.detach()), zeros
        )
        self.d_optimizer.zero_grad()
        d_loss.backward()
        self.d_optimizer.step()
        g_loss = bce(self.discriminator(fake), ones)  # fool the discriminator
        self.g_optimizer.zero_grad()
        g_loss.backward()
        self.g_optimizer.step()
        self.log("d_real", torch.sigmoid(self.discriminator(real)).mean().detach())
        return {"d_loss": d_loss, "g_loss": g_loss}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?", default="runs/gan")
    parser.add_argument("--smoke", action="store_true", help="3 epochs: a quick check")
    args = parser.parse_args()
    torch.manual_seed(0)
    digits = load_digits()
    images = (digits.data / 8.0 - 1.0).astype(np.float32)  # 0..16 -> -1..1
    gan = GAN()
    gan.compile(optimizer=None, device="cpu")  # train_step owns its optimizers
    noise = torch.randn(32, LATENT)  # fixed: each epoch's grid shows the same samples

    def samples(model):
        return model.generator(noise).reshape(-1, 1, 8, 8)

    history = gan.fit(
        images,
        epochs=3 if args.smoke else 30,
        batch_size=64,
        verbose=2,
        callbacks=[
            cb.ImageLogger(
                samples,
                os.path.join(args.out, "images"),
                log_dir=os.path.join(args.out, "tensorboard"),
                value_range=(-1, 1),
                scale=4,
            ),
            cb.CSVLogger(os.path.join(args.out, "log.csv")),
        ],
    )
    history.plot(os.path.join(args.out, "curves.png"))
    final = history.history["d_loss"][-1]
    print(f"samples: {os.path.join(args.out, 'images')}; final d_loss {final:.3f}")


if __name__ == "__main__":
    main()
