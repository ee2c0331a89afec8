"""A learned hyperparameter trajectory that replays in plain PyTorch training."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..optim.names import set_group_hparam


class Schedule:
    """Per-step natural hyperparameter values (step t uses `values[t]`; the last one holds)."""

    def __init__(self, values: Sequence[Mapping[str, Any]]):
        if not values:
            raise ValueError("a Schedule needs at least one step of values")
        self.values = [dict(v) for v in values]

    def __len__(self) -> int:
        return len(self.values)

    def at(self, t: int) -> dict[str, Any]:
        """Values for step t."""
        return self.values[min(max(t, 0), len(self.values) - 1)]

    def attach(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None):
        """Update `optimizer`'s param groups before each of its steps; returns the hook handle.

        Per-layer values need `model` (to name parameters) and one param group per tensor.
        """
        names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        counter = {"t": 0}

        def group_value(group, value, hp_name):
            if not isinstance(value, dict):
                return value
            if not names:
                raise ValueError(f"hyperparameter {hp_name!r} is per layer: pass model= to "
                                 f"Schedule.attach so parameters can be named")
            pnames = {names.get(id(p)) for p in group["params"]}
            vals = {value[p] for p in pnames if p in value}
            if len(vals) != 1:
                raise ValueError(f"hyperparameter {hp_name!r} is per layer: give the optimizer "
                                 f"one param group per parameter tensor")
            return vals.pop()

        def hook(opt, args, kwargs):
            vals = self.at(counter["t"])
            for group in opt.param_groups:
                for name, value in vals.items():
                    set_group_hparam(group, name, group_value(group, value, name))
            counter["t"] += 1

        return optimizer.register_step_pre_hook(hook)

    def to_json(self) -> str:
        """The trajectory as JSON (a list of per-step dicts)."""
        return json.dumps(self.values)

    @classmethod
    def from_json(cls, text: str) -> Schedule:
        """Inverse of `to_json`."""
        return cls(json.loads(text))
