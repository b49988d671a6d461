"""A CNN on scikit-learn's 8x8 digits with the typical callbacks: ModelCheckpoint,
EarlyStopping, ReduceLROnPlateau, TensorBoard and CSVLogger; then the curves and a report.

    python examples/image_classification.py [OUT_DIR] [--smoke]
    tensorboard --logdir runs/digits-cnn/tensorboard
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import torcheras
from torcheras import callbacks as cb


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?", default="runs/digits-cnn")
    parser.add_argument("--smoke", action="store_true", help="4 epochs: a quick check")
    args = parser.parse_args()
    torch.manual_seed(0)
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # N x 1 x 8 x 8
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y
    )
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 32 x 4 x 4
        nn.Flatten(), nn.Dropout(0.25), nn.Linear(32 * 4 * 4, 10),
    )  # fmt: skip
    model = torcheras.Model(net)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.summary(input_shape=(1, 8, 8))
    out = args.out
    history = model.fit(
        x_train, y_train,
        epochs=4 if args.smoke else 40,
        batch_size=32,
        validation_split=0.15,
        verbose=2,
        callbacks=[
            cb.ModelCheckpoint(os.path.join(out, "best.pt"), monitor="val_accuracy",
                               save_best_only=True),
            cb.EarlyStopping(monitor="val_loss", patience=5, restore_best_weights=True),
            cb.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2),
            cb.TensorBoard(os.path.join(out, "tensorboard")),
            cb.CSVLogger(os.path.join(out, "log.csv")),
        ],
    )  # fmt: skip
    results = model.evaluate(x_test, y_test, verbose=0, return_dict=True)
    history.save(os.path.join(out, "history.json"))
    history.plot(os.path.join(out, "curves.png"))
    from torcheras.report import write_report

    report = write_report(out)
    print(f"stopped: {history.stop_reason or 'all epochs ran'}")
    print(f"test accuracy: {results['accuracy']:.4f}")
    print(f"report: {report}")


if __name__ == "__main__":
    main()
