"""Model builders for the bundled tasks, and the seeded factory every task exposes."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """A fully connected ReLU network with layer widths `sizes` (input first, logits last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def small_cnn(in_channels: int, image_size: int, widths: Sequence[int] = (16, 32),
              num_classes: int = 10) -> nn.Sequential:
    """Two conv-BatchNorm-ReLU-maxpool blocks then a linear classifier."""
    layers: list[nn.Module] = []
    c, size = in_channels, image_size
    for w in widths:
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
        c, size = w, size // 2
    layers += [nn.Flatten(), nn.Linear(c * size * size, num_classes)]
    return nn.Sequential(*layers)


def seeded(build: Callable[[], nn.Module], default_seed: int = 0) -> Callable[..., nn.Module]:
    """`make_model(seed)`: `build()` on the CPU under a private RNG seeded by `seed`."""
    def make_model(seed: int | None = None) -> nn.Module:
        """A fresh model whose initial weights depend only on `seed`."""
        seed = default_seed if seed is None else int(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build()
    return make_model
