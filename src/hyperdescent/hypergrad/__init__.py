"""Hypergradient engines, one method per module behind one signature (DESIGN.md layer 4)."""

from __future__ import annotations

from ..problem import Problem
from .common import HypergradResult
from .forward import ForwardTangent, forward
from .greedy import greedy
from .implicit import implicit
from .reverse import reverse
from .truncated import truncated

METHODS = {"reverse": reverse, "truncated": truncated, "forward": forward,
           "implicit": implicit, "greedy": greedy}


def hypergrad(problem: Problem, steps: int, method: str = "forward", **options) -> HypergradResult:
    """dE(s_T)/dλ of the validation loss after `steps` inner steps, by `method` (API.md)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {sorted(METHODS)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    problem.bound.space.require_differentiable(method)
    return METHODS[method](problem, steps, **options)


__all__ = ["hypergrad", "HypergradResult", "ForwardTangent", "METHODS"]
