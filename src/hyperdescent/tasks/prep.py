"""Shared preprocessing for the bundled tasks: seeded splits, standardization, default space."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..space import Real, Space


def default_space() -> Space:
    """The default space of every bundled task: a log-scaled learning rate and weight decay."""
    return Space({
        "lr": Real(0.05, low=1e-5, high=2.0, log=True),
        "weight_decay": Real(1e-4, low=1e-7, high=1e-1, log=True),
    })


def permutation(n: int, seed: int) -> np.ndarray:
    """A permutation of range(n) that depends only on `seed` (its own torch.Generator)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=gen).numpy()


def split_indices(n: int, sizes: Sequence[int], seed: int) -> list[np.ndarray]:
    """Disjoint index arrays of the given sizes carved from a seeded permutation of range(n)."""
    if sum(sizes) > n:
        raise ValueError(f"split sizes {list(sizes)} need {sum(sizes)} rows, only {n} exist")
    perm = permutation(n, seed)
    bounds = np.cumsum([0, *sizes])
    return [np.sort(perm[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def standardize(train: np.ndarray, *others: np.ndarray, axis=0) -> list[np.ndarray]:
    """Subtract the train mean and divide by the train std (1 where constant) along `axis`."""
    mean = train.mean(axis=axis, keepdims=True)
    std = train.std(axis=axis, keepdims=True)
    std = np.where(std > 0, std, 1.0)
    return [((a - mean) / std).astype(np.float32) for a in (train, *others)]


def to_split(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """An (X, Y) pair of tensors: float32 inputs and int64 class labels."""
    return (torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32),
            torch.as_tensor(np.asarray(y), dtype=torch.int64))
