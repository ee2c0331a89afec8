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
from ..validate import check_optimizer_args

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
    #: whether `update` reads the step counter beyond "is this step 0" (Adam's bias correction)
    counts_steps = False

    def __init__(self, **kwargs):
        check_optimizer_args(type(self).__name__, kwargs, self.defaults)
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

    def specialized(self, scalar_hparams: bool, tuned=()) -> Optimizer:
        """A copy with fast kernels chosen for a problem whose tuned hyperparameters `tuned`
        are all one scalar (`scalar_hparams`) or not; optimizers without kernels return self."""
        return self

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


def axpy(y, a, x, scale: float = 1.0):
    """y + scale * a * x as one kernel where possible (`addcmul` for a tensor coefficient,
    `add(alpha=)` for a number), skipping fixed zeros: in an unrolled graph every op is also a
    backward node, and on small tensors the per-op cost dominates."""
    if is_zero(a) or is_zero(x) or scale == 0:
        return y
    if is_zero(y):
        if isinstance(a, torch.Tensor) or not isinstance(x, torch.Tensor):
            return a * x * scale if scale != 1 else a * x
        return x if a * scale == 1 else x * (a * scale)
    if isinstance(a, torch.Tensor) and isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        return torch.addcmul(y, a, x, value=scale)
    if not isinstance(a, torch.Tensor) and isinstance(x, torch.Tensor) and \
            isinstance(y, torch.Tensor):
        return y.add(x, alpha=a * scale)
    return y + a * x * scale


def lincomb(*terms):
    """sum(c * x) over (c, x) pairs with `axpy`; a term whose coefficient is exactly 1 starts
    the sum for free. Returns 0.0 when every term is zero."""
    terms = sorted(terms, key=lambda t: not (not isinstance(t[0], torch.Tensor) and t[0] == 1))
    out = 0.0
    for c, x in terms:
        out = axpy(out, c, x)
    return out


def common_base(tensors: Params, names: list[str] | None = None) -> torch.Tensor | None:
    """The 1-D tensor that the tensors are consecutive, contiguous views of, in order (what
    `unflat` returns), or None."""
    names = list(tensors) if names is None else names
    if isinstance(tensors, FlatViews) and names == list(tensors):
        return tensors.flat
    first = tensors[names[0]]
    base = first._base
    if base is None or base.dim() != 1 or first.storage_offset() != base.storage_offset():
        return None
    offset = base.storage_offset()
    for n in names:
        t = tensors[n]
        if t._base is not base or t.storage_offset() != offset or not t.is_contiguous():
            return None
        offset += t.numel()
    return base if offset - base.storage_offset() == base.numel() else None


def flat_view(tensors: Params, names: list[str]) -> torch.Tensor:
    """The tensors concatenated into one vector: their `common_base` (no copy) or a copy."""
    base = common_base(tensors, names)
    return base if base is not None else torch.cat([tensors[n].reshape(-1) for n in names])


def unflat(vector: torch.Tensor, like: Params) -> Params:
    """Views of `vector` shaped like each tensor of `like`, in order (inverse of flat_view)."""
    parts = vector.split([t.numel() for t in like.values()])
    return {n: part if part.shape == t.shape else part.view(t.shape)
            for (n, t), part in zip(like.items(), parts)}


class FlatViews(dict):
    """`unflat(flat, like)` made on first read. A flat optimizer step returns its weights,
    gradients' and buffers' dicts this way: the next flat step reads the vectors back whole
    (`common_base`, O(1)), so the per-parameter views of gradients and momentum buffers, each
    a split plus reshapes with autograd tracking, are never made. Reads,
    writes and copies all see the views; pickling and copying give a plain dict."""

    __slots__ = ("flat", "_like")

    def __init__(self, flat: torch.Tensor, like: Params):
        super().__init__(dict.fromkeys(like))
        self.flat, self._like = flat, like

    def _fill(self) -> None:
        if self._like is not None:
            like, self._like = self._like, None
            dict.update(self, unflat(self.flat, like))

    def __getitem__(self, key):
        self._fill()
        return dict.__getitem__(self, key)

    def __iter__(self):  # overridden so that dict(x) and {**x} read values through __getitem__
        return dict.__iter__(self)

    def __eq__(self, other):
        self._fill()
        return dict.__eq__(self, other)

    def __ne__(self, other):
        self._fill()
        return dict.__ne__(self, other)

    def __repr__(self):
        self._fill()
        return dict.__repr__(self)

    def __reduce__(self):
        return dict, (dict(self.items()),)

    def copy(self) -> dict:
        return dict(self.items())


def _filled(name: str):
    method = getattr(dict, name)

    def filled(self, *args, **kwargs):
        self._fill()
        return method(self, *args, **kwargs)

    filled.__name__ = name
    filled.__doc__ = method.__doc__
    return filled


for _name in ("get", "values", "items", "pop", "popitem", "setdefault", "update", "clear",
              "__setitem__", "__delitem__", "__or__", "__ior__"):
    setattr(FlatViews, _name, _filled(_name))


def tangent_value(dhp: Mapping[str, Any] | None, name: str, pname: str):
    """The tangent of hyperparameter `name` for parameter `pname`; 0.0 where it has none."""
    if dhp is None or name not in dhp:
        return 0.0
    v = dhp[name]
    return v[pname] if isinstance(v, dict) else v


def sqrt_tangent(root: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """d sqrt(x) = dx / (2 sqrt(x)), taken as 0 where sqrt(x) = 0 (a zero second moment)."""
    return torch.where(root > 0, d / (2 * root.clamp_min(1e-300)), torch.zeros_like(d))
