"""Reverse mode: backprop through the unrolled run (Franceschi et al. 2017, Sec. 3.1).

With `checkpoint_every=k` only every k-th state is kept during a first pass without a graph;
the backward pass recomputes one segment at a time and carries the adjoint of the state
across segment boundaries, so memory is O(T/k + k) states instead of O(T).
"""

from __future__ import annotations

import math

import torch

from ..errors import HyperparameterError
from ..problem import InnerState, Problem
from .common import (
    CostMeter,
    HypergradResult,
    finish,
    hp_values,
    natural_leaves,
    run_plain,
    sample_memory,
)
from .engine import _no_phase


def _differentiable_start(state: InnerState) -> tuple[InnerState, list[torch.Tensor]]:
    """A detached copy of the state whose tensors require grad (a segment's inputs)."""
    tensors = {k: {n: x.detach().requires_grad_(True) for n, x in d.items()}
               for k, d in state.tensors().items()}
    flat = [x for d in tensors.values() for x in d.values()]
    return state.replace_tensors(tensors), flat


def unrolled_hypergrad(problem: Problem, steps: int, values: dict, start: int = 0,
                       segment: int | None = None, meter: CostMeter | None = None
                       ) -> tuple[float, dict, dict]:
    """dE(s_T)/dλ by backprop through steps start..T-1 (earlier steps are held constant).

    Returns (value, grads of the natural leaves, extra stats). `segment` is the checkpoint
    interval; None keeps the whole graph.
    """
    like = values
    lam = natural_leaves(like, requires_grad=True)
    values_d = hp_values(like, {k: v.detach() for k, v in lam.items()})
    values = hp_values(like, lam)
    lam_list = list(lam.values())
    horizon = steps
    phase = meter.phase if meter is not None else _no_phase
    with phase("plain"):
        state = run_plain(problem, problem.init_state(hp=values_d), 0, start, values_d,
                          horizon)
        seg = steps - start if segment is None else max(1, int(segment))
        bounds = list(range(start, steps, seg)) or [start]
        checkpoints = [state]
        for a, b in zip(bounds[:-1], bounds[1:]):
            state = run_plain(problem, state, a, b, values_d, horizon)
            checkpoints.append(state)
    grads = [torch.zeros_like(x) for x in lam_list]
    adjoint = None
    value = math.nan
    for i in range(len(bounds) - 1, -1, -1):
        a, b = bounds[i], (bounds[i + 1] if i + 1 < len(bounds) else steps)
        s, inputs = _differentiable_start(checkpoints[i])
        if i == 0 and start == 0 and "init_scale" in values:
            s = problem.init_state(hp=values)  # θ_0 = scale·θ_init, in the graph of the scale
        with phase("forward"):
            for t in range(a, b):
                s, _ = problem.step(s, problem.train_batch(t), problem.hp_at(values, t, horizon),
                                    create_graph=True)
            if adjoint is None:
                out = problem.val_loss(s.params, s.buffers, problem.val_batch(steps))
                value = out.item()
                outputs, grad_outputs = [out], [torch.ones_like(out)]
            else:
                ends = [x for d in s.tensors().values() for x in d.values()]
                pairs = [(o, g) for o, g in zip(ends, adjoint) if o.requires_grad]
                outputs, grad_outputs = [o for o, _ in pairs], [g for _, g in pairs]
        sample_memory()  # the segment's whole graph is alive here: the peak
        # the first segment's start is held constant, so its adjoint is not asked for: autograd
        # then prunes the first step's gradient graph (its vector-Hessian product), which
        # leads only to that start
        wrt = inputs + lam_list if i > 0 else lam_list
        with phase("backward"):
            got = problem.vjp(outputs, wrt, grad_outputs)
        if i > 0:
            adjoint = [g if g is not None else torch.zeros_like(x) for g, x in zip(got, inputs)]
        for j, g in enumerate(got[len(wrt) - len(lam_list):]):
            if g is not None:
                grads[j] = grads[j] + g
    # backpropagating the state adjoint through one step's gradient is one vector-Hessian
    # product (autograd does it inside the graph, never as a separate call); the first step's
    # is pruned
    return value, dict(zip(lam, grads)), {"segments": len(bounds),
                                          "hvps": max(0, steps - start - 1)}


def reverse(problem: Problem, steps: int, values: dict, *,
            checkpoint_every: int | None = None) -> HypergradResult:
    """Reverse-mode hypergradient over the whole run, optionally checkpointed (Griewank &
    Walther 2000, "Algorithm 799: revolve"; here uniform segments of `checkpoint_every`)."""
    problem.require_replayable("reverse")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int)
                                         or checkpoint_every < 1):
        raise HyperparameterError(
            f"checkpoint_every must be an integer >= 1 or None, got {checkpoint_every!r}")
    with CostMeter(problem.device) as meter:
        value, grads, extra = unrolled_hypergrad(problem, steps, values, 0, checkpoint_every,
                                                 meter)
        meter.hvps = extra.pop("hvps")
    return finish(problem, values, value, grads,
                  meter.stats(method="reverse", steps=steps, **extra))
