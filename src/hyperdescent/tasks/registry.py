"""The table of bundled tasks and `get(name)`, which builds one in the requested dtype/device."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ..errors import ConfigError, DataError
from .base import Task
from .mnist1d_task import mnist1d_mlp
from .tabular import cancer_logreg, digits_logreg, digits_mlp
from .vision import cifar10_cnn, mnist_cnn, mnist_mlp

# name -> builder(seed, data_dir=..., cache_dir=...) returning a float32 CPU Task
_BUILDERS: dict[str, Callable[..., Task]] = {
    "digits_mlp": digits_mlp,
    "digits_logreg": digits_logreg,
    "cancer_logreg": cancer_logreg,
    "mnist1d_mlp": mnist1d_mlp,
    "mnist_mlp": mnist_mlp,
    "mnist_cnn": mnist_cnn,
    "cifar10_cnn": cifar10_cnn,
}


def names() -> list[str]:
    """The names of every bundled task, in a fixed order."""
    return list(_BUILDERS)


def _cast_factory(make_model: Callable[..., torch.nn.Module], dtype: torch.dtype, device
                  ) -> Callable[..., torch.nn.Module]:
    """Wrap a model factory so that its models come out in `dtype` on `device`."""
    def make(seed: int | None = None) -> torch.nn.Module:
        """A fresh model (weights fixed by `seed`, default the task's seed) in the task's dtype."""
        return make_model(seed).to(device=device, dtype=dtype)
    return make


def get(name: str, seed: int = 0, data_dir=None, cache_dir=None,
        dtype: torch.dtype = torch.float32, device=None) -> Task:
    """The bundled task `name`: splits fixed by `seed`, inputs and models in `dtype` on `device`."""
    if name not in _BUILDERS:
        raise DataError(f"unknown task {name!r}; the bundled tasks are {names()}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ConfigError(f"dtype must be a floating torch.dtype such as torch.float64, got {dtype!r}")
    task = _BUILDERS[name](seed=int(seed), data_dir=data_dir, cache_dir=cache_dir)
    device = torch.device(device) if device is not None else None
    task = task.to(device=device, dtype=dtype)
    info = {**task.info, "dtype": str(dtype), "device": str(device or "cpu")}
    return dataclasses.replace(task, make_model=_cast_factory(task.make_model, dtype, device),
                               info=info)
