"""MNIST-1D (Greydanus 2020) generated offline by the `mnist1d` package and cached as .npz."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import Task
from .models import mlp, seeded
from .paths import cache_dir as resolve_cache_dir
from .prep import default_space, split_indices, to_split

NUM_SAMPLES = 10_000      # 8000 train / 2000 test, as in the MNIST-1D paper
TRAIN_SPLIT = 0.8
VAL_SIZE = 2000           # carved out of the 8000 training examples by seed


def generate(num_samples: int = NUM_SAMPLES, train_split: float = TRAIN_SPLIT) -> dict:
    """Build MNIST-1D with the package's default arguments; never downloads anything."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover - mnist1d is a core dependency
        raise DataError("task 'mnist1d_mlp' needs the mnist1d package: pip install mnist1d") from e
    args = get_dataset_args()
    args.num_samples, args.train_split = num_samples, train_split
    # make_dataset reseeds the global `random` and `numpy.random`; leave them as they were.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {"x": d["x"], "y": d["y"], "x_test": d["x_test"], "y_test": d["y_test"],
            "seed": np.int64(args.seed)}


def cache_path(cache_dir: Path, num_samples: int = NUM_SAMPLES,
               train_split: float = TRAIN_SPLIT) -> Path:
    """The .npz file holding the generated arrays for these generation arguments."""
    return cache_dir / f"mnist1d_n{num_samples}_split{train_split:g}.npz"


def load_arrays(cache_dir=None) -> dict[str, np.ndarray]:
    """The MNIST-1D arrays, read from the cache, or generated and cached on first use."""
    path = cache_path(resolve_cache_dir(cache_dir))
    if path.exists():
        try:
            with np.load(path) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError, KeyError):
            pass  # a corrupt cache file: regenerate it below
    arrays = generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return arrays


def mnist1d_mlp(seed: int = 0, cache_dir=None, **_) -> Task:
    """MNIST-1D (6000/2000 train/val by seed, 2000 test) with a 40-100-100-10 ReLU MLP."""
    a = load_arrays(cache_dir)
    x, y = a["x"], a["y"].astype(np.int64)
    tr, va = split_indices(len(y), (len(y) - VAL_SIZE, VAL_SIZE), seed)
    return Task(
        name="mnist1d_mlp", make_model=seeded(lambda: mlp([40, 100, 100, 10]), seed),
        train=to_split(x[tr], y[tr]), val=to_split(x[va], y[va]),
        test=to_split(a["x_test"], a["y_test"].astype(np.int64)),
        space=default_space(), batch_size=128, steps=500, num_classes=10,
        info={"source": "mnist1d.data.make_dataset (generated offline)", "seed": seed,
              "input_shape": (40,), "cache": str(cache_path(resolve_cache_dir(cache_dir))),
              "sizes": {"train": len(tr), "val": len(va), "test": len(a["y_test"])}})
