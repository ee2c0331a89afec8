"""Small tabular tasks from scikit-learn's bundled data sets (no download needed)."""

from __future__ import annotations

import numpy as np
from torch import nn

from .base import Task
from .models import mlp, seeded
from .prep import default_space, split_indices, standardize, to_split


def _tabular(name: str, x: np.ndarray, y: np.ndarray, sizes: tuple[int, int, int], seed: int,
             build, source: str, **task_kw) -> Task:
    """A Task from a feature matrix: seeded train/val/test split, train-standardized inputs."""
    tr, va, te = split_indices(len(y), sizes, seed)
    xtr, xva, xte = standardize(x[tr], x[va], x[te])
    num_classes = int(y.max()) + 1
    return Task(
        name=name, make_model=seeded(build, seed),
        train=to_split(xtr, y[tr]), val=to_split(xva, y[va]), test=to_split(xte, y[te]),
        space=default_space(), num_classes=num_classes,
        info={"source": source, "seed": seed, "input_shape": (x.shape[1],),
              "sizes": {"train": len(tr), "val": len(va), "test": len(te)}},
        **task_kw)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 8x8 digits as (1797, 64) inputs in [0, 1] and int labels."""
    from sklearn.datasets import load_digits  # scikit-learn only when a task is built
    d = load_digits()
    return d.data.astype(np.float64) / 16.0, d.target.astype(np.int64)


def digits_mlp(seed: int = 0, **_) -> Task:
    """Digits (1000/400/397 split by seed) with a 64-128-128-10 ReLU MLP."""
    x, y = _digits()
    return _tabular("digits_mlp", x, y, (1000, 400, 397), seed, lambda: mlp([64, 128, 128, 10]),
                    "sklearn.datasets.load_digits", batch_size=128, steps=300)


def digits_logreg(seed: int = 0, **_) -> Task:
    """Digits (1000/400/397 split by seed) with multinomial logistic regression."""
    x, y = _digits()
    return _tabular("digits_logreg", x, y, (1000, 400, 397), seed, lambda: nn.Linear(64, 10),
                    "sklearn.datasets.load_digits", batch_size=128, steps=300)


def cancer_logreg(seed: int = 0, **_) -> Task:
    """Breast cancer (569 x 30, 2 classes; 341/114/114 split by seed), logistic regression."""
    from sklearn.datasets import load_breast_cancer
    d = load_breast_cancer()
    x, y = d.data.astype(np.float64), d.target.astype(np.int64)
    return _tabular("cancer_logreg", x, y, (341, 114, 114), seed, lambda: nn.Linear(30, 2),
                    "sklearn.datasets.load_breast_cancer", batch_size=32, steps=300)
