"""Forward mode / real-time recurrent learning (Franceschi et al. 2017, "Forward and
reverse gradient-based hyperparameter optimization", Eq. 14).

The tangent Z_t = ds_t/dλ of the whole inner state (weights and optimizer tensors) is carried
one column per scalar hyperparameter: Z_{t+1} = ∂Φ/∂s · Z_t + ∂Φ/∂λ. The model part of ∂Φ/∂s
is a Hessian-vector product by double backward (the cheapest mechanism measured here); the
optimizer's elementwise update is differentiated by its exact hand-written tangent rule
(`torch.func.jvp` for optimizers without one). Columns of
`Piecewise` blocks that have not started are not computed.

`hvp="finite_difference"` / `"central_difference"` replace the model's Hessian-vector products
by differences of gradients (Liu, Simonyan & Yang 2019, "DARTS: Differentiable architecture
search", Eq. 8), an approximation of the exact products of double backward (Pearlmutter 1994,
"Fast exact multiplication by the Hessian"): H·v ≈ (∇L(θ+εv) − ∇L(θ))/ε, reusing the step's
own gradient, or (∇L(θ+εv) − ∇L(θ−εv))/(2ε). See `finite_difference_hvp`. Every ReLU or
max-pooling kink that θ ± εv crosses would add a gradient jump divided by ε, an error that does
not shrink with ε (in float32, where ε cannot be small, O(1) on a ReLU / max-pool CNN): the
step's gradient records the active piece of each ReLU, LeakyReLU and max-pool module and the
shifted gradients replay it (`kinks.KinkPatterns`); other kinked modules get a warning. Check
a model with `benchmarks/oho_cnn.py --fd-error`.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.func import jvp

from ..errors import HyperparameterError
from ..optim.base import tensor_state, with_tensor_state
from ..problem import InnerState, Problem
from ..space import flatten, unflatten
from .common import CostMeter, HypergradResult, finish
from .engine import run
from .forward_fused import fused_step
from .kinks import KinkPatterns, freezable

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


def leaves_device(leaves: dict[str, torch.Tensor]) -> torch.device:
    """The device hyperparameter leaves live on (the model's)."""
    return next(iter(leaves.values())).device


def per_param_rows(rows: dict[str, torch.Tensor], params: dict[str, torch.Tensor]
                   ) -> dict[str, dict[str, torch.Tensor]]:
    """Stacked hyperparameter directions per leaf, (columns, *leaf), as the optimizer's tangent
    rule takes them: by hyperparameter name, then parameter, broadcastable against it."""
    per_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, r in rows.items():
        name, _, pname = key.partition("/")
        targets = [pname] if pname else list(params)
        for n in targets:
            shaped = r if r.dim() > 1 else r.reshape(-1, *([1] * params[n].dim()))
            per_param.setdefault(name, {})[n] = shaped
    return per_param


def exact_grouping(members: list[Column]) -> list[Tangent]:
    """One carried column per scalar hyperparameter: the exact tangent."""
    return [Tangent((m,)) for m in members]


def summed_grouping(members: list[Column]) -> list[Tangent]:
    """OHO's cheaper variant (Im, Savin & Cho 2021): one column per (hyperparameter name,
    schedule block), summed over layers/elements; each member reads it back restricted to its
    own parameter."""
    groups: dict[tuple, list[Column]] = {}
    for m in members:
        groups.setdefault((m.leaf.partition("/")[0], m.block), []).append(m)
    return [Tangent(tuple(g)) for g in groups.values()]


GROUPINGS = {"exact": exact_grouping, "summed": summed_grouping}

#: how the model's Hessian-vector products are taken: double backward (exact), or one-sided /
#: central differences of gradients (approximations; `finite_difference_hvp`)
HVPS = ("autodiff", "finite_difference", "central_difference")


def check_hvp(hvp) -> str:
    """`hvp` if it is one of HVPS, else a HyperparameterError naming the input."""
    if not isinstance(hvp, str) or hvp not in HVPS:
        raise HyperparameterError(f"hvp={hvp!r} is not one of {HVPS}")
    return hvp


#: modules whose output has kinks in the weights: a difference of gradients across one adds
#: jump/ε to the product, an error that does not shrink with ε
KINKED = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.LeakyReLU, torch.nn.PReLU, torch.nn.Hardtanh,
          torch.nn.Hardswish, torch.nn.Hardsigmoid, torch.nn.MaxPool1d, torch.nn.MaxPool2d,
          torch.nn.MaxPool3d, torch.nn.AdaptiveMaxPool1d, torch.nn.AdaptiveMaxPool2d,
          torch.nn.AdaptiveMaxPool3d)


def warn_if_kinked(model: torch.nn.Module, hvp: str) -> None:
    """Warn that difference products are unreliable on a model with piecewise-linear modules
    whose active piece `KinkPatterns` does not freeze, naming the first such module."""
    if hvp == "autodiff":
        return
    kinked = next(((n, m) for n, m in model.named_modules()
                   if isinstance(m, KINKED) and not freezable(m)), None)
    if kinked is not None:
        name, module = kinked
        warnings.warn(f"hvp={hvp!r} takes Hessian-vector products by differences of gradients, "
                      f"which kinks make unreliable, and the model has "
                      f"{type(module).__name__} module {name!r}, whose active piece is not "
                      f"frozen (only ReLU, LeakyReLU and MaxPool modules are): use one of "
                      f"those, a smooth activation, or hvp='autodiff'", stacklevel=3)


def fd_epsilon(params: dict[str, torch.Tensor], v: dict[str, torch.Tensor],
               central: bool) -> float:
    """The difference step ε = c·(1 + ‖θ‖)/‖v‖ of `finite_difference_hvp` (inf when v = 0)."""
    # the usual rule for differences in floating point (Nocedal & Wright 2006, "Numerical
    # optimization", Sec. 8.1): truncation error O(ε) (one-sided) or O(ε²) (central) against
    # a rounding error O(u/ε) give c = sqrt(u) or cbrt(u), u the dtype's unit roundoff; the
    # step is relative to the weights' size so that ε·v moves θ by about c of its norm
    dtype = next(iter(params.values())).dtype
    u = torch.finfo(dtype).eps
    c = u ** (1 / 3) if central else u ** 0.5
    theta = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.detach())
                                                  for p in params.values()]))
    vn = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in v.values()]))
    vn = float(vn)
    return math.inf if vn == 0 else c * (1 + float(theta)) / vn


def rng_snapshot(device: torch.device):
    """The generator states a training loss draws from (dropout): CPU, and the CUDA device's."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.random.get_rng_state(), cuda


def finite_difference_hvp(problem: Problem, params: dict[str, torch.Tensor], buffers, batch,
                          hp, v: dict[str, torch.Tensor], grad0: dict | None = None,
                          central: bool = False, eps: float | None = None, rng=None,
                          kinks: KinkPatterns | None = None) -> dict[str, torch.Tensor] | None:
    """H·v of the training loss at θ = `params` by a difference of gradients (an
    approximation; None when v = 0): one-sided (∇L(θ+εv) − grad0)/ε with grad0 = ∇L(θ), or
    central (∇L(θ+εv) − ∇L(θ−εv))/(2ε); ε by `fd_epsilon` unless given. `kinks`: the
    active pieces recorded at θ (with grad0), replayed at the shifted weights."""
    if eps is None:
        eps = fd_epsilon(params, v, central)
    if eps == math.inf:  # v = 0 (a non-finite v gives a NaN ε, which propagates)
        return None
    device = next(iter(params.values())).device

    def grad_at(sign: float) -> dict[str, torch.Tensor | None]:
        with torch.no_grad():
            shifted = {n: (p.detach() + (sign * eps) * v[n]).requires_grad_(True)
                       for n, p in params.items()}
        # the same batch, and the dropout masks the step's own gradient drew: the generators
        # restart where they were before it and are put back after; the updated BatchNorm
        # statistics are dropped (train_loss works on copies of the buffers)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if rng is not None:
                torch.random.set_rng_state(rng[0])
                if rng[1] is not None:
                    torch.cuda.set_rng_state(rng[1], device)
            with kinks.replay() if kinks else nullcontext():
                _, g, _, _ = problem.train_grad(shifted, buffers, batch, hp)
        return g

    plus = grad_at(1.0)
    if central:
        minus, scale = grad_at(-1.0), 1 / (2 * eps)
    else:
        if grad0 is None:
            raise HyperparameterError("a one-sided difference needs grad0 = ∇L(θ)")
        minus, scale = grad0, 1 / eps
    # train_grad refuses parameters the loss does not read, so no gradient here is None
    return {n: (plus[n] - minus[n].detach()) * scale for n in params}


class ForwardTangent:
    """The forward engine: carries Z = ds/dλ alongside training.

    Engine interface (engine.py): `init() -> carry`, `step(carry, s, batch, λ, t) -> (s', carry',
    loss)`, `readout(carry, s, val_batch) -> (E, dE/dλ)`, `reset(carry)`. The carry holds tensors
    only: "Z" (empty until a column starts) and "started" (one flag per column). `tangent` is the
    column grouping: a name in GROUPINGS or a function from scalar hyperparameters (Columns) to
    carried Tangents.

    The columns are stacked: every tangent tensor has a leading dimension with one row per
    carried column, so the optimizer's tangent rule runs once per step for all columns (its
    elementwise ops broadcast over that dimension) instead of once per column.

    `hvp` (one of HVPS) takes the model's Hessian-vector products by double backward
    ("autodiff", exact) or by differences of gradients (an approximation, O(ε) one-sided or
    O(ε²) central; `finite_difference_hvp`); mixed ∂²L/∂θ∂λ terms always take autodiff.
    """

    def __init__(self, problem: Problem, horizon: int, tangent="exact",
                 compile: bool | dict = False, clamp_grad: float | None = None,
                 clamp_hz: float | None = None, tangent_rule: bool = True,
                 batched_rows: bool | None = None, hvp: str = "autodiff"):
        grouping = GROUPINGS.get(tangent) if isinstance(tangent, str) else tangent
        if not callable(grouping):
            raise HyperparameterError(
                f"tangent={tangent!r} is not one of {sorted(GROUPINGS)} or a grouping function")
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
        self.columns = grouping(members)
        # Micaelli & Storkey 2021's stabilisers (off by default): the training gradient clamped
        # to ±clamp_grad (the tangent differentiates the clamp, so it stays exact for the
        # clamped dynamics) and H·Z clamped to ±clamp_hz (an approximation of the tangent)
        for name, c in (("clamp_grad", clamp_grad), ("clamp_hz", clamp_hz)):
            if c is not None and not (isinstance(c, (int, float)) and c > 0):
                raise HyperparameterError(f"{name} must be a number > 0 or None, got {c!r}")
        if compile and (clamp_grad is not None or clamp_hz is not None):
            raise HyperparameterError("clamp_grad / clamp_hz are not supported with compile=True")
        if compile and getattr(problem, "distributed", False):
            raise HyperparameterError("compile=True takes its gradient inside the compiled step, "
                                      "outside the all-reduce of distributed=True; use compile=False")
        self.clamp_grad, self.clamp_hz = clamp_grad, clamp_hz
        self.hvp = check_hvp(hvp)
        if compile and self.hvp != "autodiff":
            raise HyperparameterError(f"hvp={hvp!r} is not supported with compile=True")
        warn_if_kinked(problem.model, self.hvp)
        # the ReLU / max-pool pieces of each step's gradient, replayed on its difference passes
        self._kinks = KinkPatterns(problem.model) if self.hvp != "autodiff" else None
        # with differences, the step's gradient needs a graph only for mixed ∂²L/∂θ∂λ terms:
        # unknown until the first step has looked (then True / False)
        self._mixed: bool | None = None
        self.hvps = 0  # Hessian-vector products this engine has computed (a count, for stats)
        self._directions: dict[tuple, tuple] = {}
        # optimizers' hand-written JVP rules are exact and much cheaper than torch.func.jvp
        # of the elementwise update; tangent_rule=False takes the jvp (tests compare the two)
        self.use_tangent_rule = bool(tangent_rule)
        # all Hessian-vector rows of a step in one vmapped backward: on CPU it was slower than
        # one backward per row (benchmarks/batched_rows.py), so it is the default on CUDA only
        self.batched_rows = (problem.device.type == "cuda") if batched_rows is None \
            else bool(batched_rows)
        # compile=True (or torch.compile options): once every column is live, each step is
        # one compiled pure function (forward_fused.py); the first steps stay eager
        self._fused = None
        if compile:
            self._fused = fused_step(problem, self.like,
                                     compile if isinstance(compile, dict) else None)

    def init(self) -> dict:
        """The carry at s_0: no tangent yet (Z_0 = 0), no column started."""
        return {"Z": {}, "started": torch.zeros(len(self.columns), dtype=torch.bool)}

    def reset(self, carry: dict) -> dict:
        """Forget the tangent (OHO's `reset_every`)."""
        return self.init()

    def _block(self, key: str, t: int) -> int | None:
        sched = self.schedules[key]
        return None if sched is None else sched.block(t, self.horizon)

    def _direct(self, t: int) -> list[bool]:
        """Per column: does step t's update depend directly on its hyperparameter (a global
        one, or the schedule block that step t is in)?"""
        return [c.block is None or c.block == self._block(c.leaf, t) for c in self.columns]

    def current(self, leaves: dict[str, torch.Tensor], t: int) -> dict[str, torch.Tensor]:
        """The per-step values of every leaf at step t (block k of a schedule)."""
        out = {}
        for key, v in leaves.items():
            k = self._block(key, t)
            out[key] = (v if k is None else v[k]).detach()
        return out

    def _direction(self, active: tuple[int, ...], direct: tuple[bool, ...],
                   hp_cur: dict[str, torch.Tensor], params: dict[str, torch.Tensor]):
        """The stacked hyperparameter tangents of the active columns: one-hot rows per leaf
        (shape (columns, *leaf)), and the same broadcast against each parameter's shape."""
        sig = (active, direct)
        if sig not in self._directions:
            rows = {k: torch.zeros((len(active), *v.shape), dtype=v.dtype, device=v.device)
                    for k, v in hp_cur.items()}
            for a, (j, d) in enumerate(zip(active, direct)):
                if d:
                    for m in self.columns[j].members:
                        rows[m.leaf][a].view(-1)[m.elem] = 1.0
            self._directions[sig] = (rows, per_param_rows(rows, params))
        return self._directions[sig]

    def step(self, carry: dict, state: InnerState, batch, leaves: dict[str, torch.Tensor],
             t: int) -> tuple[InnerState, dict, torch.Tensor]:
        """Advance s_t -> s_{t+1} and Z_t -> Z_{t+1} with exact JVPs (Franceschi et al.
        2017, Eq. 14)."""
        started = carry["started"].tolist()
        Z = carry["Z"] or None
        if self._fused is not None and Z is not None and all(started):
            return self._fused_step(Z, started, state, batch, leaves, t)
        direct_all = self._direct(t)
        # columns of blocks that have not started (or finished before a reset) stay zero
        active = tuple(j for j, c in enumerate(self.columns) if started[j] or direct_all[j])
        direct = tuple(direct_all[j] for j in active)
        full = len(active) == len(self.columns)
        idx = None if full or not active else torch.tensor(active, device=leaves_device(leaves))
        Z_active = Z
        if Z is not None and idx is not None:
            Z_active = {k: {n: z.index_select(0, idx) for n, z in d.items()} for k, d in Z.items()}
        new, new_Z, loss = self.tangent_step(
            state, batch, leaves, t, Z_active, direct,
            lambda hp, params: self._direction(active, direct, hp, params))
        if not active:
            return new, carry, loss
        if not full:
            # the carry is never written in place: a snapshot of it stays what it was
            merged = {k: {n: z.new_zeros((len(self.columns), *z.shape[1:]))
                          for n, z in d.items()} for k, d in new_Z.items()} if Z is None \
                else {k: {n: z.clone() for n, z in d.items()} for k, d in Z.items()}
            for k, d in new_Z.items():
                for n, z in d.items():
                    merged[k][n].index_copy_(0, idx, z)
            new_Z = merged
        now_started = carry["started"]
        if not all(started[j] for j in active):  # (never written in place: copy, then mark)
            now_started = now_started.clone()
            now_started[list(active)] = True
        return new, {"Z": new_Z, "started": now_started}, loss

    def tangent_step(self, state: InnerState, batch, leaves: dict[str, torch.Tensor], t: int,
                     Z, direct: tuple[bool, ...], directions, hz=None):
        """One inner step and the stacked tangent columns `Z` (None: zero) advanced along it:
        Z' = ∂Φ/∂s·Z + ∂Φ/∂λ·d for each column's hyperparameter direction d, which
        `directions(hp, params)` gives as (rows per leaf, rows per parameter); `direct[a]` says
        whether column a has one at this step, `hz[a]` False that its Z is zero (None: any may
        be nonzero). No columns (`direct == ()`): a plain step.
        Returns (s_{t+1}, Z', training loss)."""
        problem, opt = self.problem, self.problem.optimizer
        if batch is None:
            batch = problem.train_batch(t)
        hp_cur = {k: v.clone().requires_grad_(True) for k, v in self.current(leaves, t).items()}
        params = {n: p.detach().requires_grad_(True) for n, p in state.params.items()}
        fd = self.hvp != "autodiff"
        graph = not fd or self._mixed is not False
        rng = rng_snapshot(problem.device) if fd else None
        with self._kinks.record() if fd and self._kinks else nullcontext():
            loss, g, buffers, g_hp = problem.train_grad(
                params, state.buffers, batch, unflatten(hp_cur, self.like), create_graph=graph,
                wrt=hp_cur if graph else None)
        if fd and self._mixed is None:
            self._mixed = any(x is not None and x.requires_grad for x in g_hp.values())
        keys = list(hp_cur)
        primal_p = {n: p.detach() for n, p in params.items()}
        primal_o = tensor_state(state.opt)
        primal_g = {n: x.detach() for n, x in g.items()}
        if self.clamp_grad is not None:
            c = self.clamp_grad
            # d clamp(g)/dθ·Z = mask ⊙ (H·Z): the rows below are masked once computed
            keep = {n: (x.abs() <= c).to(x.dtype) for n, x in primal_g.items()}
            primal_g = {n: x.clamp(-c, c) for n, x in primal_g.items()}
        primal_h = {k: v.detach() for k, v in hp_cur.items()}
        hp_struct = unflatten(primal_h, self.like)

        def advanced(new_params, new_state) -> InnerState:
            opt_state = with_tensor_state({"step": state.opt["step"] + 1},
                                          tensor_state(new_state))
            return InnerState(new_params, opt_state, buffers, state.t + 1)

        n = len(direct)
        rule = self.use_tangent_rule and getattr(opt, "tangent", None) is not None
        if not n or not rule:
            with torch.no_grad():
                new = advanced(*opt.update(primal_p, state.opt, primal_g, hp_struct))
            if not n:
                return new, None, loss.detach()
        rows, dhp = directions(primal_h, primal_p)
        product = None
        if fd:
            grad0 = {n: x.detach() for n, x in g.items()}  # unclamped, unlike primal_g

            def product(v):
                return finite_difference_hvp(problem, primal_p, state.buffers, batch, hp_struct,
                                             v, grad0, self.hvp == "central_difference",
                                             rng=rng, kinks=self._kinks)
        dg = self._dgrad(params, g, g_hp, keys, rows, Z, direct, n, hz, product)
        if self.clamp_grad is not None:
            dg = {k: d * keep[k] for k, d in dg.items()}
        if Z is None:
            Z = {"params": {k: p.new_zeros((n, *p.shape)) for k, p in primal_p.items()},
                 **{k: {m: x.new_zeros((n, *x.shape)) for m, x in d.items()}
                    for k, d in primal_o.items()}}
        to = {k: Z[k] for k in primal_o}
        if rule:
            with torch.no_grad():
                new_params, new_state, dp, do = opt.update_and_tangent(
                    primal_p, state.opt, primal_g, hp_struct, Z["params"], to, dg, dhp)
            new = advanced(new_params, new_state)
        else:
            dp, do = self._jvp_fallback(state.opt, primal_p, primal_o, primal_g, primal_h,
                                        Z["params"], to, dg, rows)
        return new, {"params": dp, **do}, loss.detach()

    def _fused_step(self, Z, started, state: InnerState, batch, leaves, t: int):
        """`step` by the compiled pure function, every column at once."""
        if batch is None:
            batch = self.problem.train_batch(t)
        hp_cur = self.current(leaves, t)
        direct = tuple(self._direct(t))
        rows, dhp = self._direction(tuple(range(len(self.columns))), direct, hp_cur,
                                    state.params)
        opt_keys = list(tensor_state(state.opt))
        new_p, new_buffers, new_opt, dp, do, loss = self._fused(
            state.params, state.buffers, state.opt, Z["params"],
            {k: Z[k] for k in opt_keys}, batch, hp_cur, rows, dhp)
        self.hvps += len(self.columns)
        carry = {"Z": {"params": dp, **do}, "started": torch.ones(len(started), dtype=torch.bool)}
        return InnerState(new_p, new_opt, new_buffers, state.t + 1), carry, loss.detach()

    def _dgrad(self, params, g, g_hp, keys, rows, Z, direct, n_active, hz=None, product=None):
        """Rows of d(∇L)/dλ along each column: H·Zθ + ∂²L/∂θ∂λ·e_j, one backward per row
        (g's vector-Jacobian product with Zθ; the Hessian is symmetric). `hz[a]` False says
        column a's Z is zero, so its H·Z product is skipped. `product(v)`: H·v by
        differences instead (hvp != "autodiff")."""
        mixed = [k for k in keys if g_hp.get(k) is not None and g_hp[k].requires_grad]
        if Z is None and not mixed:
            return {n: p.new_zeros((n_active, *p.shape)) for n, p in params.items()}
        if product is not None:
            return self._dgrad_fd(product, params, g_hp, mixed, rows, Z, direct, n_active, hz)
        if self.batched_rows and hz is None and self.clamp_hz is None:
            return self._dgrad_batched(params, g, g_hp, mixed, rows, Z, direct, n_active)
        names = [n for n, gn in g.items() if gn.requires_grad] if Z is not None else []
        outputs = [g[n] for n in names]
        out_rows: list[list[torch.Tensor]] = []
        for a in range(n_active):
            use_z = Z is not None and (hz is None or hz[a])
            grad_outputs = [Z["params"][n][a] for n in names] if use_z else []
            outs = list(outputs) if use_z else []
            if direct[a]:
                outs += [g_hp[k] for k in mixed]
                grad_outputs += [rows[k][a] for k in mixed]
            if not outs:
                out_rows.append([None] * len(params))
                continue
            if use_z:
                self.hvps += 1
            if self.clamp_hz is not None and use_z and outputs:
                out_rows.append(self._clamped_row(outputs, grad_outputs, outs, params))
                continue
            out_rows.append(list(self.problem.vjp(outs, list(params.values()), grad_outputs,
                                                  retain_graph=True)))
        return {n: torch.stack([p.new_zeros(p.shape) if r[i] is None else r[i].detach()
                                for r in out_rows])
                for i, (n, p) in enumerate(params.items())}

    def _dgrad_fd(self, product, params, g_hp, mixed, rows, Z, direct, n_active, hz):
        """`_dgrad` with H·Zθ by `product` (differences of gradients), one row at a time; the
        mixed ∂²L/∂θ∂λ part stays a vector-Jacobian product."""
        plist = list(params.values())
        out_rows: list[dict] = []
        for a in range(n_active):
            row: dict = {}
            if Z is not None and (hz is None or hz[a]):
                row = product({n: Z["params"][n][a] for n in params}) or {}
                if row:
                    self.hvps += 1
                if self.clamp_hz is not None:
                    row = {n: h.clamp(-self.clamp_hz, self.clamp_hz) for n, h in row.items()}
            if direct[a] and mixed:
                got = self.problem.vjp([g_hp[k] for k in mixed], plist,
                                       [rows[k][a] for k in mixed], retain_graph=True)
                for n, m in zip(params, got):
                    if m is not None:
                        row[n] = m if row.get(n) is None else row[n] + m
            out_rows.append(row)
        return {n: torch.stack([p.new_zeros(p.shape) if r.get(n) is None else r[n].detach()
                                for r in out_rows])
                for n, p in params.items()}

    def _dgrad_batched(self, params, g, g_hp, mixed, rows, Z, direct, n_active):
        """`_dgrad` as one batched vector-Jacobian product over all columns (columns without
        a direct hyperparameter have zero rows, so the mixed term adds nothing to them)."""
        names = [n for n, gn in g.items() if gn.requires_grad] if Z is not None else []
        outs = [g[n] for n in names]
        grad_outputs = [Z["params"][n] for n in names]
        if any(direct):
            outs += [g_hp[k] for k in mixed]
            grad_outputs += [rows[k] for k in mixed]
        if not outs:
            return {n: p.new_zeros((n_active, *p.shape)) for n, p in params.items()}
        if names:
            self.hvps += n_active
        got = self.problem.vjp(outs, list(params.values()), grad_outputs, retain_graph=True,
                               batched=True)
        return {n: p.new_zeros((n_active, *p.shape)) if r is None else r.detach()
                for (n, p), r in zip(params.items(), got)}

    def _clamped_row(self, outputs, grad_outputs, outs, params):
        """One row of `_dgrad` with its H·Z part clamped to ±clamp_hz before the mixed
        ∂²L/∂θ∂λ part is added (Micaelli & Storkey 2021)."""
        plist = list(params.values())
        hz = self.problem.vjp(outputs, plist, grad_outputs[:len(outputs)], retain_graph=True)
        row = [None if h is None else h.clamp(-self.clamp_hz, self.clamp_hz) for h in hz]
        if len(outs) > len(outputs):
            mixed = self.problem.vjp(outs[len(outputs):], plist, grad_outputs[len(outputs):],
                                     retain_graph=True)
            row = [m if r is None else r if m is None else r + m for r, m in zip(row, mixed)]
        return row

    def _jvp_fallback(self, opt_state, primal_p, primal_o, primal_g, primal_h, tp, to, dg, rows):
        """`torch.func.jvp` of the optimizer's update, one column at a time (optimizers
        without a hand-written tangent rule)."""
        opt = self.problem.optimizer

        def update(p, o, gr, h):
            new_p, new_o = opt.update(p, with_tensor_state(opt_state, o), gr,
                                      unflatten(h, self.like))
            return new_p, tensor_state(new_o)

        def pick(d, a):
            return {n: x[a] for n, x in d.items()}

        cols = []
        for a in range(next(iter(tp.values())).shape[0]):
            _, out = jvp(update, (primal_p, primal_o, primal_g, primal_h),
                         (pick(tp, a), {k: pick(d, a) for k, d in to.items()}, pick(dg, a),
                          pick(rows, a)))
            cols.append(out)
        dp = {n: torch.stack([c[0][n] for c in cols]) for n in tp}
        do = {k: {n: torch.stack([c[1][k][n] for c in cols]) for n in d} for k, d in to.items()}
        return dp, do

    def readout(self, carry: dict, state: InnerState, val_batch
                ) -> tuple[float, dict[str, torch.Tensor]]:
        """E(s_t) and dE/dλ = ∇E(θ_t) · Z_t^θ for every leaf (natural units)."""
        value, c, _ = self.problem.val_grad(state.params, state.buffers, val_batch)
        grads = {k: torch.zeros_like(v) for k, v in flatten(self.like).items()}
        if not carry["Z"]:
            return value.item(), grads
        Zp = carry["Z"]["params"]
        # dots[n][j] = <∇E restricted to parameter n, column j's weight tangent>
        dots = {n: Zp[n].reshape(Zp[n].shape[0], -1) @ c[n].reshape(-1) for n in c}
        total = sum(dots.values())
        for j, col in enumerate(self.columns):
            if len(col.members) == 1:
                m = col.members[0]
                grads[m.leaf].view(-1)[m.index] = total[j]
                continue
            for m in col.members:  # summed tangent: read back restricted to the member's part
                if m.per == "layer":
                    val = dots[m.param][j]
                elif m.per == "parameter":
                    val = c[m.param].reshape(-1)[m.elem] * Zp[m.param][j].reshape(-1)[m.elem]
                else:
                    val = total[j]
                grads[m.leaf].view(-1)[m.index] = val
        return value.item(), grads

    @staticmethod
    def tangent_norm(carry: dict) -> float:
        """Frobenius norm of the weight part of Z."""
        if not carry["Z"]:
            return 0.0
        norms = [torch.linalg.vector_norm(z) for z in carry["Z"]["params"].values()]
        return float(torch.linalg.vector_norm(torch.stack(norms)))


def forward_engine(problem: Problem, horizon: int, tangent="exact", compile: bool | dict = False,
                   clamp_grad: float | None = None, clamp_hz: float | None = None,
                   uoro_samples: int = 1, seed: int | None = None,
                   batched_rows: bool | None = None, uoro_blocks: str = "all",
                   uoro_centred: bool = False, hvp: str = "autodiff") -> ForwardTangent:
    """The forward engine for a `tangent` choice: a column grouping of the exact engine, or
    "uoro" (the rank-one estimate of Tallec & Ollivier 2018; hypergrad/uoro.py)."""
    check_hvp(hvp)
    if tangent == "uoro":
        from .uoro import UOROTangent

        if compile:
            raise HyperparameterError("tangent='uoro' does not run with compile=True")
        return UOROTangent(problem, horizon, uoro_samples,
                           problem.seed if seed is None else seed, clamp_grad, clamp_hz,
                           uoro_blocks, uoro_centred, hvp)
    for name, v, default in (("uoro_samples", uoro_samples, 1), ("uoro_blocks", uoro_blocks, "all"),
                             ("uoro_centred", uoro_centred, False)):
        if v != default:
            raise HyperparameterError(f"{name}={v!r} needs tangent='uoro'")
    return ForwardTangent(problem, horizon, tangent, compile=compile, clamp_grad=clamp_grad,
                          clamp_hz=clamp_hz, batched_rows=batched_rows, hvp=hvp)


def forward(problem: Problem, steps: int, values: dict, *, tangent="exact",
            compile: bool | dict = False, clamp_grad: float | None = None,
            clamp_hz: float | None = None, uoro_samples: int = 1,
            seed: int | None = None, batched_rows: bool | None = None,
            uoro_blocks: str = "all", uoro_centred: bool = False,
            hvp: str = "autodiff") -> HypergradResult:
    """Forward-mode hypergradient after `steps` inner steps (memory constant in T).

    tangent="summed" is OHO's approximation (one tangent per hyperparameter name, read back
    per layer); it is exact only when the Hessian has no cross-layer blocks. tangent="uoro" is
    an unbiased rank-one estimate (Tallec & Ollivier 2018) at one Hessian-vector product a step
    per sample whatever the number of hyperparameters, averaged over `uoro_samples`
    independent samples, its signs drawn from `seed` (default: the problem's). compile=True
    (or a dict of `torch.compile` options) runs each step as one compiled function; the
    compilation itself (seconds on CPU; benchmarks/results/hypergrad_cost.md) is in `stats["wall_time_s"]`. clamp_grad /
    clamp_hz bound the training gradient and H·Z elementwise (Micaelli & Storkey 2021).
    batched_rows: all Hessian-vector rows of a step in one vmapped backward (default: on CUDA).
    hvp="finite_difference" / "central_difference": Hessian-vector products by differences of
    gradients, an approximation (ForwardTangent; `finite_difference_hvp`).
    """
    with CostMeter(problem.device) as meter:
        engine = forward_engine(problem, steps, tangent, compile, clamp_grad, clamp_hz,
                                uoro_samples, seed, batched_rows, uoro_blocks, uoro_centred,
                                hvp)
        value, grads = run(engine, problem, steps, values, meter)
        meter.hvps = engine.hvps
    return finish(problem, values, value, grads,
                  meter.stats(method="forward", steps=steps, columns=len(engine.columns)))
