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

Two unbiased variance reducers, both linear splits of Z = Σ_b Z_b whose parts obey the same
recursion with their part of F_t:
- `blocks="name"` / `"layer"`: one (s̃, λ̃) pair per hyperparameter name / per parameter tensor,
  each ν acting only within its block, so signs never mix columns of different blocks (one
  Hessian-vector product per block and sample);
- `centred=True`: each (name, schedule block) group's summed column Z·1_g is carried exactly
  (one product per group, as `tangent="summed"` does), and ν is projected off the group means,
  E[ν νᵀ] = I - Σ_g 1_g 1_gᵀ/|g|, so UORO estimates only each layer's deviation from its
  name's mean; a group's mean hypergradient, and a global hyperparameter, are then exact.

With `hvp="finite_difference"` (ForwardTangent) the products J s̃ and the group sums' take one
extra gradient each instead of a double backward: the estimate is then unbiased for the
tangent of the differenced dynamics, an O(ε) approximation of the exact one.
"""

from __future__ import annotations

import torch

from ..errors import HyperparameterError
from ..problem import InnerState, Problem
from ..space import flatten
from .forward import ForwardTangent, per_param_rows


class UOROTangent(ForwardTangent):
    """The forward engine with the UORO estimate of Z (see the module docstring); the carry is
    {"s": stacked s̃ (samples x blocks, *state), "lam": λ̃ (samples x blocks, scalar
    hyperparameters), "S": the exact mean tangents when centred, "rng": the sign generator's
    state}."""

    def __init__(self, problem: Problem, horizon: int, samples: int = 1, seed: int = 0,
                 clamp_grad: float | None = None, clamp_hz: float | None = None,
                 blocks: str = "all", centred: bool = False, hvp: str = "autodiff"):
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise HyperparameterError(f"uoro_samples must be an integer >= 1, got {samples!r}")
        if blocks not in BLOCKS:
            raise HyperparameterError(f"uoro_blocks={blocks!r} is not one of {BLOCKS}")
        if not isinstance(centred, bool):
            raise HyperparameterError(f"uoro_centred must be True or False, got {centred!r}")
        if centred and blocks != "all":
            raise HyperparameterError("uoro_centred=True estimates the deviations from each "
                                      "name's mean with one block: it needs uoro_blocks='all'")
        super().__init__(problem, horizon, "exact", clamp_grad=clamp_grad, clamp_hz=clamp_hz,
                         hvp=hvp)
        self.samples = samples
        self.seed = int(seed)
        self.blocks, self.centred = blocks, centred
        # per leaf: which scalar hyperparameters (columns) it holds, at which element of the
        # per-step value and at which index of the whole leaf
        by_leaf: dict[str, list] = {}
        for j, col in enumerate(self.columns):
            m = col.members[0]
            by_leaf.setdefault(m.leaf, []).append((j, m.elem, m.index))
        self._leaf_cols = {leaf: tuple(torch.tensor(x) for x in zip(*cols))
                           for leaf, cols in by_leaf.items()}
        members = [c.members[0] for c in self.columns]
        self._mask = _block_mask(members, blocks)
        self.rows = samples * self._mask.shape[0]  # carried (s̃, λ̃) pairs: samples x blocks
        # centred: each (name, schedule block) group's summed tangent is carried exactly, and
        # the signs are projected off the group means, so UORO estimates only the deviations
        groups = _block_mask(members, "group") if centred else torch.zeros((0, len(members)),
                                                                             dtype=torch.bool)
        self._groups = groups.double()
        self._avg = self._groups / self._groups.sum(1, keepdim=True).clamp_min(1)
        self._project = torch.eye(len(members), dtype=torch.float64) - \
            self._groups.T @ self._avg

    def init(self) -> dict:
        """s̃ = 0, λ̃ = 0 and a fresh sign generator."""
        gen = torch.Generator().manual_seed(self.seed)
        like = next(iter(flatten(self.like).values()))
        return {"s": {}, "S": {}, "lam": like.new_zeros((self.rows, len(self.columns))),
                "rng": gen.get_state()}

    def reset(self, carry: dict) -> dict:
        """Forget the estimate, keeping the generator where it is (fresh signs after it)."""
        return {**self.init(), "rng": carry["rng"]}

    def step(self, carry: dict, state: InnerState, batch, leaves: dict[str, torch.Tensor],
             t: int) -> tuple[InnerState, dict, torch.Tensor]:
        """One inner step with the rank-one tangent update (Tallec & Ollivier 2018, Alg. 1)."""
        k, P, G = self.rows, len(self.columns), self._groups.shape[0]
        gen = torch.Generator()
        gen.set_state(carry["rng"])
        lam = carry["lam"]
        dt = lam.dtype
        direct = torch.tensor(self._direct(t), dtype=dt)
        mask = self._mask.to(dt).repeat(self.samples, 1)
        signs = torch.randint(0, 2, (k, P), generator=gen).to(dt) * 2 - 1
        c = torch.randint(0, 2, (k,), generator=gen).to(dt) * 2 - 1
        # E[ν νᵀ] = the projection off the group means (identity when not centred); the group
        # sums carried exactly add back the rest, so the estimate of F stays unbiased
        nu = ((signs * direct * mask) @ self._project.to(dt)).to(lam.device)
        group_dirs = (self._groups.to(dt) * direct).to(lam.device)
        c = c.to(lam.device)
        s, S = carry["s"] or None, carry.get("S") or None
        Z = None
        if s is not None:  # rows: G group sums; then 2i: s̃_i (no direction), 2i+1: F ν_i
            Z = {key: {n: torch.cat([S[key][n], _interleave(z, torch.zeros_like(z))])
                       if G else _interleave(z, torch.zeros_like(z)) for n, z in d.items()}
                 for key, d in s.items()}
        dirs = torch.cat([group_dirs, _interleave(torch.zeros_like(nu), nu)])

        def directions(hp, params):
            rows = {}
            for key, v in hp.items():
                r = torch.zeros((G + 2 * k, *v.shape), dtype=v.dtype, device=v.device)
                js, elems, _ = self._leaf_cols[key]
                r.view(G + 2 * k, -1)[:, elems.to(v.device)] = dirs[:, js.to(v.device)]
                rows[key] = r
            return rows, per_param_rows(rows, params)

        direct_rows = tuple(bool(x) for x in (group_dirs != 0).any(1)) + (False, True) * k
        new, Zn, loss = self.tangent_step(state, batch, leaves, t, Z, direct_rows, directions,
                                          hz=(True,) * G + (True, False) * k)
        new_S = {key: {n: z[:G] for n, z in d.items()} for key, d in Zn.items()} if G else {}
        js = {key: {n: z[G::2] for n, z in d.items()} for key, d in Zn.items()}
        fv = {key: {n: z[G + 1::2] for n, z in d.items()} for key, d in Zn.items()}
        rho0 = _ratio(lam.norm(dim=1), _norms(js, k))
        rho1 = _ratio(nu.norm(dim=1), _norms(fv, k))
        new_s = {key: {n: _rows(rho0, js[key][n]) + _rows(c * rho1, fv[key][n]) for n in d}
                 for key, d in js.items()}
        new_lam = lam / rho0[:, None] + (c / rho1)[:, None] * nu
        return new, {"s": new_s, "S": new_S, "lam": new_lam, "rng": gen.get_state()}, loss

    def readout(self, carry: dict, state: InnerState, val_batch
                ) -> tuple[float, dict[str, torch.Tensor]]:
        """E(s_t) and the estimate of dE/dλ: the mean of `sample_estimates`."""
        value, c, _ = self.problem.val_grad(state.params, state.buffers, val_batch)
        grads = {key: torch.zeros_like(v) for key, v in flatten(self.like).items()}
        if not carry["s"]:
            return value.item(), grads
        estimate = self.sample_estimates(carry, c).mean(0)
        for key, (js, _, index) in self._leaf_cols.items():
            grads[key].view(-1)[index.to(estimate.device)] = estimate[js.to(estimate.device)]
        return value.item(), grads

    def sample_estimates(self, carry: dict, val_grad: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each independent sample's estimate of dE/dλ over the columns, (samples, columns):
        Σ_blocks (∇E · s̃^θ) λ̃, plus each group's (∇E · S^θ) / |group| when centred."""
        c = val_grad
        sp = carry["s"]["params"]
        dots = sum(sp[n].reshape(self.rows, -1) @ c[n].reshape(-1) for n in c)
        # the blocks' λ̃ have disjoint supports: their sum is one sample
        per_row = dots[:, None] * carry["lam"]
        est = per_row.reshape(self.samples, -1, per_row.shape[1]).sum(1)
        if carry.get("S"):
            Sp = carry["S"]["params"]
            sums = sum(Sp[n].reshape(Sp[n].shape[0], -1) @ c[n].reshape(-1) for n in c)
            est = est + (sums @ self._avg.to(sums.dtype).to(sums.device))[None]
        return est

    def tangent_norm(self, carry: dict) -> float:
        """Norm of the weight part of the estimate: per sample, the root of the summed squares
        of its blocks' s̃ λ̃ᵀ (disjoint supports), then the mean; the exact group means'
        norm is added in quadrature when centred."""
        if not carry["s"]:
            return 0.0
        sp = carry["s"]["params"]
        sq = sum((z.reshape(z.shape[0], -1) ** 2).sum(1) for z in sp.values())
        per_row = sq * (carry["lam"] ** 2).sum(1)
        est = per_row.reshape(self.samples, -1).sum(1).sqrt().mean()
        if carry.get("S"):
            Sp = carry["S"]["params"]
            sq = sum((z.reshape(z.shape[0], -1) ** 2).sum(1) for z in Sp.values())
            est = torch.sqrt(est ** 2 + (sq * (self._avg ** 2).sum(1).to(sq.dtype)).sum())
        return float(est)


BLOCKS = ("all", "name", "layer")


def _block_mask(members: list, blocks: str) -> torch.Tensor:
    """(blocks, columns) membership: one block of all columns ("all"), one per hyperparameter
    name, one per parameter tensor that per-layer values belong to (global values form one),
    or one per (name, schedule block) ("group")."""
    if blocks == "all":
        return torch.ones((1, len(members)), dtype=torch.bool)
    keys = [m.leaf.partition("/")[0] if blocks == "name" else m.param if blocks == "layer"
            else (m.leaf.partition("/")[0], m.block) for m in members]
    groups = list(dict.fromkeys(keys))
    return torch.tensor([[k == g for k in keys] for g in groups], dtype=torch.bool)


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
