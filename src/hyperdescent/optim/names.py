"""Optimizer hyperparameter names, read off the optimizer classes, and their torch.optim keys."""

from __future__ import annotations

from typing import Any

from .adam import Adam, AdamW
from .base import Optimizer
from .rmsprop import RMSprop
from .sgd import SGD

#: the optimizers by the short name tasks and configs use
OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": SGD, "adam": Adam, "adamw": AdamW,
                                          "rmsprop": RMSprop}
#: the optimizers a bundled task trains with (`Task.optimizer`)
TASK_OPTIMIZERS = ("sgd", "adam")


def hyperparameter_names(optimizer: str | type[Optimizer] | Optimizer) -> tuple[str, ...]:
    """The names `hp` may override for an optimizer given by short name, class or instance."""
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise KeyError(f"unknown optimizer {optimizer!r}; known: {list(OPTIMIZERS)}")
        optimizer = OPTIMIZERS[optimizer]
    if isinstance(optimizer, type):
        optimizer = optimizer()
    return optimizer.hyperparameter_names


#: short optimizer name -> the hyperparameter names it takes
BY_OPTIMIZER: dict[str, tuple[str, ...]] = {k: hyperparameter_names(k) for k in OPTIMIZERS}
#: every name a task's optimizer takes, in first-seen order
TASK_HPARAMS: tuple[str, ...] = tuple(dict.fromkeys(
    n for k in TASK_OPTIMIZERS for n in BY_OPTIMIZER[k]))
#: every name any optimizer takes
ALL_HPARAMS: tuple[str, ...] = tuple(dict.fromkeys(n for v in BY_OPTIMIZER.values() for n in v))

# torch.optim keeps Adam's two betas as one tuple; every other name is its own group key
_BETAS = {"beta1": 0, "beta2": 1}


def set_group_hparam(group: dict[str, Any], name: str, value: float) -> bool:
    """Write optimizer hyperparameter `name` into a torch.optim param group; False if it is
    not one or the group has no such setting (e.g. momentum on an Adam group)."""
    if name not in ALL_HPARAMS:
        return False
    if name in _BETAS:
        if "betas" not in group:
            return False
        betas = list(group["betas"])
        betas[_BETAS[name]] = float(value)
        group["betas"] = tuple(betas)
        return True
    if name not in group:
        return False
    group[name] = float(value)
    return True
