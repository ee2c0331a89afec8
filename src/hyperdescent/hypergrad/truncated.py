"""Truncated reverse mode: backprop through the last `window` steps only (Shaban et al. 2019)."""

from __future__ import annotations

import torch

from ..errors import HyperparameterError
from ..problem import InnerState, Problem
from ..space import flatten, unflatten
from .common import CostMeter, HypergradResult, finish
from .reverse import unrolled_hypergrad


def truncated(problem: Problem, steps: int, values: dict, *, window: int = 10
              ) -> HypergradResult:
    """K-step truncated backprop: s_{T-K} is held constant; window >= T equals reverse."""
    problem.require_replayable("truncated")
    check_window(window)
    start = max(0, steps - window)
    with CostMeter(problem.device) as meter:
        value, grads, extra = unrolled_hypergrad(problem, steps, values, start, meter=meter)
        meter.hvps = extra.pop("hvps")
    return finish(problem, values, value, grads,
                  meter.stats(method="truncated", steps=steps, window=window, **extra))


def check_window(window) -> None:
    """Refuse a truncation window that is not an integer >= 1."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise HyperparameterError(f"window must be an integer >= 1, got window={window!r}")


class TruncatedWindow:
    """The truncated engine (Shaban et al. 2019) for online use: the carry keeps the last
    `window` steps as (state before the step, step index, batch or None, λ) and `readout`
    backprops through them from the oldest state, held constant.

    A batch the problem can replay (batch t of tensor data) is stored as None and drawn again
    by its index; only batches given from outside, or drawn from a stream, are kept.
    """

    def __init__(self, problem: Problem, horizon: int, window: int = 10):
        check_window(window)
        self.problem, self.horizon, self.window = problem, horizon, window
        self.like = problem.real_hparams()
        self.hvps = 0

    def init(self) -> dict:
        """An empty window."""
        return {"window": []}

    def reset(self, carry: dict) -> dict:
        """Forget the window."""
        return self.init()

    def step(self, carry: dict, state: InnerState, batch, leaves: dict[str, torch.Tensor],
             t: int) -> tuple[InnerState, dict, torch.Tensor]:
        """One plain inner step (no graph); the step joins the window. batch=None: the
        problem's training batch t."""
        problem = self.problem
        replay = batch is None and problem.replayable
        if batch is None:
            batch = problem.train_batch(t)
        new_state, loss = problem.step(state, batch, problem.hp_at(
            unflatten(leaves, self.like), t, self.horizon))
        entry = {"state": state, "t": t, "batch": None if replay else batch, "leaves": leaves}
        return new_state, {"window": (carry["window"] + [entry])[-self.window:]}, loss

    def readout(self, carry: dict, state: InnerState, val_batch
                ) -> tuple[float, dict[str, torch.Tensor]]:
        """E(s_t) and dE/dλ through the window's steps (zero before any step)."""
        window = carry["window"]
        if not window:
            value, _, _ = self.problem.val_grad(state.params, state.buffers, val_batch)
            return value.item(), {k: torch.zeros_like(v) for k, v in flatten(self.like).items()}
        steps = [(e["t"], self.problem.train_batch(e["t"]) if e["batch"] is None else e["batch"])
                 for e in window]
        self.hvps += len(steps) - 1
        # every step of the window is replayed at the newest step's values (those now in use)
        return window_hypergrad(self.problem, window[0]["state"], steps, window[-1]["leaves"],
                                self.horizon, val_batch)

    @staticmethod
    def tangent_norm(carry: dict) -> float:
        """No tangent is carried: 0."""
        return 0.0


def window_hypergrad(problem: Problem, start, batches, leaves, horizon: int, val_batch):
    """Backprop through explicit (t, batch) steps from a held-constant state (online truncation).

    Returns (E after the window, dE/dλ for each natural leaf).
    """
    lam = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    values = unflatten(lam, problem.real_hparams())
    s = start.detached()
    for t, batch in batches:
        s, _ = problem.step(s, batch, problem.hp_at(values, t, horizon), create_graph=True)
    out = problem.val_loss(s.params, s.buffers, val_batch)
    got = problem.grad(out, list(lam.values()))
    return out.item(), {k: (g if g is not None else torch.zeros_like(lam[k]))
                        for k, g in zip(lam, got)}
