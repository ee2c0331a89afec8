"""Checkpoints of a gradient-based compare run (kinds oho, greedy, truncated): a directory with
the tuner's state record (`OnlineTuner.save`) and the runner's own counters, so a run whose
process died continues from its last evaluation instead of from step 0.

`run_gradient(..., checkpoint=C)` calls `C.latest()` once at its start (a directory to resume
from, or None) and `C.save(write)` after every logged evaluation: `save` hands `write` the
directory to write the checkpoint's files into, so the tuner's state is written once, straight
where it is kept. The Ray executor's implementation turns that directory into a
`tune.Checkpoint`; `DirCheckpoint` keeps the last one in a local directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ..errors import InputTypeError

TUNER_FILE = "tuner.pt"
RUNNER_FILE = "runner.json"
CHECKPOINTS = "checkpoints"


def run_stem(index: int, label: str, seed: int) -> str:
    """The file-name stem of method number `index` (labelled `label`) for `seed` in a run
    directory, shared by its checkpoint and its study journal: the label made file-safe."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "method"
    return f"{index}-{slug}-seed{seed}"


def run_checkpoint_dir(run_dir: str | os.PathLike, index: int, label: str, seed: int) -> Path:
    """Where a local compare keeps the checkpoint of method number `index` (labelled `label`)
    for `seed`: one directory per run under the run directory's checkpoints/."""
    return Path(run_dir) / CHECKPOINTS / run_stem(index, label, seed)


class RunCheckpoint(Protocol):
    """Where a gradient run resumes from and saves to (see the module docstring)."""

    def latest(self) -> Path | None: ...

    def save(self, write: Callable[[Path], None]) -> None: ...


def write_runner(directory: Path, state: dict[str, Any]) -> None:
    """Write the runner's counters (plain JSON values; inf and nan allowed) into `directory`."""
    (directory / RUNNER_FILE).write_text(json.dumps(state))


def read_runner(directory: Path) -> dict[str, Any]:
    """The runner's counters written by `write_runner`."""
    return json.loads((directory / RUNNER_FILE).read_text())


def is_run_checkpoint(directory: Path) -> bool:
    """Whether `directory` holds a gradient run's checkpoint (both files)."""
    return (directory / TUNER_FILE).is_file() and (directory / RUNNER_FILE).is_file()


class DirCheckpoint:
    """A RunCheckpoint kept in one local directory: each save replaces the previous one
    atomically (a sibling is written in full, then renamed over it)."""

    def __init__(self, path: str | os.PathLike):
        if not isinstance(path, (str, os.PathLike)):
            raise InputTypeError(f"checkpoint must be a directory path, got {path!r}")
        self.path = Path(path)

    def latest(self) -> Path | None:
        """The saved checkpoint's directory, or None when nothing was saved yet."""
        for d in (self.path, self.path.with_name(self.path.name + ".old")):
            # the previous one survives a process that died between the two renames of `save`
            if is_run_checkpoint(d):
                return d
        return None

    def clear(self) -> None:
        """Remove the checkpoint (and a previous one left by a kill): the run has finished."""
        for d in (self.path, self.path.with_name(self.path.name + ".old")):
            shutil.rmtree(d, ignore_errors=True)

    def save(self, write: Callable[[Path], None]) -> None:
        """`write` the new checkpoint into a sibling directory, then put it in place of the
        previous one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=self.path.parent))
        try:
            write(tmp)
            old = self.path.with_name(self.path.name + ".old")
            if self.path.exists():
                os.replace(self.path, old)
            os.replace(tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
