"""Checks of user input at the public entry points, so that a bad argument fails where it is
given, with an error that names it and says what would be accepted, instead of deep inside
torch at step one. `check_data` builds nothing: it runs the model once on a few rows of each
split held as tensors and checks class labels against the model's outputs."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .errors import (
    DataError,
    HyperdescentError,
    HyperparameterError,
    HyperparameterTypeError,
    InputTypeError,
)

_CHECK_ROWS = 4  # rows of each split the model sees at build time: enough to show a shape


def _type_error(error: type[HyperdescentError]) -> type[HyperdescentError]:
    if issubclass(error, TypeError):
        return error
    return HyperparameterTypeError if issubclass(error, HyperparameterError) else InputTypeError


def number(name: str, v: Any, error: type[HyperdescentError] = HyperdescentError,
           finite: bool = True) -> float:
    """`v` as a float: a real number (or one-element tensor), not a bool or a string."""
    bad_type = _type_error(error)
    if isinstance(v, (bool, str, bytes)) or v is None:
        raise bad_type(f"{name} must be a real number, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError, RuntimeError):
        raise bad_type(f"{name} must be a real number, got {type(v).__name__} {v!r}") from None
    if finite and not math.isfinite(f):
        raise error(f"{name} must be a finite number, got {v!r}")
    return f


def integer(name: str, v: Any, low: int | None = None,
            error: type[HyperdescentError] = HyperdescentError) -> int:
    """`v` as an int: an integer (a float only when integral), not a bool; >= low if given."""
    bad_type = _type_error(error)
    if isinstance(v, (bool, str, bytes)) or v is None:
        raise bad_type(f"{name} must be an integer, got {v!r}")
    try:
        f = float(v)
        i = int(v)
    except (TypeError, ValueError, OverflowError, RuntimeError):
        raise bad_type(f"{name} must be an integer, got {type(v).__name__} {v!r}") from None
    if f != i:
        raise error(f"{name} must be an integer, got {v!r}")
    if low is not None and i < low:
        raise error(f"{name} must be an integer >= {low}, got {v!r}")
    return i


def check_problem_args(model, loss, optimizer, space, batch_size, val_batch_size, seed,
                       regularizer) -> None:
    """Types and ranges of `hd.Problem`'s arguments (the data are checked by `check_data`)."""
    from .optim.base import Optimizer
    from .space import Space

    if not isinstance(model, torch.nn.Module):
        raise InputTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss):
        raise InputTypeError(f"loss must be callable as loss(output, target), got {loss!r}")
    if optimizer is not None and not isinstance(optimizer, Optimizer):
        raise InputTypeError(
            f"optimizer must be an hd.optim optimizer (hd.optim.SGD(...), Adam, AdamW, RMSprop), "
            f"got {type(optimizer).__name__} {optimizer!r}")
    if space is not None and not isinstance(space, Space):
        raise InputTypeError(f"space must be an hd.Space, got {type(space).__name__}")
    if regularizer is not None and not callable(regularizer):
        raise InputTypeError(f"regularizer must be callable as reg(params, hp) or None, got "
                             f"{regularizer!r}")
    integer("batch_size", batch_size, 1, DataError)
    integer("val_batch_size", val_batch_size, 1, DataError)
    integer("seed", seed, None, DataError)


def _is_class_loss(loss: Callable) -> tuple[bool, int]:
    """Whether `loss` takes class indices as targets, and its ignore_index."""
    fn = torch.nn.functional
    if loss in (fn.cross_entropy, fn.nll_loss):
        return True, -100
    if isinstance(loss, (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss)):
        return True, loss.ignore_index
    return False, -100


def check_data(problem) -> None:
    """Run the model once on the first rows of every split held as tensors, and check class
    labels against its outputs, raising DataError that names the split (streams are skipped:
    reading them would consume a batch)."""
    from .data import ReplayableBatches

    model = problem.model
    was_training, mode = model.training, problem._training
    class_loss, ignore = _is_class_loss(problem.loss_fn)
    try:
        for name, data in (("train", problem.train_data), ("val", problem.val_data),
                           ("test", problem.test_data)):
            if not isinstance(data, ReplayableBatches):
                continue
            x = data.x[:_CHECK_ROWS]
            # the user's model may draw random numbers even in eval mode; keep the seed's stream
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                try:
                    out = problem.forward(problem.params0, problem.buffers0, x, False)
                except Exception as e:  # any failure here is about these inputs
                    raise DataError(
                        f"the model cannot take the {name} inputs: a batch of shape "
                        f"{tuple(data.x.shape[1:])} ({data.x.dtype}) per example raised "
                        f"{type(e).__name__}: {e}; give {name}= inputs of the shape the model "
                        f"expects") from e
            if class_loss and isinstance(out, torch.Tensor) and out.dim() >= 2 \
                    and not data.y.is_floating_point():
                _check_labels(name, data.y, out.shape[1], ignore)
    finally:
        model.train(was_training)
        problem._training = mode


def _check_labels(name: str, y: torch.Tensor, classes: int, ignore: int) -> None:
    used = y[y != ignore]
    if used.numel() == 0:
        return
    lo, hi = int(used.min()), int(used.max())
    if lo < 0 or hi >= classes:
        raise DataError(
            f"{name} labels range over {lo}..{hi}, but the model has {classes} outputs, so "
            f"the loss accepts class indices 0..{classes - 1} (or {ignore} to ignore a row)")


# torch.optim's own ranges for the fixed arguments (plus: finite), so a value torch.optim
# refuses is refused here too instead of diverging later
_OPTIMIZER_RANGES = {"lr": (0.0, math.inf), "weight_decay": (0.0, math.inf),
                     "momentum": (0.0, math.inf), "alpha": (0.0, math.inf),
                     "eps": (0.0, math.inf), "beta1": (0.0, 1.0), "beta2": (0.0, 1.0)}


def check_optimizer_args(owner: str, kwargs: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Types and ranges of an hd.optim optimizer's fixed arguments (`betas` a pair; numbers
    finite and inside torch.optim's ranges, betas in [0, 1); flags True or False)."""
    if "betas" in kwargs:
        betas = kwargs["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise HyperparameterError(f"{owner}: betas must be a pair (beta1, beta2), got "
                                      f"{betas!r}")
        both = sorted({"beta1", "beta2"} & set(kwargs))
        if both:
            # which one would win is a guess: the values checked must be the values used
            raise HyperparameterError(f"{owner}: give betas or {' and '.join(both)}, not both")
        kwargs = {**kwargs, "beta1": betas[0], "beta2": betas[1]}
    for name, v in kwargs.items():
        if name == "betas" or name not in defaults:
            continue
        if isinstance(defaults[name], bool):
            if not isinstance(v, bool):
                raise HyperparameterTypeError(f"{owner}: {name} must be True or False, got {v!r}")
            continue
        f = number(f"{owner}: {name}", v, HyperparameterError)
        low, high = _OPTIMIZER_RANGES.get(name, (-math.inf, math.inf))
        if not (low <= f and (f < high or high == math.inf)):
            accepted = f"in [{low:g}, {high:g})" if high < math.inf else f">= {low:g}"
            raise HyperparameterError(f"{owner}: {name} must be {accepted}, got {v!r}")
