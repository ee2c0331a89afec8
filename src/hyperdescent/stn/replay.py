"""Replay an STN's learned dropout trajectory in an ordinary model trained with torch.optim."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..errors import HyperparameterError
from ..tuners.schedule import Schedule


def attach_dropout(schedule: Schedule, model: nn.Module, names: Sequence[str],
                   optimizer) -> object:
    """Set `model`'s nn.Dropout rates (in module order, named by `names`) to step t's values of
    `schedule` before the forward pass of step t; returns the optimizer hook's handle.

    Rates for step 0 are set now; each `optimizer.step()` moves to the next step's values (the
    retraining of MacKay et al. 2019, Table 1: an ordinary network under the STN's schedule).
    """
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    names = list(names)
    if len(drops) != len(names):
        raise HyperparameterError(f"the model has {len(drops)} nn.Dropout layer(s) but names= "
                                  f"gives {len(names)}: {names}")
    missing = [n for n in names if n not in schedule.at(0)]
    if missing:
        raise HyperparameterError(f"the schedule has no value for {missing}; it has "
                                  f"{sorted(schedule.at(0))}")
    counter = {"t": 0}

    def apply() -> None:
        values = schedule.at(counter["t"])
        for m, n in zip(drops, names):
            m.p = float(values[n])

    def hook(opt, args, kwargs) -> None:
        counter["t"] += 1
        apply()

    apply()
    return optimizer.register_step_post_hook(hook)
