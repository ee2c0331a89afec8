"""Greedy one-step lookahead: dE(Φ(s_{T-1}, λ))/dλ with s_{T-1} held constant.

Luketina et al. 2016 (T1-T2); with the learning rate alone it is the hypergradient descent
of Baydin et al. 2018.
"""

from __future__ import annotations

from ..problem import Problem
from .common import CostMeter, HypergradResult, finish
from .reverse import unrolled_hypergrad


def greedy(problem: Problem, steps: int, values: dict) -> HypergradResult:
    """One-step hypergradient of the validation loss after the last step."""
    with CostMeter(problem.device) as meter:
        value, grads, extra = unrolled_hypergrad(problem, steps, values, steps - 1, meter=meter)
        meter.hvps = extra.pop("hvps")
    return finish(problem, values, value, grads, meter.stats(method="greedy", steps=steps, **extra))
