"""A text model on generated sequences: Embedding + GRU, with a learning rate that warms up
then follows a cosine, set every batch, and TensorBoard showing it.

Each sequence is 32 tokens from a vocabulary of 30; its label says whether token 5 appears
more often than token 6: the model has to read the whole sequence and count.

    python examples/text_classification.py [OUT_DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

import torcheras
from torcheras import callbacks as cb
from torcheras import schedules

VOCAB, LENGTH = 30, 32


def make_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (n, LENGTH), generator=generator)
    label = ((tokens == 5).sum(1) > (tokens == 6).sum(1)).long()
    return tokens, label


class GRUClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.gru = nn.GRU(32, 64, batch_first=True)
        self.head = nn.Linear(64, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _, last = self.gru(self.embed(tokens))
        return self.head(last[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?", default="runs/text-gru")
    parser.add_argument("--smoke", action="store_true", help="3 short epochs: a quick check")
    args = parser.parse_args()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x, y = make_data(1200 if args.smoke else 6000, generator)
    x_val, y_val = make_data(1000, generator)
    epochs, batch_size = (3, 64) if args.smoke else (12, 64)
    steps = epochs * -(-len(x) // batch_size)  # optimizer steps in the whole fit
    model = torcheras.Model(GRUClassifier())
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    warmup_cosine = schedules.cosine_annealing(3e-3, total=steps, warmup=steps // 10)
    history = model.fit(
        x, y,
        epochs=epochs,
        batch_size=batch_size,
        validation_data=(x_val, y_val),
        verbose=2,
        callbacks=[
            cb.LearningRateScheduler(warmup_cosine, interval="batch"),
            cb.TensorBoard(os.path.join(args.out, "tensorboard"), update_freq=20),
            cb.CSVLogger(os.path.join(args.out, "log.csv")),
        ],
    )  # fmt: skip
    print(f"validation accuracy: {history.history['val_accuracy'][-1]:.4f}")
    print(f"tensorboard --logdir {os.path.join(args.out, 'tensorboard')}")


if __name__ == "__main__":
    main()
