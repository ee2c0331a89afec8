"""hyperdescent: gradient-based hyperparameter optimization for PyTorch."""

import importlib

from . import optim
from .errors import (
    ConfigError,
    DataError,
    HyperdescentError,
    HyperparameterError,
    NonFiniteError,
)
from .hypergrad import HypergradResult, hypergrad
from .problem import InnerState, Problem
from .space import Categorical, Int, Piecewise, Real, Space
from .tuners import OfflineTuner, OnlineTuner, Schedule

__version__ = "0.1.0"

# imported on first use: blackbox (Optuna), tasks (scikit-learn's datasets), experiment and
# report take several seconds to import, which every worker process and `torchrun` rank paid
_LAZY = ("blackbox", "experiment", "report", "stn", "tasks")


def __getattr__(name: str):
    """`hd.blackbox`, `hd.tasks`, ...: the subpackage, imported on first access."""
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'hyperdescent' has no attribute {name!r}")

__all__ = ["Space", "Real", "Int", "Categorical", "Piecewise", "Problem", "OnlineTuner", "OfflineTuner", "Schedule", "InnerState",
           "optim", "stn", "tasks", "blackbox", "experiment", "report", "ConfigError", "hypergrad", "HypergradResult", "HyperdescentError", "HyperparameterError",
           "DataError", "NonFiniteError"]
