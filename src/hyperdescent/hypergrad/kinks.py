"""The active pieces of a piecewise-linear network, frozen for difference Hessian-vector products.

A difference of gradients (∇L(θ+εv) − ∇L(θ))/ε is wrong by O(1) wherever the shifted weights
move a ReLU's input or a max-pool's winner across a kink: each crossing adds its jump over ε,
which no ε removes. Double backward never sees those jumps (ReLU'' = 0 almost everywhere), so
it differentiates the network restricted to the pieces active at θ. `KinkPatterns` records
those pieces on a forward pass at θ (each ReLU's slopes, each max-pool's winning indices)
and replays them on the shifted passes, where the module then computes the same linear piece
(x·mask, the input gathered at the recorded winners): the difference then approximates the
same product as double backward, with only the smooth parts' O(ε) (one-sided) or O(ε²)
(central) truncation error. Modules are replaced through forward hooks, so the model must use
module activations (nn.ReLU, nn.MaxPool2d), not their functional forms.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

#: activations whose piece is a 0/1 (or slope) mask on the input
MASKED = (nn.ReLU, nn.LeakyReLU)
#: poolings whose piece is the index of each window's winner, and their spatial rank
POOLS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
FROZEN = MASKED + tuple(POOLS)


def freezable(module: nn.Module) -> bool:
    """Whether `KinkPatterns` freezes this module's active piece."""
    if isinstance(module, tuple(POOLS)):
        return not module.return_indices
    return isinstance(module, MASKED)


def _gather_pool(module: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The max-pool's output with its winners fixed at `idx`: x gathered there."""
    rank = POOLS[type(module)]
    flat = x.flatten(x.dim() - rank)
    return flat.gather(-1, idx.flatten(idx.dim() - rank)).reshape(idx.shape)


class KinkPatterns:
    """Records the active pieces of `model`'s ReLUs and max-pools on one forward pass and
    replays them on later passes (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.modules = [m for m in model.modules() if freezable(m)]
        self.patterns: list[torch.Tensor] = []

    def __bool__(self) -> bool:
        return bool(self.modules)

    @contextmanager
    def _hooked(self, hook, indices: bool = False) -> Iterator[None]:
        # an in-place ReLU would hand the hook its output in place of its input; a max-pool
        # asked for its winners' indices computes them in its own pass
        inplace = [m for m in self.modules if getattr(m, "inplace", False)]
        pools = [m for m in self.modules if type(m) in POOLS] if indices else []
        for m in inplace:
            m.inplace = False
        for m in pools:
            m.return_indices = True
        handles = [m.register_forward_hook(hook) for m in self.modules]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for m in inplace:
                m.inplace = True
            for m in pools:
                m.return_indices = False

    @contextmanager
    def record(self) -> Iterator[None]:
        """Forward passes inside record each frozen module's piece, in call order."""
        self.patterns = []

        def hook(module, inputs, output):
            if type(module) in POOLS:  # asked for its indices by `_hooked`
                out, idx = output
                self.patterns.append(idx)
                return out
            x = inputs[0].detach()
            # the slope of each element's piece: a product replays it (torch.where and its
            # backward cost several times a multiplication on CPU)
            slope = module.negative_slope if isinstance(module, nn.LeakyReLU) else 0.0
            self.patterns.append((x > 0).to(x.dtype) if slope == 0.0 else
                                 torch.full_like(x, slope).masked_fill_(x > 0, 1.0))

        with self._hooked(hook, indices=True):
            yield

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Forward passes inside compute the recorded pieces (the calls must come in the
        recorded order: the same model on the same batch)."""
        calls = iter(self.patterns)

        def hook(module, inputs, output):
            pattern = next(calls, None)
            if pattern is None:
                raise RuntimeError("a frozen forward pass called more ReLU / max-pool modules "
                                   "than the recorded one")
            x = inputs[0]
            if type(module) in POOLS:
                return _gather_pool(module, x, pattern)
            return x * pattern

        with self._hooked(hook):
            yield
