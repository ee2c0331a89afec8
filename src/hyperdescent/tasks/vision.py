"""MNIST and CIFAR-10 tasks read from torchvision's on-disk layout, without torchvision."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import Task
from .formats import find, read_cifar_batch, read_idx
from .models import mlp, seeded, small_cnn
from .paths import DATA_ENV
from .paths import data_dir as resolve_data_dir
from .prep import default_space, split_indices, standardize, to_split

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def _missing(task: str, root: Path, folder: Path, expected: list[str], missing: list[str],
             dataset: str, note: str = "") -> DataError:
    """The error for absent data files: which files, where, and how to get them."""
    rel = folder.relative_to(root)
    return DataError(
        f"task {task!r} needs the {dataset} files {expected}{note} in {folder}; missing: "
        f"{missing}. To get them: `pip install 'hyperdescent[vision]'`, then on a machine with "
        f"internet run `python -c \"import torchvision; torchvision.datasets.{dataset}("
        f"root='{root}', download=True)\"` and copy the folder {folder} to this machine; or "
        f"pass data_dir= (or set ${DATA_ENV}) to a folder that holds {rel}/.")


def load_mnist(data_dir=None, task: str = "mnist") -> dict[str, np.ndarray]:
    """MNIST from `<data_dir>/MNIST/raw/` idx files (plain or .gz) as uint8 images and labels."""
    root = resolve_data_dir(data_dir)
    folder = root / "MNIST" / "raw"
    found = {name: find(folder / name) for name in MNIST_FILES}
    missing = [n for n, p in found.items() if p is None]
    if missing:
        raise _missing(task, root, folder, list(MNIST_FILES), missing, "MNIST",
                       " (or the same names + .gz)")
    x, y, x_test, y_test = (read_idx(found[n]) for n in MNIST_FILES)
    for images, labels, which in ((x, y, "train"), (x_test, y_test, "t10k")):
        if images.shape[1:] != (28, 28) or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"MNIST {which} files in {folder}: expected (N, 28, 28) images and "
                            f"N labels, got {images.shape} and {labels.shape}")
    return {"x": x, "y": y.astype(np.int64), "x_test": x_test, "y_test": y_test.astype(np.int64)}


def load_cifar10(data_dir=None, task: str = "cifar10") -> dict[str, np.ndarray]:
    """CIFAR-10 from `<data_dir>/cifar-10-batches-py/` pickles as uint8 NCHW images and labels."""
    root = resolve_data_dir(data_dir)
    folder = root / "cifar-10-batches-py"
    missing = [n for n in CIFAR_FILES if not (folder / n).is_file()]
    if missing:
        raise _missing(task, root, folder, list(CIFAR_FILES), missing, "CIFAR10")
    parts = [read_cifar_batch(folder / n) for n in CIFAR_FILES[:-1]]
    x_test, y_test = read_cifar_batch(folder / CIFAR_FILES[-1])
    return {"x": np.concatenate([p[0] for p in parts]), "y": np.concatenate([p[1] for p in parts]),
            "x_test": x_test, "y_test": y_test}


def _image_task(name: str, a: dict, seed: int, val_fraction: float, axis, shape: tuple,
                build, source: str, steps: int) -> Task:
    """A Task from uint8 images: val carved from train by seed, scaled to [0, 1], standardized."""
    n = len(a["y"])
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    tr, va = split_indices(n, (n - n_val, n_val), seed)
    x = a["x"].astype(np.float32) / 255.0
    xtr, xva, xte = standardize(x[tr], x[va], a["x_test"].astype(np.float32) / 255.0, axis=axis)
    return Task(
        name=name, make_model=seeded(build, seed),
        train=to_split(xtr.reshape(-1, *shape), a["y"][tr]),
        val=to_split(xva.reshape(-1, *shape), a["y"][va]),
        test=to_split(xte.reshape(-1, *shape), a["y_test"]),
        space=default_space(), batch_size=128, steps=steps, num_classes=10,
        info={"source": source, "seed": seed, "input_shape": shape,
              "sizes": {"train": len(tr), "val": len(va), "test": len(a["y_test"])}})


def mnist_mlp(seed: int = 0, data_dir=None, **_) -> Task:
    """MNIST (val = 1/6 of train by seed) flattened to 784 inputs, 784-256-256-10 ReLU MLP."""
    return _image_task("mnist_mlp", load_mnist(data_dir, "mnist_mlp"), seed, 1 / 6, None,
                       (784,), lambda: mlp([784, 256, 256, 10]), "MNIST idx files", 500)


def mnist_cnn(seed: int = 0, data_dir=None, **_) -> Task:
    """MNIST (val = 1/6 of train by seed) as 1x28x28 images, small conv-BN-ReLU-pool CNN."""
    return _image_task("mnist_cnn", load_mnist(data_dir, "mnist_cnn"), seed, 1 / 6, None,
                       (1, 28, 28), lambda: small_cnn(1, 28, (16, 32)), "MNIST idx files", 500)


def cifar10_cnn(seed: int = 0, data_dir=None, **_) -> Task:
    """CIFAR-10 (val = 1/10 of train by seed), per-channel standardized, small BN CNN."""
    return _image_task("cifar10_cnn", load_cifar10(data_dir, "cifar10_cnn"), seed, 0.1,
                       (0, 2, 3), (3, 32, 32), lambda: small_cnn(3, 32, (32, 64)),
                       "CIFAR-10 python pickles", 1000)
