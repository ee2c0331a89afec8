"""The `Task` record every bundled task returns: model factory, fixed splits, default space."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..space import Space

Split = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Task:
    """A benchmark task: `make_model(seed)` builds a fresh model; splits are (X, Y) tensors."""

    name: str
    make_model: Callable[..., torch.nn.Module]   # make_model(seed: int = 0) -> nn.Module
    train: Split
    val: Split
    test: Split
    space: Space                                  # default space: Reals a gradient method can tune
    loss: Callable = torch.nn.functional.cross_entropy
    batch_size: int = 128
    steps: int = 300                              # a sensible default training horizon
    optimizer: str = "sgd"                        # "sgd" (momentum 0.9) or "adam"
    momentum: float = 0.9
    num_classes: int = 10
    info: dict = field(default_factory=dict)      # provenance: source, sizes, seed

    def to(self, device=None, dtype=None) -> Task:
        """A copy whose float inputs are cast to `dtype` and all tensors moved to `device`."""
        def cast(split):
            x, y = split
            x = x.to(device=device, dtype=dtype if x.is_floating_point() and dtype else x.dtype)
            return x, y.to(device=device)
        return Task(**{**self.__dict__, "train": cast(self.train), "val": cast(self.val),
                       "test": cast(self.test)})
