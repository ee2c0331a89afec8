"""A rank-one, unbiased estimate of the forward tangent: UORO (Tallec & Ollivier 2018,
"Unbiased online recurrent optimization"), applied to the hyperparameter tangent Z = ds/dλ.

Exact RTRL carries one column of Z per scalar hyperparameter, so its cost grows with their
number. UORO carries Z ≈ s̃ λ̃ᵀ, one state-shaped vector s̃ and one λ-shaped vector λ̃, and
updates them with random signs so that the estimate stays unbiased:

    Z_{t+1} = J Z_t + F_t,  J = ∂Φ/∂s,  F_t = ∂Φ/∂λ
    s̃' = ρ0 J s̃ + c ρ1 F_t ν,   λ̃' = λ̃ / ρ0 + c ν / ρ1

with ν a vector of random signs over the hyperparameters this step depends on, c a random sign,
and ρ0 = sqrt(|λ̃| / |J s̃|), ρ1 = sqrt(|ν| / |F_t ν|) minimising the variance. J s̃ and F_t ν are
two columns of the exact engine's step, so a step costs one Hessian-vector product whatever the
number of hyperparameters. It is an estimate: its variance is the price, which `samples=k`
independent pairs (averaged) reduce, as do resets (`reset_every` in the online tuner).
"""

from __future__ import annotations

import torch

from ..errors import HyperparameterError
from ..problem import InnerState, Problem
from ..space import flatten
from .forward import ForwardTangent, per_param_rows


class UOROTangent(ForwardTangent):
    """The forward engine with the UORO estimate of Z (see the module docstring); the carry is
    {"s": stacked s̃ (samples, *state), "lam": λ̃ (samples, scalar hyperparameters), "rng": the
    sign generator's state}."""

    def __init__(self, problem: Problem, horizon: int, samples: int = 1, seed: int = 0,
                 clamp_grad: float | None = None, clamp_hz: float | None = None):
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise HyperparameterError(f"uoro_samples must be an integer >= 1, got {samples!r}")
        super().__init__(problem, horizon, "exact", clamp_grad=clamp_grad, clamp_hz=clamp_hz)
        self.samples = samples
        self.seed = int(seed)
        # per leaf: which scalar hyperparameters (columns) it holds, at which element of the
        # per-step value and at which index of the whole leaf
        by_leaf: dict[str, list] = {}
        for j, col in enumerate(self.columns):
            m = col.members[0]
            by_leaf.setdefault(m.leaf, []).append((j, m.elem, m.index))
        self._leaf_cols = {leaf: tuple(torch.tensor(x) for x in zip(*cols))
                           for leaf, cols in by_leaf.items()}

    def init(self) -> dict:
        """s̃ = 0, λ̃ = 0 and a fresh sign generator."""
        gen = torch.Generator().manual_seed(self.seed)
        like = next(iter(flatten(self.like).values()))
        return {"s": {}, "lam": like.new_zeros((self.samples, len(self.columns))),
                "rng": gen.get_state()}

    def reset(self, carry: dict) -> dict:
        """Forget the estimate, keeping the generator where it is (fresh signs after it)."""
        return {**self.init(), "rng": carry["rng"]}

    def step(self, carry: dict, state: InnerState, batch, leaves: dict[str, torch.Tensor],
             t: int) -> tuple[InnerState, dict, torch.Tensor]:
        """One inner step with the rank-one tangent update (Tallec & Ollivier 2018, Alg. 1)."""
        k, P = self.samples, len(self.columns)
        gen = torch.Generator()
        gen.set_state(carry["rng"])
        lam = carry["lam"]
        direct = torch.tensor(self._direct(t), dtype=lam.dtype)
        nu = (torch.randint(0, 2, (k, P), generator=gen).to(lam.dtype) * 2 - 1) * direct
        c = torch.randint(0, 2, (k,), generator=gen).to(lam.dtype) * 2 - 1
        nu, c = nu.to(lam.device), c.to(lam.device)
        s = carry["s"] or None
        Z = None
        if s is not None:  # columns 2i: s̃_i (no direction); 2i+1: zero state, direction ν_i
            Z = {key: {n: _interleave(z, torch.zeros_like(z)) for n, z in d.items()}
                 for key, d in s.items()}

        def directions(hp, params):
            rows = {}
            for key, v in hp.items():
                half = torch.zeros((k, *v.shape), dtype=v.dtype, device=v.device)
                js, elems, _ = self._leaf_cols[key]
                half.view(k, -1)[:, elems.to(v.device)] = nu[:, js.to(v.device)]
                rows[key] = _interleave(torch.zeros_like(half), half)
            return rows, per_param_rows(rows, params)

        new, Zn, loss = self.tangent_step(state, batch, leaves, t, Z, (False, True) * k,
                                          directions, hz=(True, False) * k)
        js = {key: {n: z[0::2] for n, z in d.items()} for key, d in Zn.items()}
        fv = {key: {n: z[1::2] for n, z in d.items()} for key, d in Zn.items()}
        rho0 = _ratio(lam.norm(dim=1), _norms(js, k))
        rho1 = _ratio(nu.norm(dim=1), _norms(fv, k))
        new_s = {key: {n: _rows(rho0, js[key][n]) + _rows(c * rho1, fv[key][n]) for n in d}
                 for key, d in js.items()}
        new_lam = lam / rho0[:, None] + (c / rho1)[:, None] * nu
        return new, {"s": new_s, "lam": new_lam, "rng": gen.get_state()}, loss

    def readout(self, carry: dict, state: InnerState, val_batch
                ) -> tuple[float, dict[str, torch.Tensor]]:
        """E(s_t) and the estimate dE/dλ ≈ mean_i (∇E · s̃_i^θ) λ̃_i."""
        value, c, _ = self.problem.val_grad(state.params, state.buffers, val_batch)
        grads = {key: torch.zeros_like(v) for key, v in flatten(self.like).items()}
        if not carry["s"]:
            return value.item(), grads
        sp = carry["s"]["params"]
        dots = sum(sp[n].reshape(self.samples, -1) @ c[n].reshape(-1) for n in c)
        estimate = (dots[:, None] * carry["lam"]).mean(0)
        for key, (js, _, index) in self._leaf_cols.items():
            grads[key].view(-1)[index.to(estimate.device)] = estimate[js.to(estimate.device)]
        return value.item(), grads

    @staticmethod
    def tangent_norm(carry: dict) -> float:
        """Frobenius norm of the weight part of the estimate s̃ λ̃ᵀ (mean over samples)."""
        if not carry["s"]:
            return 0.0
        sp = carry["s"]["params"]
        s_norm = torch.sqrt(sum((z.reshape(z.shape[0], -1) ** 2).sum(1) for z in sp.values()))
        return float((s_norm * carry["lam"].norm(dim=1)).mean())


def _norms(tangent: dict, k: int) -> torch.Tensor:
    """Per sample, the norm of a stacked state tangent over all its tensors."""
    sq = sum((z.reshape(k, -1) ** 2).sum(1) for d in tangent.values() for z in d.values())
    return torch.sqrt(sq)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """sqrt(num / den), 1 where either is zero (nothing to balance yet)."""
    ok = (num > 0) & (den > 0) & torch.isfinite(num) & torch.isfinite(den)
    return torch.where(ok, torch.sqrt(num / torch.where(ok, den, torch.ones_like(den))),
                       torch.ones_like(num))


def _interleave(even: torch.Tensor, odd: torch.Tensor) -> torch.Tensor:
    """Rows even[0], odd[0], even[1], odd[1], ... of two stacked (k, ...) tensors."""
    return torch.stack([even, odd], dim=1).reshape(2 * even.shape[0], *even.shape[1:])


def _rows(coef: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """coef[i] * z[i] for a stacked tensor z of shape (k, ...)."""
    return coef.reshape(-1, *([1] * (z.dim() - 1))) * z


__all__ = ["UOROTangent"]
