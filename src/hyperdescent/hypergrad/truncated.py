"""Truncated reverse mode: backprop through the last `window` steps only (Shaban et al. 2019)."""

from __future__ import annotations

from ..problem import Problem
from .common import CostMeter, HypergradResult, finish
from .reverse import unrolled_hypergrad


def truncated(problem: Problem, steps: int, window: int = 10, **_) -> HypergradResult:
    """K-step truncated backprop: s_{T-K} is held constant; window >= T equals reverse."""
    problem.require_replayable("truncated")
    if window < 1:
        raise ValueError(f"truncated needs window >= 1, got window={window}")
    start = max(0, steps - window)
    with CostMeter(problem.device) as meter:
        value, grads, extra = unrolled_hypergrad(problem, steps, start, None, meter)
    return finish(problem, value, grads,
                  meter.stats(method="truncated", steps=steps, window=window, **extra))
