"""Shard a model over the processes with FSDP2: the same script alone and under torchrun.

python examples/fsdp_train.py                                    # one process
torchrun --standalone --nproc_per_node=2 examples/fsdp_train.py  # 2 processes (gloo on CPU)
python examples/fsdp_train.py --smoke                            # a short run (CI)

With `strategy="fsdp"` each of N ranks holds 1/N of the parameters, their gradients and the
optimizer's state; each transformer block is gathered just before it runs and freed after.
The global batch is the same on 1 or N processes, so the model trains the same. Add
`--device cuda` for NCCL, one GPU per rank.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

import torcheras
from torcheras.callbacks import CSVLogger, EarlyStopping

parser = argparse.ArgumentParser()
parser.add_argument("--smoke", action="store_true")
parser.add_argument("--device", default="cpu")
args = parser.parse_args()


class Classifier(torch.nn.Module):
    """Sequences of 8 tokens: two transformer blocks (each sharded on its own), a head."""

    def __init__(self, vocab: int = 32, width: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.blocks = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
            for _ in range(2)
        )
        self.head = torch.nn.Linear(width, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(dim=1))


torch.manual_seed(0)  # the same seed on every rank: the same initial weights and order
rng = np.random.default_rng(0)
x = rng.integers(0, 32, size=(512, 8)).astype("int64")
y = (x[:, 0] > x[:, -1]).astype("int64")  # does the first token exceed the last?

model = torcheras.Model(Classifier())
model.compile("adamw", "sparse_categorical_crossentropy", metrics=["accuracy"],
              learning_rate=3e-3, device=args.device, strategy="fsdp")  # fmt: skip
folder = os.environ.get("EXAMPLE_OUT")
callbacks = [EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=False)]
if folder:
    callbacks.append(CSVLogger(os.path.join(folder, "log.csv")))  # written by rank 0 only
history = model.fit(x, y, batch_size=64, epochs=2 if args.smoke else 15, validation_split=0.2,
                    verbose=2, callbacks=callbacks)  # fmt: skip
rank = int(os.environ.get("RANK", "0"))
# every rank runs summary (its forward pass gathers the blocks); rank 0 prints the whole counts
model.summary(print_fn=print if rank == 0 else lambda line: None)
held = sum(
    (p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters()
)  # fmt: skip
total = sum(p.numel() for p in model.parameters())
print(f"rank {rank}: holds {held:,} of {total:,} parameters; trained {len(history.epoch)} "
      f"epochs, val_accuracy {history.history['val_accuracy'][-1]:.3f}")  # fmt: skip
