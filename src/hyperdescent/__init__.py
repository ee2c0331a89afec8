"""hyperdescent: gradient-based hyperparameter optimization for PyTorch."""

from . import blackbox, experiment, optim, report, stn, tasks
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

__all__ = ["Space", "Real", "Int", "Categorical", "Piecewise", "Problem", "OnlineTuner", "OfflineTuner", "Schedule", "InnerState",
           "optim", "stn", "tasks", "blackbox", "experiment", "report", "ConfigError", "hypergrad", "HypergradResult", "HyperdescentError", "HyperparameterError",
           "DataError", "NonFiniteError"]
