"""The meta-optimizer every tuner shares: steps raw (unconstrained) hyperparameter coordinates.

A tuner hands it hypergradients with respect to raw coordinates; it clips their joint norm,
takes an Adam (Kingma & Ba 2015), SGD or sign step (signSGD, Bernstein et al. 2018), a
"normalized" momentum step (Cutkosky & Mehta 2020), or the "fds" step of Micaelli & Storkey 2021
(sign times a per-element step size halved on sign flips), and projects the result back inside
the bounds. It steps any dict of tensors, so an STN's perturbation scales fit beside the
hyperparameters themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from ..errors import HyperparameterError

KINDS = ("adam", "sgd", "sign", "normalized", "fds")

Leaves = dict[str, torch.Tensor]


class MetaOptimizer:
    """Gradient steps on raw coordinates: norm clipping, then adam/sgd/sign/normalized/fds, then
    projection (kind "fds" takes its coordinates as given: the offline tuner hands it natural
    values; kind "normalized" takes betas[0] as its momentum)."""

    def __init__(self, raw: Mapping[str, torch.Tensor], kind: str = "adam",
                 lr: float | Mapping[str, float] = 0.03, clip: float | None = None,
                 project: Callable[[Leaves], Leaves] | None = None, step_decay: float = 0.5,
                 betas: tuple[float, float] = (0.9, 0.999)):
        if kind not in KINDS:
            raise HyperparameterError(f"meta_optimizer={kind!r} is not one of {KINDS}")
        if kind == "fds":  # lr: the initial step sizes, one float or one per leaf
            sizes = {k: float(lr[k]) if isinstance(lr, Mapping) else float(lr) for k in raw}
            for v in sizes.values():
                check_meta_lr(v)
            self._sign_rule = HalvingSign({k: torch.full_like(v, sizes[k]) for k, v in raw.items()},
                                          step_decay)
            lr = 1.0  # the step sizes live in the rule; set_lr scales them
        check_meta_lr(lr)
        if clip is not None and not (isinstance(clip, (int, float)) and clip > 0):
            raise HyperparameterError(f"clip must be a positive number or None, got {clip!r}")
        self.raw: Leaves = {k: v.detach().clone().requires_grad_(True) for k, v in raw.items()}
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                for b in betas)):
            raise HyperparameterError(f"meta_betas must be two numbers in [0, 1), got {betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.kind, self.lr, self.clip, self.project = kind, float(lr), clip, project
        if kind == "normalized":
            self._momentum = NormalizedMomentum(self.raw, self.betas[0])
        self._opt = self._make(self.lr)

    def _make(self, lr: float) -> torch.optim.Optimizer | None:
        if self.kind in ("fds", "normalized"):
            return None
        params = list(self.raw.values())
        if self.kind == "adam":
            # the fused kernel skips most of torch.optim's per-step Python, which dominates
            # a meta-step over a handful of scalars
            try:
                return torch.optim.Adam(params, lr=lr, betas=self.betas, fused=True)
            except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
                return torch.optim.Adam(params, lr=lr, betas=self.betas)
        return torch.optim.SGD(params, lr=lr)

    def values(self) -> Leaves:
        """The current raw coordinates (detached)."""
        return {k: v.detach() for k, v in self.raw.items()}

    def step(self, raw_grads: Mapping[str, torch.Tensor]) -> dict:
        """One meta-step along -raw_grads; skipped (and said so) when they are not finite.
        Returns {"hypergrad_norm": the norm before clipping, "skipped": bool}."""
        norm = math.sqrt(sum(float((g * g).sum()) for g in raw_grads.values()))
        if not math.isfinite(norm):
            return {"hypergrad_norm": norm, "skipped": True}
        scale = self.clip / norm if self.clip is not None and norm > self.clip else 1.0
        if self.kind == "fds":
            self.assign(self._sign_rule.step(self.values(), raw_grads))
        elif self.kind == "normalized":
            direction = self._momentum.direction({k: g * scale for k, g in raw_grads.items()})
            with torch.no_grad():
                for k, p in self.raw.items():
                    p.sub_(direction[k], alpha=self.lr)
        else:
            for k, p in self.raw.items():
                g = raw_grads[k] * scale
                p.grad = torch.sign(g) if self.kind == "sign" else g.clone()
            self._opt.step()
        if self.project is not None:
            with torch.no_grad():
                projected = self.project(self.values())
                for k, p in self.raw.items():
                    p.copy_(projected[k])
        return {"hypergrad_norm": norm, "skipped": False}

    def assign(self, raw: Mapping[str, torch.Tensor]) -> None:
        """Overwrite some raw coordinates in place (a rollback, a backtracking step)."""
        with torch.no_grad():
            for k, v in raw.items():
                self.raw[k].copy_(v)

    def set_lr(self, lr: float) -> None:
        """Change the meta learning rate, keeping the optimizer's moments."""
        check_meta_lr(lr)
        if self.kind == "fds":
            self._sign_rule.scale(lr / self.lr if self.lr > 0 else 0.0)
        self.lr = float(lr)
        for group in [] if self._opt is None else self._opt.param_groups:
            group["lr"] = self.lr

    def state_dict(self) -> dict:
        """Raw coordinates, learning rate and the inner optimizer's moments (tensors and
        plain values only)."""
        opt = (self._sign_rule.state_dict() if self.kind == "fds" else
               self._momentum.state_dict() if self.kind == "normalized" else
               self._opt.state_dict())
        return {"raw": {k: v.detach().clone() for k, v in self.raw.items()}, "lr": self.lr,
                "opt": _clone(opt)}

    def load_state_dict(self, sd: Mapping) -> None:
        """Restore `state_dict`."""
        self.assign(sd["raw"])
        self.lr = float(sd["lr"])
        self._opt = self._make(self.lr)
        if self.kind == "fds":
            self._sign_rule.load_state_dict(_clone(sd["opt"]))
        elif self.kind == "normalized":
            self._momentum.load_state_dict(_clone(sd["opt"]))
        else:
            self._opt.load_state_dict(_clone(sd["opt"]))

    @property
    def step_sizes(self) -> Leaves:
        """The current per-element step sizes of kind "fds"."""
        return {k: v.clone() for k, v in self._sign_rule.step_sizes.items()}


class HalvingSign:
    """Micaelli & Storkey 2021 outer step: x ← x − s·sign(g), with each element of s halved
    (times `decay`) where sign(g) is opposite to the previous step's sign."""

    def __init__(self, step_sizes: Mapping[str, torch.Tensor], decay: float = 0.5):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
            raise HyperparameterError(f"step_decay must be a number in (0, 1), got {decay!r}")
        self.step_sizes = {k: v.detach().clone() for k, v in step_sizes.items()}
        self.signs = {k: torch.zeros_like(v) for k, v in self.step_sizes.items()}
        self.decay = float(decay)

    def step(self, values: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]
             ) -> Leaves:
        """The next values (before projection)."""
        out = {}
        for k, v in values.items():
            s = torch.sign(grads[k])
            flipped = (self.signs[k] * s) < 0
            self.step_sizes[k] = torch.where(flipped, self.step_sizes[k] * self.decay,
                                             self.step_sizes[k])
            self.signs[k] = s
            out[k] = v - s * self.step_sizes[k]
        return out

    def scale(self, factor: float) -> None:
        """Multiply every step size by `factor`."""
        self.step_sizes = {k: v * factor for k, v in self.step_sizes.items()}

    def state_dict(self) -> dict:
        return {"step_sizes": dict(self.step_sizes), "signs": dict(self.signs),
                "decay": self.decay}

    def load_state_dict(self, sd: Mapping) -> None:
        self.step_sizes = {k: v.detach().clone() for k, v in sd["step_sizes"].items()}
        self.signs = {k: v.detach().clone() for k, v in sd["signs"].items()}
        self.decay = float(sd["decay"])


class NormalizedMomentum:
    """Momentum of the hypergradients stepped at a fixed size, x ← x − lr·clamp(m / rms(m), −1,
    1) with m ← β·m + (1 − β)·g: normalized momentum (Cutkosky & Mehta 2020, "Momentum improves
    normalized SGD"), its step clamped per coordinate at lr as signSGD's is."""

    def __init__(self, like: Mapping[str, torch.Tensor], beta: float):
        self.m = {k: torch.zeros_like(v.detach()) for k, v in like.items()}
        self.beta = float(beta)

    def direction(self, grads: Mapping[str, torch.Tensor]) -> Leaves:
        """Fold `grads` into the momentum; the step per unit of lr (every element in [-1, 1])."""
        # one root-mean-square over every coordinate, not one per coordinate as Adam's: raw
        # coordinates are log / logit scale, so their hypergradients are commensurable, and a
        # hyperparameter whose hypergradient is negligible beside the others' stays put instead
        # of being stepped at full size (Adam does so to weight decay while an underfit net's
        # lr hypergradient is 1e5 times larger); and with no second moment there is no memory
        # of the large hypergradients of a ramp to shrink the steps for hundreds of steps after
        for k, g in grads.items():
            self.m[k] = self.beta * self.m[k] + (1 - self.beta) * g.detach()
        count = sum(m.numel() for m in self.m.values())
        rms = math.sqrt(sum(float((m * m).sum()) for m in self.m.values()) / max(count, 1))
        if not rms > 0:
            return {k: torch.zeros_like(m) for k, m in self.m.items()}
        return {k: (m / rms).clamp(-1.0, 1.0) for k, m in self.m.items()}

    def state_dict(self) -> dict:
        return {"m": dict(self.m), "beta": self.beta}

    def load_state_dict(self, sd: Mapping) -> None:
        self.m = {k: v.detach().clone() for k, v in sd["m"].items()}
        self.beta = float(sd["beta"])


def check_meta_lr(lr) -> None:
    """Refuse a meta learning rate that is not a finite number >= 0."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) \
            or lr < 0:
        raise HyperparameterError(f"meta_lr must be a finite number >= 0, got {lr!r}")


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clone(v) for v in x]
    return x
