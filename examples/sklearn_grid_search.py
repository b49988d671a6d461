"""A torcheras network as a scikit-learn estimator: a Pipeline (scaling, then the network)
tuned by GridSearchCV over the network's width, the learning rate and the epochs, in two
processes, then scored on held-out digits and cross-validated.

    python examples/sklearn_grid_search.py [--smoke]
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from torcheras.wrappers import SKLearnClassifier


def build(n_features_in: int, n_classes: int, hidden: int = 32) -> nn.Module:
    """Called at each fit with the data's sizes and the ``model__`` parameters."""
    return nn.Sequential(
        nn.Linear(n_features_in, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, n_classes)
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="a tiny grid: a quick check")
    args = parser.parse_args()
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    if args.smoke:
        x, y = x[:500], y[:500]
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)

    pipe = Pipeline(
        [
            ("scale", StandardScaler()),
            ("net", SKLearnClassifier(build, fit__batch_size=32, random_state=0)),
        ]
    )
    grid = {
        "net__model__hidden": [16, 64],
        "net__compile__learning_rate": [1e-3, 1e-2],
        "net__fit__epochs": [3] if args.smoke else [10, 20],
    }
    if args.smoke:
        grid["net__compile__learning_rate"] = [1e-2]
    search = GridSearchCV(pipe, grid, cv=2 if args.smoke else 3, n_jobs=2)
    search.fit(x_train, y_train)
    print(f"best parameters: {search.best_params_}")
    print(f"best cross-validated accuracy: {search.best_score_:.4f}")
    print(f"test accuracy: {search.score(x_test, y_test):.4f}")

    scores = cross_val_score(search.best_estimator_, x, y, cv=2 if args.smoke else 5)
    print("cross_val_score of the best pipeline: " + ", ".join(f"{s:.4f}" for s in scores))


if __name__ == "__main__":
    main()
