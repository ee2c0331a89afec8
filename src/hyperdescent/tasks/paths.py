"""Where bundled tasks look for downloaded data and keep generated caches."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "HYPERDESCENT_DATA"
CACHE_ENV = "HYPERDESCENT_CACHE"


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The data directory: `path`, else $HYPERDESCENT_DATA, else ./data."""
    if path is None:
        path = os.environ.get(DATA_ENV) or "data"
    return Path(path).expanduser().resolve()


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache directory: `path`, else $HYPERDESCENT_CACHE, else ~/.cache/hyperdescent."""
    if path is None:
        path = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hyperdescent"
    return Path(path).expanduser().resolve()
