"""The engine seam: how every hypergradient method advances training and reads dE/dλ.

An engine is bound to a problem and a horizon and has four methods, in the spirit of jaxopt's
`init_state`/`update` (Blondel et al. 2022, "Efficient and modular implicit differentiation"):

    init() -> carry                                       the method's own state at s_0
    step(carry, s_t, batch_t, λ, t) -> (s_{t+1}, carry', train loss)
    readout(carry, s_t, val_batch) -> (E(s_t), dE/dλ in natural units, per flat leaf)
    reset(carry) -> carry                                 forget (OHO's reset_every)

The carry holds tensors only (dicts and lists of them), so a tuner's state record can save it
and a snapshot can copy it; an engine never writes a carry in place. Online tuners call
`step`/`readout` themselves; offline methods are `run(engine, problem, T, values)`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ..problem import InnerState, Problem
from ..space import flatten

Carry = dict[str, Any]


class Engine(Protocol):
    """What a hypergradient engine provides (see the module docstring)."""

    def init(self) -> Carry: ...

    def step(self, carry: Carry, state: InnerState, batch, leaves: dict[str, torch.Tensor],
             t: int) -> tuple[InnerState, Carry, torch.Tensor]: ...

    def readout(self, carry: Carry, state: InnerState, val_batch
                ) -> tuple[float, dict[str, torch.Tensor]]: ...

    def reset(self, carry: Carry) -> Carry: ...


def run(engine: Engine, problem: Problem, steps: int, values: dict, meter=None
        ) -> tuple[float, dict[str, torch.Tensor]]:
    """Train `steps` steps from s_0 at hyperparameters `values` through `engine`, then read
    E(s_T) and dE/dλ on the validation batch of step T."""
    leaves = {k: v.detach().clone() for k, v in flatten(values).items()}
    state, carry = problem.init_state(hp=values), engine.init()
    phase = meter.phase if meter is not None else _no_phase
    with phase("forward"):
        for t in range(steps):
            state, carry, _ = engine.step(carry, state, problem.train_batch(t), leaves, t)
    with phase("readout"):
        return engine.readout(carry, state, problem.val_batch(steps))


class _no_phase:
    def __init__(self, name: str):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
