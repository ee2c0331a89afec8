"""Forward mode / real-time recurrent learning (Franceschi et al. 2017, Eq. 14; seed 000).

The tangent Z_t = ds_t/dλ of the whole inner state (weights and optimizer tensors) is carried
one column per scalar hyperparameter: Z_{t+1} = ∂Φ/∂s · Z_t + ∂Φ/∂λ. The model part of ∂Φ/∂s
is a Hessian-vector product by double backward (the cheapest mechanism measured here); the
optimizer's elementwise update is differentiated exactly by `torch.func.jvp`. Columns of
`Piecewise` blocks that have not started are not computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import jvp

from ..optim.base import tensor_state, with_tensor_state
from ..problem import InnerState, Problem
from ..space import flatten, unflatten
from .common import CostMeter, HypergradResult, finish, natural_leaves

StateTensors = dict[str, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Column:
    """One scalar hyperparameter: a leaf, its schedule block (or None) and element index."""

    leaf: str
    block: int | None
    elem: int
    index: int  # flat position inside the leaf tensor
    param: str | None = None  # the parameter a per-layer / per-parameter leaf belongs to
    per: str = "global"


@dataclass(frozen=True)
class Tangent:
    """One carried tangent column: the scalar hyperparameters whose directions it sums."""

    members: tuple[Column, ...]

    @property
    def block(self) -> int | None:
        return self.members[0].block

    @property
    def leaf(self) -> str:
        return self.members[0].leaf


class ForwardTangent:
    """Carries Z = ds/dλ alongside training; `step` advances both, `hypergrad` reads dE/dλ."""

    def __init__(self, problem: Problem, horizon: int, tangent: str = "exact"):
        if tangent not in ("exact", "summed"):
            raise ValueError(f"tangent={tangent!r} is not one of 'exact', 'summed'")
        self.problem = problem
        self.horizon = horizon
        self.tangent = tangent
        self.like = problem.real_hparams()
        self.schedules: dict[str, object] = {}
        members: list[Column] = []
        for key, v in flatten(self.like).items():
            name, _, pname = key.partition("/")
            hp = problem.bound.space[name]
            self.schedules[key] = hp.schedule
            K = hp.K
            per_block = v.numel() // K
            for k in range(K):
                for e in range(per_block):
                    members.append(Column(key, None if hp.schedule is None else k, e,
                                          k * per_block + e, pname or None, hp.per))
        if tangent == "exact":
            self.columns = [Tangent((m,)) for m in members]
        else:
            # OHO's cheaper variant: one tangent per (hyperparameter name, block) summed over
            # layers/elements; each member reads it back restricted to its own parameter.
            groups: dict[tuple, list[Column]] = {}
            for m in members:
                groups.setdefault((m.leaf.partition("/")[0], m.block), []).append(m)
            self.columns = [Tangent(tuple(g)) for g in groups.values()]
        self.Z: list[StateTensors | None] = [None] * len(self.columns)
        self.hvps = 0
        # optimizers' hand-written JVP rules are exact and ~40x cheaper than torch.func.jvp
        # of the elementwise update on CPU; tests check them against the jvp fallback.
        self.use_tangent_rule = True

    def reset(self) -> None:
        """Forget the tangent (OHO's `reset_every`)."""
        self.Z = [None] * len(self.columns)

    def _block(self, key: str, t: int) -> int | None:
        sched = self.schedules[key]
        return None if sched is None else sched.block(t, self.horizon)

    def current(self, leaves: dict[str, torch.Tensor], t: int) -> dict[str, torch.Tensor]:
        """The per-step values of every leaf at step t (block k of a schedule)."""
        out = {}
        for key, v in leaves.items():
            k = self._block(key, t)
            out[key] = (v if k is None else v[k]).detach()
        return out

    def step(self, state: InnerState, batch, leaves: dict[str, torch.Tensor], t: int
             ) -> tuple[InnerState, torch.Tensor]:
        """Advance s_t -> s_{t+1} and Z_t -> Z_{t+1} with exact JVPs."""
        problem, opt = self.problem, self.problem.optimizer
        hp_cur = {k: v.clone().requires_grad_(True) for k, v in self.current(leaves, t).items()}
        params = {n: p.detach().requires_grad_(True) for n, p in state.params.items()}
        keys = list(hp_cur)
        with torch.enable_grad():
            loss, buffers = problem.train_loss(params, state.buffers, batch,
                                               unflatten(hp_cur, self.like))
            got = torch.autograd.grad(loss, list(params.values()) + [hp_cur[k] for k in keys],
                                      create_graph=True, allow_unused=True)
        g = dict(zip(params, got[:len(params)]))
        g_hp = dict(zip(keys, got[len(params):]))
        primal_p = {n: p.detach() for n, p in params.items()}
        primal_o = tensor_state(state.opt)
        primal_g = {n: x.detach() for n, x in g.items()}
        primal_h = {k: v.detach() for k, v in hp_cur.items()}

        hp_struct = unflatten(primal_h, self.like)
        with torch.no_grad():
            new_params, new_state = opt.update(primal_p, state.opt, primal_g, hp_struct)
        new_opt = tensor_state(new_state)
        linearized = getattr(opt, "tangent", None)

        def update(p, o, gr, h):  # generic fallback for optimizers without a tangent rule
            new_p, new_o = opt.update(p, with_tensor_state(state.opt, o), gr,
                                      unflatten(h, self.like))
            return new_p, tensor_state(new_o)

        for j, col in enumerate(self.columns):
            k_now = self._block(col.leaf, t)
            direct = col.block is None or col.block == k_now
            Zj = self.Z[j]
            if Zj is None and not direct:
                continue  # a block that has not started (or a reset, finished block)
            # dg = H·Zθ + ∂²L/∂θ∂λ_j in one backward: g's vector-Jacobian product with Zθ
            # (the Hessian is symmetric), plus the gradient of ∂L/∂λ_j for regularizer columns
            outputs, grad_outputs = [], []
            if Zj is not None:
                self.hvps += 1
                for n, gn in g.items():
                    if gn.requires_grad:
                        outputs.append(gn)
                        grad_outputs.append(Zj["params"][n])
            if direct:
                for m in col.members:
                    term = g_hp[m.leaf]
                    if term is not None and term.requires_grad:
                        outputs.append(term.reshape(-1)[m.elem])
                        grad_outputs.append(torch.ones((), dtype=term.dtype,
                                                       device=term.device))
            if outputs:
                dg = torch.autograd.grad(outputs, list(params.values()), grad_outputs,
                                         retain_graph=True, allow_unused=True)
                dg = {n: torch.zeros_like(p) if d is None else d.detach()
                      for (n, p), d in zip(params.items(), dg)}
            else:
                dg = {n: torch.zeros_like(p) for n, p in primal_p.items()}
            tp = Zj["params"] if Zj is not None else {n: torch.zeros_like(p)
                                                      for n, p in primal_p.items()}
            to = ({k: Zj[k] for k in primal_o} if Zj is not None else
                  {k: {n: torch.zeros_like(x) for n, x in d.items()} for k, d in primal_o.items()})
            th = {k: torch.zeros_like(v) for k, v in primal_h.items()}
            if direct:
                for m in col.members:
                    th[m.leaf].view(-1)[m.elem] = 1.0
            if linearized is not None and self.use_tangent_rule:
                with torch.no_grad():
                    dp, do = linearized(primal_p, state.opt, primal_g, hp_struct, tp, to, dg,
                                        unflatten(th, self.like))
            else:
                _, (dp, do) = jvp(update, (primal_p, primal_o, primal_g, primal_h),
                                  (tp, to, dg, th))
            self.Z[j] = {"params": dp, **do}
        opt_state = with_tensor_state({"step": state.opt["step"] + 1}, new_opt)
        return InnerState(new_params, opt_state, buffers, state.t + 1), loss.detach()

    def hypergrad(self, state: InnerState, val_batch) -> tuple[float, dict[str, torch.Tensor]]:
        """E(s_t) and dE/dλ = ∇E(θ_t) · Z_t^θ for every leaf (natural units)."""
        problem = self.problem
        params = {n: p.detach().requires_grad_(True) for n, p in state.params.items()}
        with torch.enable_grad():
            value = problem.val_loss(params, state.buffers, val_batch)
            c = torch.autograd.grad(value, list(params.values()))
        c = dict(zip(params, c))
        grads = {k: torch.zeros_like(v) for k, v in flatten(self.like).items()}
        for j, col in enumerate(self.columns):
            Zj = self.Z[j]
            if Zj is None:
                continue
            if len(col.members) == 1:
                m = col.members[0]
                grads[m.leaf].view(-1)[m.index] = sum((c[n] * Zj["params"][n]).sum() for n in c)
                continue
            for m in col.members:  # summed tangent: read back restricted to the member's part
                if m.per == "layer":
                    val = (c[m.param] * Zj["params"][m.param]).sum()
                elif m.per == "parameter":
                    val = c[m.param].reshape(-1)[m.elem] * Zj["params"][m.param].reshape(-1)[m.elem]
                else:
                    val = sum((c[n] * Zj["params"][n]).sum() for n in c)
                grads[m.leaf].view(-1)[m.index] = val
        return value.item(), grads

    def tangent_norm(self) -> float:
        """Frobenius norm of the weight part of Z."""
        total = 0.0
        for Zj in self.Z:
            if Zj is not None:
                total += sum(float((z * z).sum()) for z in Zj["params"].values())
        return total ** 0.5

    def state_dict(self) -> dict:
        """The tangent, for saving a tuner mid-run."""
        return {"Z": self.Z, "hvps": self.hvps, "horizon": self.horizon}

    def load_state_dict(self, sd: dict) -> None:
        """Restore `state_dict`."""
        self.Z, self.hvps, self.horizon = sd["Z"], sd["hvps"], sd["horizon"]


def forward(problem: Problem, steps: int, tangent: str = "exact", **_) -> HypergradResult:
    """Forward-mode hypergradient after `steps` inner steps (memory constant in T).

    tangent="summed" is OHO's approximation (one tangent per hyperparameter name, read back
    per layer); it is exact only when the Hessian has no cross-layer blocks.
    """
    with CostMeter(problem.device) as meter:
        engine = ForwardTangent(problem, steps, tangent)
        leaves = natural_leaves(problem)
        state = problem.init_state()
        for t in range(steps):
            state, _ = engine.step(state, problem.train_batch(t), leaves, t)
        value, grads = engine.hypergrad(state, problem.val_batch(steps))
        meter.hvps = engine.hvps
    return finish(problem, value, grads,
                  meter.stats(method="forward", steps=steps, columns=len(engine.columns)))
