"""Truncated reverse mode: backprop through the last `window` steps only (Shaban et al. 2019)."""

from __future__ import annotations

import torch

from ..problem import Problem
from .common import CostMeter, HypergradResult, finish, hp_values
from .reverse import unrolled_hypergrad


def truncated(problem: Problem, steps: int, window: int = 10, **_) -> HypergradResult:
    """K-step truncated backprop: s_{T-K} is held constant; window >= T equals reverse."""
    problem.require_replayable("truncated")
    if window < 1:
        raise ValueError(f"truncated needs window >= 1, got window={window}")
    start = max(0, steps - window)
    with CostMeter(problem.device) as meter:
        value, grads, extra = unrolled_hypergrad(problem, steps, start)
        meter.hvps = extra.pop("hvps")
    return finish(problem, value, grads,
                  meter.stats(method="truncated", steps=steps, window=window, **extra))


def window_hypergrad(problem: Problem, start, batches, leaves, horizon: int, val_batch):
    """Backprop through explicit (t, batch) steps from a held-constant state (online truncation).

    Returns (E after the window, dE/dλ for each natural leaf); used by the online tuner,
    which keeps the last K states and batches instead of replaying them.
    """
    lam = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    values = hp_values(problem, lam)
    s = start.detached()
    for t, batch in batches:
        s, _ = problem.step(s, batch, problem.hp_at(values, t, horizon), create_graph=True)
    out = problem.val_loss(s.params, s.buffers, val_batch)
    got = torch.autograd.grad(out, list(lam.values()), allow_unused=True)
    return out.item(), {k: (g if g is not None else torch.zeros_like(lam[k]))
                        for k, g in zip(lam, got)}
