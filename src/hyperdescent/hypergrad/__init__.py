"""Hypergradient methods, one module each behind one signature:
`method(problem, steps, values, *, options) -> HypergradResult`, dispatched by `hypergrad`."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from ..errors import HyperparameterError
from ..problem import Problem
from .common import HypergradResult
from .engine import Engine, run
from .forward import ForwardTangent, forward
from .greedy import greedy
from .implicit import implicit
from .reverse import reverse
from .reversible import reversible
from .truncated import TruncatedWindow, truncated

#: the method table: adding a method is one module and one entry here
METHODS = {"reverse": reverse, "truncated": truncated, "forward": forward,
           "implicit": implicit, "greedy": greedy, "reversible": reversible}


def method_options(method: str) -> list[str]:
    """The keyword options a method takes."""
    sig = inspect.signature(METHODS[method])
    return [n for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def hypergrad(problem: Problem, steps: int, method: str = "forward",
              hparams: Mapping[str, Any] | None = None, **options) -> HypergradResult:
    """dE(s_T)/dλ of the validation loss after `steps` inner steps from the model's initial
    weights, at hyperparameters `hparams` (natural units; None: the problem's current values;
    a partial dict overrides those named), by `method`."""
    if method not in METHODS:
        raise HyperparameterError(f"method={method!r} is not one of {sorted(METHODS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise HyperparameterError(f"steps must be an integer >= 1, got {steps!r}")
    accepted = method_options(method)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise HyperparameterError(
            f"method {method!r} got unknown option(s) {unknown}; it takes "
            f"{accepted if accepted else 'no options'}")
    problem.bound.space.require_differentiable(method)
    reserved = [n for n in ("init_scale", "train_inputs") if n in problem.bound.names()]
    if reserved and method not in ("reverse", "truncated", "reversible"):
        raise HyperparameterError(
            f"hyperparameter(s) {reserved} (initial-weight scale, training inputs) are "
            f"differentiated by method 'reverse', 'truncated' or 'reversible', not {method!r}")
    values = problem.real_hparams()
    if hparams is not None:
        values = {**values, **{k: v for k, v in problem.bound.coerce(hparams, problem.hparams)
                               .items() if k in values}}
    return METHODS[method](problem, steps, values, **options)


__all__ = ["hypergrad", "HypergradResult", "ForwardTangent", "TruncatedWindow", "Engine", "run",
           "METHODS", "method_options"]
