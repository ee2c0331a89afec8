"""Black-box hyperparameter search baselines backed by Optuna: samplers, pruners, objectives."""

from .distributions import (
    assemble,
    bind_space,
    flatten_values,
    grid_search_space,
    initial_params,
    space_to_distributions,
)
from .objective import KNOWN_HPARAMS, TaskObjective, evaluate, task_objective
from .search import PRUNERS, SAMPLERS, make_pruner, make_sampler, search

__all__ = [
    "search",
    "task_objective",
    "TaskObjective",
    "space_to_distributions",
    "assemble",
    "flatten_values",
    "initial_params",
    "grid_search_space",
    "bind_space",
    "make_sampler",
    "make_pruner",
    "evaluate",
    "SAMPLERS",
    "PRUNERS",
    "KNOWN_HPARAMS",
]
