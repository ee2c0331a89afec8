"""Hyperparameter declarations, raw <-> natural transforms, sharing (`per=`) and schedules.

This layer knows nothing of models: `Space.bind` takes the model's parameter names and
shapes and returns a `BoundSpace` that knows every value's shape.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import HyperparameterError, HyperparameterTypeError
from .validate import integer, number

_PER = ("global", "layer", "parameter")
# Values at a bound of a logit transform would need an infinite raw coordinate; keep them
# this close to the bound instead so raw stays finite and gradients stay defined.
_EDGE = 1e-12


@dataclass(frozen=True)
class Piecewise:
    """A schedule of K values, each shared by a contiguous block of steps (Micaelli & Storkey 2021, hyperparameter sharing)."""

    K: int

    def __post_init__(self):
        if isinstance(self.K, bool) or not isinstance(self.K, int) or self.K < 1:
            raise HyperparameterError(f"Piecewise(K) needs an integer K >= 1, got K={self.K!r}")

    def block(self, t: int, horizon: int) -> int:
        """Block used by step t (0-based) of a run of `horizon` steps: floor(t*K/T)."""
        if horizon < 1:
            raise HyperparameterError(f"a schedule needs a horizon >= 1 step, got {horizon}")
        return min(self.K - 1, (max(t, 0) * self.K) // horizon)


class Hyperparameter:
    """Base class of every hyperparameter declaration."""

    differentiable = False
    name: str = "?"


class Real(Hyperparameter):
    """A real hyperparameter with a transform to an unconstrained raw coordinate.

    `log=True`: raw = log(value); finite `low` and `high`: raw = logit of the rescaled value;
    one finite bound: softplus away from it; no bounds: identity. Values never leave [low, high].
    """

    differentiable = True

    def __init__(self, init: float, low: float = -math.inf, high: float = math.inf,
                 log: bool = False, per: str = "global", schedule: Piecewise | None = None):
        self.init = number("Real's initial value", init, HyperparameterError)
        self.low = number("Real's low", low, HyperparameterError, finite=False)
        self.high = number("Real's high", high, HyperparameterError, finite=False)
        if not isinstance(log, bool):
            raise HyperparameterTypeError(f"Real's log must be True or False, got {log!r}")
        self.log = log
        self.per = per
        self.schedule = schedule
        if not isinstance(per, str) or per not in _PER:
            raise HyperparameterError(f"per={per!r} is not one of {_PER}")
        if schedule is not None and not isinstance(schedule, Piecewise):
            raise HyperparameterError(f"schedule must be hd.Piecewise(K), got {schedule!r}")
        if not self.low < self.high:
            raise HyperparameterError(f"Real needs low < high, got low={low}, high={high}")
        if self.log and self.low <= 0:
            raise HyperparameterError(
                f"log=True needs low > 0 (got low={low}); give a positive lower bound")
        if not self.low <= self.init <= self.high:
            raise HyperparameterError(
                f"initial value {init} is outside [low={low}, high={high}]")

    @property
    def K(self) -> int:
        return 1 if self.schedule is None else self.schedule.K

    @property
    def transform(self) -> str:
        if self.log:
            return "log"
        lo, hi = math.isfinite(self.low), math.isfinite(self.high)
        if lo and hi:
            return "logit"
        if lo:
            return "softplus_low"
        if hi:
            return "softplus_high"
        return "identity"

    def to_natural(self, raw: torch.Tensor) -> torch.Tensor:
        """Natural value of a raw coordinate (differentiable, always inside [low, high])."""
        kind = self.transform
        if kind == "log":
            lo = math.log(self.low)
            hi = math.log(self.high) if math.isfinite(self.high) else math.inf
            value = torch.exp(raw.clamp(lo, hi))
        elif kind == "logit":
            value = self.low + (self.high - self.low) * torch.sigmoid(raw)
        elif kind == "softplus_low":
            value = self.low + torch.nn.functional.softplus(raw)
        elif kind == "softplus_high":
            value = self.high - torch.nn.functional.softplus(raw)
        else:
            return raw
        # rounding in exp/sigmoid can land one ulp outside; the bounds are a promise
        return value.clamp(self.low, self.high)

    def to_raw(self, value: torch.Tensor) -> torch.Tensor:
        """Raw coordinate of a natural value (inverse of `to_natural`)."""
        value = torch.as_tensor(value)
        kind = self.transform
        if kind == "log":
            return torch.log(value)
        if kind == "logit":
            u = ((value - self.low) / (self.high - self.low)).clamp(_EDGE, 1 - _EDGE)
            return torch.log(u) - torch.log1p(-u)
        if kind in ("softplus_low", "softplus_high"):
            d = (value - self.low) if kind == "softplus_low" else (self.high - value)
            d = d.clamp_min(_EDGE)
            # inverse softplus, stable for large d
            return d + torch.log(-torch.expm1(-d))
        return value.clone()

    def dnatural_draw(self, raw: torch.Tensor) -> torch.Tensor:
        """d natural / d raw in closed form (0 where a log value is clamped at a bound)."""
        kind = self.transform
        if kind == "log":
            lo = math.log(self.low)
            hi = math.log(self.high) if math.isfinite(self.high) else math.inf
            inside = (raw >= lo) & (raw <= hi)
            return torch.where(inside, torch.exp(raw.clamp(lo, hi)), torch.zeros_like(raw))
        if kind == "logit":
            s = torch.sigmoid(raw)
            return (self.high - self.low) * s * (1 - s)
        if kind == "softplus_low":
            return torch.sigmoid(raw)
        if kind == "softplus_high":
            return -torch.sigmoid(raw)
        return torch.ones_like(raw)

    def project_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """Clamp a raw coordinate to the range whose natural values lie inside the bounds."""
        if self.transform == "log":
            hi = math.log(self.high) if math.isfinite(self.high) else math.inf
            return raw.clamp(math.log(self.low), hi)
        return raw

    def __repr__(self):
        return (f"Real({self.init}, low={self.low}, high={self.high}, log={self.log}, "
                f"per={self.per!r}, schedule={self.schedule!r})")


class Int(Hyperparameter):
    """An integer hyperparameter, for black-box search only."""

    def __init__(self, init: int, low: int, high: int, log: bool = False):
        self.init = integer("Int's initial value", init, error=HyperparameterError)
        self.low = integer("Int's low", low, error=HyperparameterError)
        self.high = integer("Int's high", high, error=HyperparameterError)
        if not isinstance(log, bool):
            raise HyperparameterTypeError(f"Int's log must be True or False, got {log!r}")
        self.log = log
        self.per, self.schedule = "global", None
        if self.log and self.low <= 0:
            raise HyperparameterError(f"Int with log=True needs low >= 1, got low={low}")
        if not self.low <= self.init <= self.high:
            raise HyperparameterError(f"Int initial value {init} is outside [{low}, {high}]")

    def __repr__(self):
        return f"Int({self.init}, low={self.low}, high={self.high}, log={self.log})"


class Categorical(Hyperparameter):
    """A categorical hyperparameter, for black-box search only."""

    def __init__(self, choices: Sequence[Any], init: Any = None):
        if isinstance(choices, (str, bytes)) or not isinstance(choices, (Sequence, set,
                                                                          frozenset)):
            raise HyperparameterTypeError(
                f"Categorical needs a list of choices, e.g. ['sgd', 'adam'], got {choices!r}")
        self.choices = list(choices)
        if not self.choices:
            raise HyperparameterError("Categorical needs at least one choice")
        self.init = self.choices[0] if init is None else init
        self.per, self.schedule = "global", None
        if self.init not in self.choices:
            raise HyperparameterError(f"Categorical init {init!r} is not one of {self.choices}")

    def __repr__(self):
        return f"Categorical({self.choices!r}, init={self.init!r})"


class Space(Mapping):
    """A named set of hyperparameter declarations ."""

    def __init__(self, hparams: Mapping[str, Hyperparameter]):
        if not isinstance(hparams, Mapping):
            raise HyperparameterTypeError(
                f"hd.Space takes a dict from name to declaration, e.g. "
                f"{{'lr': hd.Real(0.1, low=1e-4, high=1.0, log=True)}}, got "
                f"{type(hparams).__name__}")
        self._hp: dict[str, Hyperparameter] = {}
        for name, hp in hparams.items():
            if not isinstance(name, str) or not name or "/" in name:
                # "/" separates a name from a parameter name in flattened leaves
                raise HyperparameterError(
                    f"hyperparameter names must be non-empty strings without '/', got {name!r}")
            if not isinstance(hp, Hyperparameter):
                raise HyperparameterError(
                    f"hyperparameter {name!r} must be hd.Real, hd.Int or hd.Categorical, "
                    f"got {type(hp).__name__}")
            self._hp[name] = hp

    def __getitem__(self, name: str) -> Hyperparameter:
        if name not in self._hp:
            raise HyperparameterError(
                f"unknown hyperparameter {name!r}; this space has {sorted(self._hp)}")
        return self._hp[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._hp)

    def __len__(self) -> int:
        return len(self._hp)

    def __repr__(self):
        return f"Space({self._hp!r})"

    def require_differentiable(self, method: str) -> None:
        """Refuse Int/Categorical hyperparameters for a gradient method, naming them."""
        bad = [n for n, h in self._hp.items() if not h.differentiable]
        if bad:
            raise HyperparameterError(
                f"hyperparameter(s) {bad} are Int/Categorical and cannot be given to the "
                f"gradient method {method!r}; tune them with hd.blackbox.search, or declare "
                f"them hd.Real")

    def bind(self, model_or_shapes: torch.nn.Module | Mapping[str, Sequence[int]] | None = None
             ) -> BoundSpace:
        """Bind to a model's parameter names and shapes (needed for per='layer'/'parameter')."""
        if isinstance(model_or_shapes, torch.nn.Module):
            shapes = {n: tuple(p.shape) for n, p in model_or_shapes.named_parameters()}
        elif model_or_shapes is None:
            shapes = None
        else:
            shapes = {n: tuple(s) for n, s in model_or_shapes.items()}
        return BoundSpace(self, shapes)


class BoundSpace:
    """A space bound to parameter shapes: knows the shape of every value, converts, validates."""

    def __init__(self, space: Space, shapes: Mapping[str, tuple] | None):
        self.space = space
        self.shapes = dict(shapes) if shapes is not None else None
        for name, hp in space.items():
            if hp.per != "global" and self.shapes is None:
                raise HyperparameterError(
                    f"hyperparameter {name!r} has per={hp.per!r}, which needs a model: pass the "
                    f"model (or its parameter shapes) to Space.bind / hd.Problem")

    def names(self) -> list[str]:
        return list(self.space)

    def real_names(self) -> list[str]:
        return [n for n, h in self.space.items() if h.differentiable]

    # -- shapes -------------------------------------------------------------------------
    def leaf_shape(self, name: str, pname: str | None = None) -> tuple:
        """Shape of one stored tensor: () or (K,) plus the parameter shape for per='parameter'."""
        hp = self.space[name]
        lead = () if hp.schedule is None else (hp.K,)
        if hp.per == "parameter":
            return lead + tuple(self.shapes[pname])
        return lead

    def _map(self, values: Mapping[str, Any], fn) -> dict:
        out = {}
        for name, v in values.items():
            hp = self.space[name]
            out[name] = {p: fn(hp, x) for p, x in v.items()} if isinstance(v, dict) else fn(hp, v)
        return out

    # -- construction and conversion ---------------------------------------------------
    def initial(self, dtype=torch.float64, device=None) -> dict:
        """Initial natural values, in the value shapes of `hd.Space`."""
        out = {}
        for name, hp in self.space.items():
            if not hp.differentiable:
                out[name] = hp.init
                continue
            if hp.per == "global":
                out[name] = torch.full(self.leaf_shape(name), hp.init, dtype=dtype, device=device)
            else:
                out[name] = {p: torch.full(self.leaf_shape(name, p), hp.init, dtype=dtype,
                                           device=device) for p in self.shapes}
        return out

    def to_natural(self, raw: Mapping[str, Any]) -> dict:
        """Natural values of raw coordinates (same structure)."""
        return self._map(raw, lambda hp, x: hp.to_natural(x) if hp.differentiable else x)

    def to_raw(self, natural: Mapping[str, Any]) -> dict:
        """Raw coordinates of natural values (same structure)."""
        return self._map(natural, lambda hp, x: hp.to_raw(x) if hp.differentiable else x)

    def project_raw(self, raw: Mapping[str, Any]) -> dict:
        """Clamp raw coordinates so that their natural values stay inside the bounds."""
        return self._map(raw, lambda hp, x: hp.project_raw(x) if hp.differentiable else x)

    def dnatural_draw(self, raw: Mapping[str, Any]) -> dict:
        """Elementwise derivative d natural / d raw (the chain factor for `raw_grad`)."""
        return self._map({n: v for n, v in raw.items() if self.space[n].differentiable},
                         lambda hp, x: hp.dnatural_draw(x))

    # -- validation ----------------------------------------------------------------------
    def coerce(self, values: Mapping[str, Any], like: Mapping[str, Any]) -> dict:
        """Check names, shapes and bounds of user-given natural values; return tensors.

        `like` gives the dtype/device/shape structure (usually the current values).
        """
        if not isinstance(values, Mapping):
            raise HyperparameterTypeError(
                f"hyperparameter values must be a dict from name to value, got "
                f"{type(values).__name__}")
        out = {}
        for name, v in values.items():
            hp = self.space[name]  # raises on an unknown name
            ref = like[name]
            if not hp.differentiable:
                self._check_blackbox_value(name, hp, v)
                out[name] = v
                continue
            if isinstance(ref, dict):
                if not isinstance(v, Mapping):
                    v = {p: v for p in ref}
                unknown = set(v) - set(ref)
                if unknown:
                    raise HyperparameterError(
                        f"hyperparameter {name!r} got unknown parameter name(s) "
                        f"{sorted(unknown)}; the model has {sorted(ref)}")
                out[name] = {p: self._coerce_leaf(name, hp, v.get(p, ref[p]), ref[p]) for p in ref}
            else:
                if isinstance(v, Mapping):
                    raise HyperparameterError(
                        f"hyperparameter {name!r} is per='global'; give one value, not a dict")
                out[name] = self._coerce_leaf(name, hp, v, ref)
        return out

    @staticmethod
    def _coerce_leaf(name: str, hp: Real, v: Any, ref: torch.Tensor) -> torch.Tensor:
        if isinstance(v, (bool, str, bytes)) or v is None:
            raise HyperparameterTypeError(
                f"hyperparameter {name!r} needs a number or a tensor, got {v!r}")
        try:
            t = torch.as_tensor(v, dtype=ref.dtype, device=ref.device).detach()
        except (TypeError, ValueError, RuntimeError) as e:
            raise HyperparameterTypeError(
                f"hyperparameter {name!r} needs a number or a tensor, got "
                f"{type(v).__name__} {v!r} ({e})") from None
        if t.shape != ref.shape:
            try:
                t = t.expand(ref.shape).clone()
            except RuntimeError:
                raise HyperparameterError(
                    f"hyperparameter {name!r} got a value of shape {tuple(t.shape)}; expected "
                    f"{tuple(ref.shape)} (or a scalar)") from None
        if not torch.isfinite(t).all():
            raise HyperparameterError(f"hyperparameter {name!r} got a non-finite value")
        if (t < hp.low).any() or (t > hp.high).any():
            raise HyperparameterError(
                f"hyperparameter {name!r} = {t.min().item():.6g}..{t.max().item():.6g} is outside "
                f"its bounds [low={hp.low:g}, high={hp.high:g}]")
        return t

    @staticmethod
    def _check_blackbox_value(name, hp, v):
        if isinstance(hp, Categorical) and v not in hp.choices:
            raise HyperparameterError(
                f"hyperparameter {name!r} = {v!r} is not one of {hp.choices}")
        if isinstance(hp, Int) and not (hp.low <= integer(f"hyperparameter {name!r}", v,
                                                         error=HyperparameterError) <= hp.high):
            raise HyperparameterError(
                f"hyperparameter {name!r} = {v} is outside its bounds [{hp.low}, {hp.high}]")

    # -- steps ---------------------------------------------------------------------------
    def at_step(self, values: Mapping[str, Any], t: int, horizon: int) -> dict:
        """The values step t uses: a scheduled hyperparameter's block floor(t*K/T)."""
        out = {}
        for name, v in values.items():
            hp = self.space[name]
            if hp.schedule is None:
                out[name] = v
            else:
                k = hp.schedule.block(t, horizon)
                out[name] = {p: x[k] for p, x in v.items()} if isinstance(v, dict) else v[k]
        return out


def flatten(values: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Flatten a value dict to leaves: 'name' for global, 'name/param' for per-layer/parameter."""
    out = {}
    for name, v in values.items():
        if isinstance(v, dict):
            for p, x in v.items():
                out[f"{name}/{p}"] = x
        elif isinstance(v, torch.Tensor):
            out[name] = v
    return out


def unflatten(leaves: Mapping[str, torch.Tensor], like: Mapping[str, Any]) -> dict:
    """Inverse of `flatten`, with the structure of `like`."""
    out = {}
    for name, v in like.items():
        if isinstance(v, dict):
            out[name] = {p: leaves[f"{name}/{p}"] for p in v}
        elif isinstance(v, torch.Tensor):
            out[name] = leaves[name]
    return out
