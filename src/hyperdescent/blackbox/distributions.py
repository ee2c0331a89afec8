"""Map an `hd.Space` to Optuna distributions (one flat dimension per scalar value) and back.

Naming of the flat dimensions (what Optuna sees as parameter names):

- a global hyperparameter: ``"lr"``;
- a ``Piecewise(K)`` schedule: K dimensions ``"lr[0]" .. "lr[K-1]"``;
- ``per="layer"``: one dimension per model parameter tensor, ``"weight_decay/fc.weight"``
  (and ``"weight_decay/fc.weight[k]"`` under a schedule);
- ``Int`` and ``Categorical``: ``"width"``.

`assemble` turns such a flat dict back into values in the API shapes: a float for a global
Real, a list of K floats for a schedule, a dict from parameter name to float (or list) for
``per="layer"``, an int for ``Int`` and the chosen object for ``Categorical``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from ..errors import HyperparameterError
from ..space import BoundSpace, Categorical, Int, Real, Space

# Optuna stores categorical choices in its storage; only these types survive the round trip.
_PLAIN = (type(None), bool, int, float, str)
# GridSampler materialises the whole Cartesian product; refuse grids that would not fit.
MAX_GRID_SIZE = 1_000_000


def bind_space(space: Space | BoundSpace,
               model: torch.nn.Module | Mapping[str, Sequence[int]] | None = None) -> BoundSpace:
    """Bind `space` to `model`'s parameter names (needed for per='layer'), checking black-box use."""
    if isinstance(space, BoundSpace):
        bound = space
        if model is not None and bound.shapes is None:
            bound = bound.space.bind(model)
    elif isinstance(space, Space):
        _refuse_per_parameter(space)
        needs_model = [n for n, h in space.items() if h.per != "global"]
        if needs_model and model is None:
            raise HyperparameterError(
                f"hyperparameter(s) {needs_model} have per='layer', which needs the model's "
                f"parameter names: pass model=... (a torch.nn.Module or a dict name -> shape)")
        bound = space.bind(model)
    else:
        raise HyperparameterError(
            f"space must be an hd.Space (or a BoundSpace from Space.bind), got "
            f"{type(space).__name__}")
    _refuse_per_parameter(bound.space)
    return bound


def _refuse_per_parameter(space: Space) -> None:
    for name, hp in space.items():
        if hp.per == "parameter":
            raise HyperparameterError(
                f"hyperparameter {name!r} has per='parameter' (one value per weight element): "
                f"far too many dimensions for black-box search; use per='layer' or 'global', "
                f"or a gradient method (hd.hypergrad / hd.OnlineTuner)")


def _real_dims(name: str, hp: Real, bound: BoundSpace) -> list[str]:
    """Flat dimension names of one Real (per-layer and schedule expansion)."""
    heads = [name] if hp.per == "global" else [f"{name}/{p}" for p in bound.shapes]
    if hp.schedule is None:
        return heads
    return [f"{h}[{k}]" for h in heads for k in range(hp.K)]


def _real_distribution(name: str, hp: Real) -> FloatDistribution:
    if not (math.isfinite(hp.low) and math.isfinite(hp.high)):
        raise HyperparameterError(
            f"hyperparameter {name!r} has an infinite bound [low={hp.low}, high={hp.high}]; "
            f"black-box search needs a finite range: give both low= and high=")
    return FloatDistribution(hp.low, hp.high, log=hp.log)


def _categorical_choices(hp: Categorical) -> list:
    """Choices as Optuna stores them: the choices themselves, or their indices if not plain."""
    if all(isinstance(c, _PLAIN) for c in hp.choices):
        return list(hp.choices)
    return list(range(len(hp.choices)))


def space_to_distributions(space: Space | BoundSpace,
                           model: torch.nn.Module | Mapping[str, Sequence[int]] | None = None,
                           ) -> dict[str, BaseDistribution]:
    """Optuna distributions, one per flat dimension, for `space` (log Reals -> log-uniform)."""
    bound = bind_space(space, model)
    out: dict[str, BaseDistribution] = {}
    for name, hp in bound.space.items():
        if isinstance(hp, Real):
            dist = _real_distribution(name, hp)
            for dim in _real_dims(name, hp, bound):
                out[dim] = dist
        elif isinstance(hp, Int):
            if hp.log and hp.low < 1:
                raise HyperparameterError(
                    f"hyperparameter {name!r} is Int(log=True) with low={hp.low}; needs low >= 1")
            out[name] = IntDistribution(hp.low, hp.high, log=hp.log)
        elif isinstance(hp, Categorical):
            out[name] = CategoricalDistribution(_categorical_choices(hp))
        else:
            raise HyperparameterError(
                f"hyperparameter {name!r} has an unsupported kind {type(hp).__name__}")
    return out


def assemble(flat_params: Mapping[str, Any], space: Space | BoundSpace,
             model: torch.nn.Module | Mapping[str, Sequence[int]] | None = None) -> dict:
    """Values in the API shapes (float / list of K / dict per layer) from flat Optuna params."""
    bound = bind_space(space, model)
    missing = [d for d in space_to_distributions(bound) if d not in flat_params]
    if missing:
        raise HyperparameterError(
            f"assemble got no value for dimension(s) {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}")
    out: dict[str, Any] = {}
    for name, hp in bound.space.items():
        if isinstance(hp, Real):
            def leaf(head: str, hp=hp) -> float | list[float]:
                if hp.schedule is None:
                    return float(flat_params[head])
                return [float(flat_params[f"{head}[{k}]"]) for k in range(hp.K)]
            if hp.per == "global":
                out[name] = leaf(name)
            else:
                out[name] = {p: leaf(f"{name}/{p}") for p in bound.shapes}
        elif isinstance(hp, Int):
            out[name] = int(flat_params[name])
        else:
            v = flat_params[name]
            plain = all(isinstance(c, _PLAIN) for c in hp.choices)
            out[name] = v if plain else hp.choices[int(v)]
    return out


def flatten_values(values: Mapping[str, Any], space: Space | BoundSpace,
                   model: torch.nn.Module | Mapping[str, Sequence[int]] | None = None
                   ) -> dict[str, Any]:
    """Inverse of `assemble`: flat Optuna params from values in the API shapes."""
    bound = bind_space(space, model)
    out: dict[str, Any] = {}
    for name, v in values.items():
        hp = bound.space[name]
        if isinstance(hp, Real):
            heads = {name: v} if hp.per == "global" else {
                f"{name}/{p}": (v[p] if isinstance(v, Mapping) else v) for p in bound.shapes}
            for head, x in heads.items():
                if hp.schedule is None:
                    out[head] = float(torch.as_tensor(x).reshape(()).item())
                else:
                    xs = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
                    if xs.numel() == 1:
                        xs = xs.expand(hp.K)
                    for k in range(hp.K):
                        out[f"{head}[{k}]"] = float(xs[k])
        elif isinstance(hp, Int):
            out[name] = int(v)
        else:
            plain = all(isinstance(c, _PLAIN) for c in hp.choices)
            out[name] = v if plain else hp.choices.index(v)
    return out


def initial_params(space: Space | BoundSpace,
                   model: torch.nn.Module | Mapping[str, Sequence[int]] | None = None
                   ) -> dict[str, Any]:
    """The space's initial values as flat Optuna params (for `study.enqueue_trial`)."""
    bound = bind_space(space, model)
    return flatten_values({n: h.init for n, h in bound.space.items()}, bound)


def _grid_values(dist: BaseDistribution, points: int) -> list:
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    lo, hi = dist.low, dist.high
    if isinstance(dist, IntDistribution):
        if hi - lo + 1 <= points:
            return list(range(lo, hi + 1))
        raw = np.geomspace(lo, hi, points) if dist.log else np.linspace(lo, hi, points)
        return sorted({int(min(hi, max(lo, round(x)))) for x in raw})
    if points == 1:
        return [float(math.sqrt(lo * hi)) if dist.log else float((lo + hi) / 2)]
    raw = np.geomspace(lo, hi, points) if dist.log else np.linspace(lo, hi, points)
    vals = [float(min(hi, max(lo, x))) for x in raw]
    vals[0], vals[-1] = float(lo), float(hi)  # exact end points despite float error
    return vals


def grid_search_space(space: Space | BoundSpace,
                      model: torch.nn.Module | Mapping[str, Sequence[int]] | None = None,
                      grid_points: int = 5) -> dict[str, list]:
    """Grid for Optuna's GridSampler: `grid_points` per real/int dimension (log-spaced if log)."""
    if not isinstance(grid_points, int) or grid_points < 1:
        raise HyperparameterError(f"grid_points must be an integer >= 1, got {grid_points!r}")
    dists = space_to_distributions(space, model)
    grid = {dim: _grid_values(d, grid_points) for dim, d in dists.items()}
    size = math.prod(len(v) for v in grid.values())
    if size > MAX_GRID_SIZE:
        raise HyperparameterError(
            f"the grid has {size:.3g} points ({len(grid)} dimensions x up to {grid_points} "
            f"points each), more than {MAX_GRID_SIZE:,}; lower grid_points, use per='global', "
            f"or use sampler='random'/'tpe'")
    return grid
