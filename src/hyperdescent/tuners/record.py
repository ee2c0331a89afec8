"""The state record every tuner saves: tensors, plain values and a format version, written
atomically (temp file, flush, fsync, `os.replace`, fsync of the directory) and read back with
`torch.load(..., weights_only=True)`, so a checkpoint never executes code and a crash mid-write
never leaves a torn file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..distributed import is_writer
from ..errors import ConfigError

FORMAT_VERSION = 1


def copy_record(x: Any) -> Any:
    """A deep copy of a record: tensors cloned (detached), containers rebuilt as plain ones."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, Mapping):
        return {k: copy_record(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(copy_record(v) for v in x) if isinstance(x, tuple) else \
            [copy_record(v) for v in x]
    return x


def save_record(path: str | Path, record: Mapping[str, Any], kind: str) -> None:
    """Write `record` to `path` atomically, tagged with its tuner `kind` and the format version
    (on rank 0 only under data parallelism: every rank holds the same record)."""
    if not is_writer():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    payload = {"format_version": FORMAT_VERSION, "kind": kind, **copy_record(record)}
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_record(path: str | Path, kind: str) -> dict[str, Any]:
    """Read a record written by `save_record` for a tuner of `kind` (weights_only: no code
    runs), refusing a missing file, another tuner's record or an unknown format version."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist")
    try:
        record = torch.load(path, weights_only=True)
    except Exception as e:  # a torn or foreign file: say which file, not pickle's internals
        raise ConfigError(f"checkpoint {str(path)!r} cannot be read as a hyperdescent state "
                          f"record: {e}") from e
    if not isinstance(record, dict) or record.get("kind") != kind:
        raise ConfigError(f"checkpoint {str(path)!r} is not a {kind} state record "
                          f"(kind {record.get('kind') if isinstance(record, dict) else None!r})")
    if record.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"checkpoint {str(path)!r} has format version "
                          f"{record.get('format_version')!r}; this hyperdescent reads "
                          f"{FORMAT_VERSION}")
    return record
