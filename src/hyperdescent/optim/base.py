"""Pure, differentiable inner optimizers: `init(params) -> state`, `update(...) -> (params, state)`.

The state is a dict whose "step" entry is a Python int and whose other entries are dicts of
tensors keyed like the parameters (momentum buffers, moments). Every hyperparameter may be a
float, a 0-d tensor, a per-layer dict, or a tensor of the parameter's shape; tensors stay in
the autograd graph so that every hypergradient method can differentiate through `update`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..errors import HyperparameterError

Params = dict[str, torch.Tensor]
State = dict[str, Any]


def tensor_state(state: State) -> dict[str, Params]:
    """The differentiable part of an optimizer state (every entry but the step counter)."""
    return {k: v for k, v in state.items() if isinstance(v, dict)}


def with_tensor_state(state: State, tensors: Mapping[str, Params]) -> State:
    """A copy of `state` whose tensor entries are replaced by `tensors`."""
    out = dict(state)
    out.update(tensors)
    return out


class Optimizer:
    """Base of the differentiable optimizers; subclasses define `defaults`, `init`, `update`."""

    defaults: dict[str, Any] = {}
    #: hyperparameters whose fixed point under IFT does not depend on them the way IFT assumes
    non_stationary: tuple[str, ...] = ("lr",)
    decoupled_weight_decay = False

    def __init__(self, **kwargs):
        if "betas" in kwargs:
            b1, b2 = kwargs.pop("betas")
            kwargs.setdefault("beta1", b1)
            kwargs.setdefault("beta2", b2)
        unknown = set(kwargs) - set(self.defaults)
        if unknown:
            raise HyperparameterError(
                f"{type(self).__name__} got unknown argument(s) {sorted(unknown)}; it takes "
                f"{sorted(self.defaults)}")
        self.fixed = {**self.defaults, **kwargs}

    @property
    def hyperparameter_names(self) -> tuple[str, ...]:
        """Names of hyperparameters that `hp` may override (tensors of `torch.optim` args)."""
        return tuple(k for k, v in self.defaults.items() if not isinstance(v, bool))

    def value(self, hp: Mapping[str, Any] | None, name: str, pname: str):
        """The value of hyperparameter `name` for parameter `pname`: hp overrides fixed."""
        if hp is not None and name in hp:
            v = hp[name]
            return v[pname] if isinstance(v, dict) else v
        return self.fixed[name]

    def tuned(self, hp_names: Iterable[str] | None, name: str) -> bool:
        return hp_names is not None and name in set(hp_names)

    def update_and_tangent(self, params: Params, state: State, grads: Params, hp,
                           dparams: Params, dstate: dict, dgrads: Params, dhp):
        """(new params, new state, d new params, d new state tensors): `update` and the
        optimizer's `tangent` rule; optimizers override it to share primal intermediates."""
        new_params, new_state = self.update(params, state, grads, hp)
        dp, do = self.tangent(params, state, grads, hp, dparams, dstate, dgrads, dhp)
        return new_params, new_state, dp, do

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.fixed.items())
        return f"{type(self).__name__}({args})"


def is_zero(v) -> bool:
    """True for a fixed (non-tensor) value equal to zero, so work can be skipped exactly."""
    return not isinstance(v, torch.Tensor) and v == 0


def lincomb(*terms):
    """sum(c * x) over (c, x) pairs, skipping fixed zero coefficients and multiplying by fixed
    ones for free: tangent rules are sums of such terms, many of them exactly zero, and on
    small tensors every skipped kernel counts. Returns 0.0 when every term is zero."""
    out = None
    for c, x in terms:
        if is_zero(c) or is_zero(x):
            continue
        if isinstance(c, torch.Tensor) or not isinstance(x, torch.Tensor):
            out = c * x if out is None else out + c * x
        elif out is None:
            out = x if c == 1 else x * c
        else:
            out = out.add(x, alpha=c)
    return 0.0 if out is None else out


def tangent_value(dhp: Mapping[str, Any] | None, name: str, pname: str):
    """The tangent of hyperparameter `name` for parameter `pname`; 0.0 where it has none."""
    if dhp is None or name not in dhp:
        return 0.0
    v = dhp[name]
    return v[pname] if isinstance(v, dict) else v


def sqrt_tangent(root: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """d sqrt(x) = dx / (2 sqrt(x)), taken as 0 where sqrt(x) = 0 (a zero second moment)."""
    return torch.where(root > 0, d / (2 * root.clamp_min(1e-300)), torch.zeros_like(d))
