"""SGD with momentum in int64 fixed point and its exact inverse step.

Maclaurin, Duvenaud & Adams 2015, "Gradient-based hyperparameter optimization through
reversible learning", Sec. 2.3 and Algorithms 1-2, in the form of `torch.optim.SGD`:

    v_{t+1} = μ·v_t + (g(θ_t) + wd·θ_t),     θ_{t+1} = θ_t - lr·v_{t+1}

Weights and velocities are integers times 2^-radix (one radix per tensor). Adding the
gradient term and the lr·v update is exact in integers, and both are recomputed bit for bit
from exactly recovered state in the reverse pass; only the multiplication by μ = n/d loses
information, and those bits go to an information buffer (`hypergrad.coder.RansBuffer`):
the remainder of the division by d is pushed and a digit below n is popped, in one exchange.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import HyperparameterError, NonFiniteError
from ..hypergrad import coder
from ..hypergrad.coder import floordiv

MOMENTUM_DENOM = 1 << 16
INT_LIMIT = 1 << 62  # every stored integer stays below this, so one addition cannot wrap
INT_BITS = 62


class FixedPointOverflowError(NonFiniteError):
    """A value left the int64 fixed-point range of its tensor."""


@dataclass(frozen=True)
class Layout:
    """Names, shapes and sizes of a dict of tensors laid end to end in one flat vector."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    sizes: tuple[int, ...]

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> Layout:
        """The layout of `tensors` in their dict order."""
        return cls(tuple(tensors), tuple(t.shape for t in tensors.values()),
                   tuple(t.numel() for t in tensors.values()))

    @property
    def numel(self) -> int:
        """Elements of all tensors together."""
        return sum(self.sizes)

    def flat(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The tensors concatenated in layout order."""
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a flat vector, one per name, in the tensors' shapes."""
        # one C++ call makes all the views: a few Python-level views per step add up
        return dict(zip(self.names, torch._C._nn.unflatten_dense_tensors(flat, self._like)))

    @property
    def _like(self) -> list[torch.Tensor]:
        like = self.__dict__.get("_like_cache")
        if like is None:  # shapes only: meta tensors hold no memory
            like = [torch.empty(s, device="meta") for s in self.shapes]
            object.__setattr__(self, "_like_cache", like)
        return like

    def lanes(self, per_name: Sequence, dtype, device, graph: bool = False) -> torch.Tensor:
        """Per-tensor values (numbers, 0-d or full tensors) broadcast to one value per element:
        a 0-d tensor when all tensors share one value; graph=True keeps them differentiable."""
        def tensor(v):
            out = torch.as_tensor(v, dtype=dtype, device=device)
            return out if graph else out.detach()

        first = per_name[0]
        if all(v is first for v in per_name) and (not isinstance(first, torch.Tensor)
                                                  or first.dim() == 0):
            return tensor(first)
        return torch.cat([tensor(v).expand(s).reshape(-1) for v, s in zip(per_name,
                                                                          self.shapes)])

    def which(self, bad: torch.Tensor) -> list[str]:
        """Names of the tensors with a True element in the flat mask `bad`."""
        return [n for n, b in zip(self.names, bad.split(self.sizes)) if bool(b.any())]


def radix_for(value_range: float, headroom_bits: int) -> int:
    """Fractional bits for a tensor whose values stay below value_range·2^headroom_bits."""
    if not math.isfinite(value_range) or value_range <= 0:
        raise FixedPointOverflowError(f"a fixed-point range must be finite and > 0, got "
                                      f"{value_range}")
    return INT_BITS - int(headroom_bits) - math.frexp(value_range)[1]


def lane_scales(layout: Layout, radixes: Sequence[int], dtype, device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(2^radix, 2^-radix) per element: exact powers of two in `dtype`."""
    scale = torch.cat([torch.full((k,), math.ldexp(1.0, r), dtype=dtype, device=device)
                       for k, r in zip(layout.sizes, radixes)])
    inv = torch.cat([torch.full((k,), math.ldexp(1.0, -r), dtype=dtype, device=device)
                     for k, r in zip(layout.sizes, radixes)])
    return scale, inv


@dataclass
class FixedPoint:
    """Per-element scales of the weights and the velocities (velocities' set at step 0)."""

    layout: Layout
    theta_radix: list[int]
    theta_scale: torch.Tensor
    theta_inv: torch.Tensor
    v_radix: list[int] | None = None
    v_scale: torch.Tensor | None = None
    v_inv: torch.Tensor | None = None
    v_to_theta: torch.Tensor | None = None  # 2^(weights' radix - velocities' radix)

    @classmethod
    def for_weights(cls, layout: Layout, theta: torch.Tensor, headroom_bits: int,
                    floor: float = 1.0) -> FixedPoint:
        """Weights' radix per tensor from its largest magnitude (at least `floor`)."""
        radixes = [radix_for(max(float(x.abs().max()) if x.numel() else 0.0, floor),
                             headroom_bits) for x in theta.split(layout.sizes)]
        _check_range(theta, "initial weights", layout)
        return cls(layout, radixes, *lane_scales(layout, radixes, theta.dtype, theta.device))

    def set_velocity_range(self, first_direction: torch.Tensor, momentum: torch.Tensor,
                           headroom_bits: int, floor: float = 2.0 ** -20) -> None:
        """Velocities' radix per tensor: |g_0 + wd·θ_0| / (1 - μ) bounds a steady velocity."""
        _check_range(first_direction, "gradient at step 0", self.layout)
        mu = momentum.expand(first_direction.shape) if momentum.dim() == 0 else momentum
        radixes = []
        for d, m in zip(first_direction.split(self.layout.sizes), mu.split(self.layout.sizes)):
            top = float(d.abs().max()) if d.numel() else 0.0
            gain = 1.0 / max(1.0 - float(m.max()), 1.0 / MOMENTUM_DENOM) if m.numel() else 1.0
            radixes.append(radix_for(max(top * gain, floor), headroom_bits))
        self.v_radix = radixes
        self.v_scale, self.v_inv = lane_scales(self.layout, radixes, first_direction.dtype,
                                               first_direction.device)
        self.v_to_theta = lane_scales(self.layout, [a - b for a, b in zip(self.theta_radix,
                                                                           radixes)],
                                      first_direction.dtype, first_direction.device)[0]


def _check_range(x: torch.Tensor, what: str, layout: Layout, t: int | None = None,
                 limit: float = 1.0) -> None:
    bad = ~torch.isfinite(x)
    when = "" if t is None else f" at step {t}"
    if bool(bad.any()):
        raise NonFiniteError(f"{what}{when} is not finite in parameter(s) {layout.which(bad)}")
    if limit != 1.0:
        bad = x.abs() >= limit
        if bool(bad.any()):
            raise FixedPointOverflowError(
                f"{what}{when} overflows the int64 fixed-point range in parameter(s) "
                f"{layout.which(bad)}; raise headroom_bits or lower the learning rate")


def to_fixed(x: torch.Tensor, scale: torch.Tensor, layout: Layout, what: str, t: int | None = None
             ) -> torch.Tensor:
    """x·2^radix rounded toward zero as int64, after checking that x is finite and in range
    (a float cast to int64 out of range gives garbage silently)."""
    return _checked_int(x * scale, layout, what, t)


def _checked_int(y: torch.Tensor, layout: Layout, what: str, t: int | None) -> torch.Tensor:
    lo, hi = torch.aminmax(y)
    # NaN fails the comparisons too, so one reduction covers both checks when all is well
    if not (-INT_LIMIT < float(lo) and float(hi) < INT_LIMIT):
        _check_range(y, what, layout, t)
        _check_range(y, what, layout, t, limit=INT_LIMIT)
    # the cast truncates: any rounding will do, as long as both passes round alike
    return y.to(torch.int64)


def to_float(i: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """The float value i·2^-radix of a fixed-point vector (in inv's dtype)."""
    return i.to(inv.dtype) * inv


def _check_int(i: torch.Tensor, what: str, layout: Layout, t: int) -> torch.Tensor:
    lo, hi = torch.aminmax(i)
    if not (-INT_LIMIT < int(lo) and int(hi) < INT_LIMIT):
        raise FixedPointOverflowError(
            f"{what} at step {t} overflows the int64 fixed-point range in parameter(s) "
            f"{layout.which(i.abs() >= INT_LIMIT)}; raise headroom_bits or lower the "
            f"learning rate")
    return i


def _numpy(v: torch.Tensor, n, fx: FixedPoint) -> bool:
    """Whether the step runs in numpy (`coder.fast`: CPU, a scalar momentum numerator)."""
    return coder.fast(v, n) and fx.v_inv.dtype in (torch.float32, torch.float64)


_MIN, _MAX = np.minimum.reduce, np.maximum.reduce  # the ufuncs, without ndarray.min's wrapper


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy()


def _np_of(fx: FixedPoint, name: str) -> np.ndarray:
    """fx's tensor `name` as a numpy view, kept while fx holds the same tensor."""
    x = getattr(fx, name)
    cache = fx.__dict__.setdefault("_np_cache", {})
    hit = cache.get(name)
    if hit is None or hit[0] is not x:
        hit = cache[name] = (x, _np(x))
    return hit[1]


def _np_checked_int(y: np.ndarray, layout: Layout, what: str, t: int | None) -> np.ndarray:
    """`_checked_int` of a numpy vector: the errors come from the torch check, which names
    the tensors."""
    if not (-INT_LIMIT < _MIN(y) and _MAX(y) < INT_LIMIT):  # NaN fails them too
        _checked_int(torch.from_numpy(y), layout, what, t)
    return y.astype(np.int64)


def _np_check_int(i: np.ndarray, what: str, layout: Layout, t: int,
                  as_float: np.ndarray | None = None) -> None:
    # as_float: i rounded to float, whose range bounds i's (rounding is monotone and 2^62 a
    # float): a cheaper reduction, with the exact one only when it is inconclusive
    if as_float is not None and -INT_LIMIT < _MIN(as_float) and _MAX(as_float) < INT_LIMIT:
        return
    if not (-INT_LIMIT < int(_MIN(i)) and int(_MAX(i)) < INT_LIMIT):
        _check_int(torch.from_numpy(i), what, layout, t)


def _np_update(vf: np.ndarray, scaled_lr, fx: FixedPoint, t: int) -> np.ndarray:
    """`position_update` in numpy from v as float (vf): the same product, the same
    truncation."""
    return _np_checked_int(vf * scaled_lr, fx.layout, "lr·velocity", t)


def quantize_momentum(mu: torch.Tensor | float, denom: int = MOMENTUM_DENOM):
    """μ rounded to n/denom (the value used forward and reported), as (n, n/denom)."""
    n = torch.round(torch.as_tensor(mu, dtype=torch.float64) * denom)
    if bool((n < 1).any()) or bool((n > denom).any()):
        raise HyperparameterError(
            f"momentum must lie in [1/{denom}, 1] for reversible learning (n/{denom} with "
            f"n >= 1), got {torch.as_tensor(mu).flatten()[:4].tolist()}")
    return n.to(torch.int64), n / denom


def mul_momentum(v: torch.Tensor, n, buffer, denom: int = MOMENTUM_DENOM) -> torch.Tensor:
    """v·n/d in integers: push v mod d, divide by d, multiply by n, add a digit popped below n
    (Maclaurin et al. 2015, Sec. 2.3), the push and the pop one fused coder exchange."""
    shift = denom.bit_length() - 1  # denom is a power of two: floor division is a shift
    digit = buffer.exchange(v & (denom - 1), shift, n, check=False)
    if isinstance(n, int):
        return torch.add(digit, v >> shift, alpha=n)
    return torch.addcmul(digit, v >> shift, n)


def div_momentum(v: torch.Tensor, n, buffer, denom: int = MOMENTUM_DENOM) -> torch.Tensor:
    """The exact inverse of `mul_momentum`: push v mod n back, pop the remainder of d."""
    q = floordiv(v, n)
    rest = torch.add(v, q, alpha=-n) if isinstance(n, int) else torch.addcmul(v, q, n, value=-1)
    return torch.add(buffer.unexchange(rest, denom.bit_length() - 1, n, check=False), q,
                     alpha=denom)


def decayed_gradient(grad: torch.Tensor, theta: torch.Tensor, wd) -> torch.Tensor:
    """g + wd·θ (coupled weight decay): the same ops in both passes, so bit-identical."""
    if isinstance(wd, torch.Tensor) and wd.dim() == 0:
        w = float(wd)
        return grad if w == 0 else torch.add(grad, theta, alpha=w)
    return grad + wd * theta


def step(theta: torch.Tensor, v: torch.Tensor, direction: torch.Tensor, lr: torch.Tensor,
         n, fx: FixedPoint, buffer, t: int = 0, denom: int = MOMENTUM_DENOM,
         scaled_lr: torch.Tensor | None = None):
    """(θ_{t+1}, v_{t+1}) in fixed point from (θ_t, v_t) and direction = g(θ_t) + wd·θ_t."""
    if scaled_lr is None:
        scaled_lr = lr * fx.v_to_theta
    if _numpy(v, n, fx):
        shift = denom.bit_length() - 1
        vi = v.numpy()
        w = vi >> shift  # v·n/d as in mul_momentum, in place on fresh arrays
        w *= n
        w += buffer.exchange_numpy(vi & (denom - 1), shift, n)
        w += _np_checked_int(_np(direction) * _np_of(fx, "v_scale"), fx.layout, "gradient", t)
        wf = w.astype(_np_of(fx, "v_inv").dtype)
        _np_check_int(w, "velocity", fx.layout, t, wf)
        theta = theta.numpy() - _np_update(wf, _np(scaled_lr), fx, t)
        _np_check_int(theta, "weights", fx.layout, t)
        return torch.from_numpy(theta), torch.from_numpy(w)
    v = mul_momentum(v, n, buffer, denom) + to_fixed(direction, fx.v_scale, fx.layout,
                                                     "gradient", t)
    v = _check_int(v, "velocity", fx.layout, t)
    return _check_int(theta - position_update(v, lr, fx, t, scaled_lr), "weights", fx.layout,
                      t), v


def position_update(v: torch.Tensor, lr: torch.Tensor, fx: FixedPoint, t: int = 0,
                    scaled_lr: torch.Tensor | None = None) -> torch.Tensor:
    """lr·v in the weights' fixed point: v's float times lr·2^(radix_θ - radix_v), which
    rounds once, like lr·(v·2^-radix_v) scaled by 2^radix_θ (powers of two are exact);
    scaled_lr: that factor, when the caller keeps it across steps."""
    if scaled_lr is None:
        scaled_lr = lr * fx.v_to_theta
    return _checked_int(v.to(fx.v_inv.dtype) * scaled_lr, fx.layout, "lr·velocity", t)


def unstep_position(theta: torch.Tensor, v: torch.Tensor, lr: torch.Tensor, fx: FixedPoint,
                    t: int = 0, scaled_lr: torch.Tensor | None = None) -> torch.Tensor:
    """θ_t = θ_{t+1} + lr·v_{t+1}, exactly (the same rounded update the forward step took)."""
    return unstep_position_velocity(theta, v, lr, fx, t, scaled_lr)[0]


def unstep_position_velocity(theta: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
                             fx: FixedPoint, t: int = 0,
                             scaled_lr: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(θ_t, the float v_{t+1}): `unstep_position` and `to_float(v, fx.v_inv)` from one cast
    of v."""
    if scaled_lr is None:
        scaled_lr = lr * fx.v_to_theta
    if _numpy(v, 1, fx):
        vf = v.numpy().astype(_np_of(fx, "v_inv").dtype)
        theta = theta.numpy() + _np_update(vf, _np(scaled_lr), fx, t)
        vf *= _np_of(fx, "v_inv")
        return torch.from_numpy(theta), torch.from_numpy(vf)
    return theta + position_update(v, lr, fx, t, scaled_lr), to_float(v, fx.v_inv)


def unstep_velocity(v: torch.Tensor, direction: torch.Tensor, n, fx: FixedPoint, buffer,
                    t: int = 0, denom: int = MOMENTUM_DENOM) -> torch.Tensor:
    """v_t = (v_{t+1} - (g(θ_t) + wd·θ_t)) / μ, exactly, with the bits from the buffer."""
    if _numpy(v, n, fx):
        w = v.numpy() - _np_checked_int(_np(direction) * _np_of(fx, "v_scale"), fx.layout,
                                        "gradient", t)
        q = np.floor_divide(w, n)  # div_momentum's arithmetic
        w -= q * n
        q *= denom
        q += buffer.unexchange_numpy(w, denom.bit_length() - 1, n)
        return torch.from_numpy(q)
    v = v - to_fixed(direction, fx.v_scale, fx.layout, "gradient", t)
    return div_momentum(v, n, buffer, denom)


@dataclass
class ReversibleSGD:
    """SGD with momentum in int64 fixed point with an exact inverse step (Maclaurin, Duvenaud &
    Adams 2015, Algorithms 1-2): `step` loses bits only to `buffer`, `unstep_position` and
    `unstep_velocity` take them back, with the gradient recomputed between the two."""

    fx: FixedPoint
    denom: int = MOMENTUM_DENOM
    headroom_bits: int = 10
    _lr: tuple | None = None

    @classmethod
    def for_weights(cls, layout: Layout, theta0: torch.Tensor, headroom_bits: int = 10,
                    denom: int = MOMENTUM_DENOM) -> ReversibleSGD:
        """The optimizer for float weights theta0 (flat, in `layout` order)."""
        return cls(FixedPoint.for_weights(layout, theta0, headroom_bits), denom, headroom_bits)

    def start(self, theta0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(θ_0, v_0 = 0) in fixed point."""
        theta = to_fixed(theta0, self.fx.theta_scale, self.fx.layout, "initial weights")
        return theta, torch.zeros_like(theta)

    def weights(self, theta: torch.Tensor) -> torch.Tensor:
        """The float weights a fixed-point θ stands for (what the gradient is taken at)."""
        return to_float(theta, self.fx.theta_inv)

    def velocity(self, v: torch.Tensor) -> torch.Tensor:
        """The float velocity a fixed-point v stands for."""
        return to_float(v, self.fx.v_inv)

    def step(self, theta: torch.Tensor, v: torch.Tensor, direction: torch.Tensor,
             lr: torch.Tensor, n, mu: torch.Tensor, buffer, t: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(θ_{t+1}, v_{t+1}) from direction = g(θ_t) + wd·θ_t; the first call sets the
        velocities' radix from the first direction and the momentum mu."""
        if self.fx.v_scale is None:
            self.fx.set_velocity_range(direction, mu, self.headroom_bits)
        return step(theta, v, direction, lr, n, self.fx, buffer, t, self.denom,
                    self._scaled(lr))

    def _scaled(self, lr: torch.Tensor) -> torch.Tensor:
        # lr·2^(radix_θ - radix_v), kept while the caller passes the same lr tensor
        if self._lr is None or self._lr[0] is not lr:
            self._lr = (lr, lr * self.fx.v_to_theta)
        return self._lr[1]

    def unstep_position(self, theta: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
                        t: int = 0) -> torch.Tensor:
        """θ_t from θ_{t+1} and v_{t+1}, exactly."""
        return unstep_position(theta, v, lr, self.fx, t, self._scaled(lr))

    def unstep_position_velocity(self, theta: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
                                 t: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(θ_t, the float v_{t+1}) from θ_{t+1} and v_{t+1}, θ_t exactly."""
        return unstep_position_velocity(theta, v, lr, self.fx, t, self._scaled(lr))

    def unstep_velocity(self, v: torch.Tensor, direction: torch.Tensor, n, buffer, t: int = 0
                        ) -> torch.Tensor:
        """v_t from v_{t+1} and direction = g(θ_t) + wd·θ_t, exactly."""
        return unstep_velocity(v, direction, n, self.fx, buffer, t, self.denom)
