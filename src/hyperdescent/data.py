"""Replayable batches: batch t of a run is a pure function of (seed, t).

Each epoch is a seeded permutation of the dataset and batches are consecutive slices of it,
drawn by tensor indexing of a dataset held as tensors on the model's device.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .errors import DataError

Batch = tuple[torch.Tensor, torch.Tensor]


def as_tensor_pair(data: Any, name: str, device=None, dtype=None) -> Batch | None:
    """(X, Y) tensors for a tensor pair or an indexable dataset; None for a plain iterable."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(
            isinstance(t, torch.Tensor) for t in data):
        x, y = data
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__") \
            and not isinstance(data, torch.utils.data.DataLoader):
        if len(data) == 0:
            raise DataError(f"dataset {name!r} is empty; give at least one (x, y) example")
        tensors = getattr(data, "tensors", None)  # TensorDataset: no per-sample Python loop
        if tensors is not None and len(tensors) == 2:
            x, y = tensors
        else:
            items = [data[i] for i in range(len(data))]
            x = torch.stack([torch.as_tensor(a) for a, _ in items])
            y = torch.stack([torch.as_tensor(b) for _, b in items])
    elif isinstance(data, Iterable):
        return None
    else:
        raise DataError(
            f"dataset {name!r} of type {type(data).__name__} is not usable; give an (X, Y) tensor "
            f"pair, an indexable dataset returning (x, y), or an iterable such as a DataLoader")
    if len(x) != len(y):
        raise DataError(f"dataset {name!r} has {len(x)} inputs but {len(y)} targets; "
                        f"inputs and targets must have the same length")
    if len(x) == 0:
        raise DataError(f"dataset {name!r} is empty; give at least one (x, y) example")
    if dtype is not None and x.is_floating_point():
        x = x.to(dtype)
    if dtype is not None and y.is_floating_point():
        y = y.to(dtype)
    return x.to(device), y.to(device)


def seed_for(seed: int, stream: int, epoch: int) -> int:
    """A deterministic 63-bit seed for (run seed, stream, epoch)."""
    return (seed * 1_000_003 + stream * 7_919 + epoch * 104_729) % (2 ** 63 - 1)


class ReplayableBatches:
    """Batch t = slice t mod n of the epoch-(t div n) seeded permutation; a pure function of t."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, stream: int):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.x, self.y, self.seed, self.stream = x, y, seed, stream
        self.n = len(x)
        self.batch_size = min(batch_size, self.n)
        self.per_epoch = self.n // self.batch_size
        self._epoch, self._perm = None, None

    @property
    def full(self) -> bool:
        return self.batch_size >= self.n

    def indices(self, t: int) -> torch.Tensor:
        """Indices of batch t."""
        epoch, i = divmod(t, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(seed_for(self.seed, self.stream, epoch))
            self._perm = torch.randperm(self.n, generator=g).to(self.x.device)
            self._epoch = epoch
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size]

    def __call__(self, t: int) -> Batch:
        if self.full:
            return self.x, self.y
        idx = self.indices(t)
        # index_select, not x[idx]: advanced indexing is slower on CPU for small batches
        return self.x.index_select(0, idx), self.y.index_select(0, idx)


class StreamBatches:
    """Batches from an iterable (e.g. a DataLoader), consumed as they come; cannot replay."""

    def __init__(self, iterable: Iterable, name: str, device=None, dtype=None):
        self.iterable, self.name, self.device, self.dtype = iterable, name, device, dtype
        self._it: Iterator | None = None
        self.consumed = 0  # batches handed out: a checkpoint's position in the stream

    full = False

    def __call__(self, t: int) -> Batch:
        # t is ignored: a stream yields its next batch; methods that replay refuse streams.
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.iterable)
            try:
                x, y = next(self._it)
                break
            except StopIteration:
                self._it = None
        else:
            raise DataError(f"dataset {self.name!r} yielded no batch")
        self.consumed += 1
        if self.dtype is not None and x.is_floating_point():
            x = x.to(self.dtype)
        return x.to(self.device), y.to(self.device)

    def skip_to(self, consumed: int) -> None:
        """Read and drop batches from a fresh pass until `consumed` have been handed out: a
        restored run's stream then continues where the saved one was, exactly so when the
        iterable yields the same batches on every pass (a seeded DataLoader)."""
        self._it, self.consumed = None, 0
        while self.consumed < consumed:
            self(self.consumed)
