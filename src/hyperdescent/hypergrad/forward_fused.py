"""One forward-mode (RTRL) step as a single pure function, compiled with `torch.compile`.

The same exact step as `ForwardTangent.step` (Franceschi et al. 2017, Eq. 14): the gradient
and every column's H·Zθ (+ ∂²L/∂θ∂λ·e_j for regularizer hyperparameters) come from
`torch.func.jvp` of `torch.func.grad` (forward-over-reverse), `vmap`-ed over the stacked
tangent columns, followed by the optimizer's hand-written tangent rule. Eager, that
formulation is slower than double backward; compiled, the columns' matrix products batch
into one and the elementwise tangent arithmetic fuses, which is what makes it cheaper.

BatchNorm running statistics cannot be updated in place inside the transforms; there the
layers get None for them (batch statistics, which is what training mode uses anyway) and a
separate no-grad forward updates them, as the eager step's training forward does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.func import grad, jvp, vmap

from ..errors import HyperparameterError
from ..optim.base import tensor_state, with_tensor_state
from ..problem import Problem
from ..space import flatten, unflatten

Params = dict[str, torch.Tensor]


def running_buffers(model: torch.nn.Module) -> set[str]:
    """Names of the buffers a training-mode forward updates in place: the running statistics
    of BatchNorm / InstanceNorm layers."""
    from torch.nn.modules.batchnorm import _NormBase

    return {f"{m}.{b}" if m else b for m, mod in model.named_modules()
            if isinstance(mod, _NormBase) for b, _ in mod.named_buffers(recurse=False)}


def fused_unsupported(problem: Problem) -> str | None:
    """Why the compiled step cannot run this problem (None when it can)."""
    if getattr(problem.optimizer, "tangent", None) is None:
        return f"{type(problem.optimizer).__name__} has no hand-written tangent rule"
    return None


def fused_step(problem: Problem, like: dict[str, Any], options: dict | None = None) -> Callable:
    """`make_fused_step`, cached on the problem: every engine on one problem (a tuner's
    resets, a benchmark's repetitions) shares one compilation, and torch.compile's limit on
    recompilations of one function is not spent on copies of the same step."""
    key = (tuple((k, tuple(v.shape)) for k, v in flatten(like).items()),
           repr(sorted((options or {}).items())))
    cache = problem.compiled_steps
    if key not in cache:
        cache[key] = make_fused_step(problem, like, options)
    return cache[key]


def make_fused_step(problem: Problem, like: dict[str, Any], options: dict | None = None
                    ) -> Callable:
    """A compiled `(params, buffers, opt_state, Zθ, Z_opt, batch, hp, rows, dhp) -> (params',
    buffers', state', Zθ', Z_opt', loss)`: one exact RTRL step for every column at once."""
    why = fused_unsupported(problem)
    if why is not None:
        raise HyperparameterError(f"compile=True cannot be used here: {why}")
    opt = problem.optimizer
    running = running_buffers(problem.model)

    def train_loss(params: Params, hp_leaves: Params, x, y, buffers: Params):
        loss, _ = problem.train_loss(params, buffers, (x, y), unflatten(hp_leaves, like))
        return loss, loss

    grad_and_loss = grad(train_loss, has_aux=True)

    def step(params: Params, buffers: Params, opt_state: dict, z_params: Params, z_opt: dict,
             x, y, hp_leaves: Params, rows: Params, dhp: dict):
        new_buffers = {n: b.clone() for n, b in buffers.items()}
        if running:
            with torch.no_grad():
                problem.forward(params, new_buffers, x, True)
        inside = {n: None if n in running else b for n, b in buffers.items()}

        def column(zp, row):
            (g, loss), (dg, _) = jvp(lambda p, h: grad_and_loss(p, h, x, y, inside),
                                     (params, hp_leaves), (zp, row))
            return g, loss, dg

        g, loss, dg = vmap(column, out_dims=(None, None, 0))(z_params, rows)
        new_p, new_state, dp, do = opt.update_and_tangent(
            params, opt_state, g, unflatten(hp_leaves, like), z_params, z_opt, dg, dhp)
        return new_p, new_buffers, tensor_state(new_state), dp, do, loss

    # static shapes: after seeing a second model, automatic dynamic shapes would make the
    # conv layers' shapes symbolic, which functorch's transforms refuse under torch.compile
    compiled = torch.compile(step, **{"dynamic": False, **(options or {})})

    def run(params, buffers, opt_state, z_params, z_opt, batch, hp_leaves, rows, dhp):
        x, y = batch
        problem._set_mode(True)  # outside the compiled region: a Python-side module flag
        # torch.compile specializes on Python ints, so the step counter must not reach it as
        # one: an optimizer that only asks "is this step 0" sees 0 or 1, and one that counts
        # steps (Adam's bias correction) gets a float64 tensor
        seen = dict(opt_state)
        if opt.counts_steps:
            seen["step"] = torch.tensor(float(opt_state["step"]), dtype=torch.float64,
                                        device=x.device)
        else:
            seen["step"] = min(opt_state["step"], 1)
        new_p, new_buffers, new_tensors, dp, do, loss = compiled(
            params, buffers, seen, z_params, z_opt, x, y, hp_leaves, rows, dhp)
        new_state = with_tensor_state({"step": opt_state["step"] + 1}, new_tensors)
        return new_p, new_buffers, new_state, dp, do, loss

    return run
