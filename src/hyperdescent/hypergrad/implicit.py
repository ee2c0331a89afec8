"""Implicit differentiation at the final weights (IFT; Bengio 2000, Pedregosa 2016).

At a fixed point F(θ*, λ) = ∇L_train(θ*, λ) + wd·θ* = 0 (weight decay that the optimizer
couples to the gradient is part of it), dE/dλ = ∂E/∂λ − q^T ∂F/∂λ with A q = ∇_θ E and
A = ∂F/∂θ. q comes from a truncated Neumann series (Lorraine et al. 2020, Eq. 8) or
conjugate gradient, with exact Hessian-vector products.
"""

from __future__ import annotations

import torch

from ..errors import HyperparameterError
from ..optim.base import axpy
from ..problem import Problem
from .common import (
    CostMeter,
    HypergradResult,
    finish,
    hp_values,
    natural_leaves,
    run_plain,
    sample_memory,
)


def _refuse_non_stationary(problem: Problem) -> None:
    opt = problem.optimizer
    refused = set(opt.non_stationary)
    bad = [n for n in problem.bound.real_names() if n in refused]
    if bad:
        raise HyperparameterError(
            f"method 'implicit' cannot differentiate hyperparameter(s) {bad} of "
            f"{type(opt).__name__}: the fixed point ∇L + wd·θ = 0 does not depend on them the "
            f"way the implicit function theorem assumes; use 'forward' or 'reverse', or tune "
            f"only regularization hyperparameters with 'implicit'")
    wd = opt.fixed.get("weight_decay", 0.0)
    if opt.decoupled_weight_decay and not (isinstance(wd, float) and wd == 0.0):
        raise HyperparameterError(
            f"method 'implicit' refuses {type(opt).__name__} with decoupled weight decay "
            f"(weight_decay={wd}): its fixed point is not a stationary point of the training "
            f"loss; use weight_decay=0 or an optimizer with coupled weight decay")


def neumann_solve(hvp, v: list[torch.Tensor], alpha: float, terms: int) -> list[torch.Tensor]:
    """q ≈ α Σ_{i=0}^{terms} (I − αA)^i v (Lorraine et al. 2020, Alg. 3)."""
    p = [x.clone() for x in v]
    acc = [x.clone() for x in v]
    for _ in range(terms):
        # foreach: one call over all parameters instead of one small kernel call each
        torch._foreach_add_(p, hvp(p), alpha=-alpha)
        torch._foreach_add_(acc, p)
    return torch._foreach_mul(acc, alpha)


def cg_solve(hvp, b: list[torch.Tensor], iters: int, tol: float) -> tuple[list[torch.Tensor], int]:
    """Conjugate gradient for A x = b with A symmetric positive definite (Hestenes-Stiefel)."""
    dot = lambda a, c: sum((ai * ci).sum() for ai, ci in zip(a, c))  # noqa: E731
    x = [torch.zeros_like(bi) for bi in b]
    r = [bi.clone() for bi in b]
    p = [ri.clone() for ri in r]
    rs = dot(r, r)
    b_norm = dot(b, b).sqrt()
    used = 0
    for _ in range(iters):
        if rs.sqrt() <= tol * max(b_norm, 1e-300):
            break
        Ap = hvp(p)
        used += 1
        alpha = rs / dot(p, Ap)
        x = [xi + alpha * pi for xi, pi in zip(x, p)]
        r = [ri - alpha * ai for ri, ai in zip(r, Ap)]
        rs_new = dot(r, r)
        p = [ri + (rs_new / rs) * pi for ri, pi in zip(r, p)]
        rs = rs_new
    return x, used


def implicit(problem: Problem, steps: int, values: dict, *, solver: str = "neumann",
             terms: int = 20, iters: int = 100, tol: float = 1e-10,
             alpha: float | None = None) -> HypergradResult:
    """IFT hypergradient at the weights after `steps` inner steps (Neumann or CG solver)."""
    problem.bound.space.require_differentiable("implicit")
    _refuse_non_stationary(problem)
    if solver not in ("neumann", "cg"):
        raise HyperparameterError(f"solver={solver!r} is not one of 'neumann', 'cg'")
    opt = problem.optimizer
    with CostMeter(problem.device) as meter:
        lam = natural_leaves(values, requires_grad=True)
        values_d = hp_values(values, {k: v.detach() for k, v in lam.items()})
        with meter.phase("forward"):
            state = run_plain(problem, problem.init_state(), 0, steps, values_d, steps)
        hp = problem.hp_at(hp_values(values, lam), max(steps - 1, 0), max(steps, 1))
        params = {n: p.detach().requires_grad_(True) for n, p in state.params.items()}
        plist = list(params.values())
        lam_list = list(lam.values())
        with torch.enable_grad(), meter.phase("backward"):
            value = problem.val_loss(params, state.buffers, problem.val_batch(steps))
            got = problem.grad(value, plist + lam_list)
            v = [g if g is not None else torch.zeros_like(p) for g, p in zip(got, plist)]
            direct = got[len(plist):]
            loss, _ = problem.train_loss(params, state.buffers,
                                         problem.train_batch(max(steps - 1, 0)), hp)
            g = problem.grad(loss, plist, create_graph=True)
            F, decay = [], []
            for (n, p), gi in zip(params.items(), g):
                wd = opt.value(hp, "weight_decay", n) if "weight_decay" in opt.fixed else 0.0
                F.append(axpy(gi, wd, p))
                decay.append(wd.detach() if isinstance(wd, torch.Tensor) else wd)

        def hvp(u):
            # A·u = H·u + wd·u: the weight-decay part of ∂F/∂θ is diagonal, so it is added
            # directly instead of backpropagating through wd·θ
            meter.hvps += 1
            out = problem.vjp(g, plist, u, retain_graph=True)
            return [axpy(o if o is not None else torch.zeros_like(x), wd, x)
                    for o, x, wd in zip(out, u, decay)]

        extra = {}
        with meter.phase("solve"):
            if solver == "neumann":
                step = alpha if alpha is not None else float(opt.fixed["lr"])
                q = neumann_solve(hvp, v, step, terms)
                extra = {"terms": terms, "alpha": step}
            else:
                q, used = cg_solve(hvp, v, iters, tol)
                extra = {"cg_iters": used}
        sample_memory()  # the training gradient's graph and the solver's vectors are alive
        with meter.phase("backward"):
            mixed = problem.vjp(F, lam_list, q)
        grads = {}
        for key, d, m in zip(lam, direct, mixed):
            total = torch.zeros_like(lam[key])
            if d is not None:
                total = total + d
            if m is not None:
                total = total - m
            grads[key] = total
    return finish(problem, values, value.item(), grads,
                  meter.stats(method="implicit", steps=steps, solver=solver, **extra))
