"""Readers for torchvision's on-disk data formats (MNIST idx, CIFAR-10 pickles) in pure numpy."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

from ..errors import DataError

# idx type codes (http://yann.lecun.com/exdb/mnist/): code -> big-endian numpy dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def find(path: Path) -> Path | None:
    """`path` if it exists, else `path` + '.gz' if that exists, else None."""
    for p in (path, path.with_name(path.name + ".gz")):
        if p.is_file():
            return p
    return None


def read_bytes(path: Path) -> bytes:
    """The contents of a file, gunzipped when its name ends in .gz."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return f.read()


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (optionally gzipped): magic 0 0 type ndim, big-endian dims, data."""
    raw = read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an idx file (bad magic number {raw[:4]!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: its idx header needs {header} bytes")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path} has {len(raw)} bytes; an idx array of shape {shape} and "
                        f"type {dtype} needs {expected}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse one CIFAR-10 python batch: (N, 3, 32, 32) uint8 images and int64 labels."""
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise DataError(f"{path} is not a readable CIFAR-10 pickle: {e}") from e
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise DataError(f"{path} lacks the 'data'/'labels' entries of a CIFAR-10 batch")
    x = np.asarray(d["data"], dtype=np.uint8)
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(d["labels"]) != len(x):
        raise DataError(f"{path}: expected data of shape (N, 3072) and N labels, got "
                        f"{x.shape} and {len(d['labels'])}")
    return x.reshape(-1, 3, 32, 32), np.asarray(d["labels"], dtype=np.int64)
