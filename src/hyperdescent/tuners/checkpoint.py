"""Periodic checkpoints of a tuner's state record while it runs, one on SIGINT/SIGTERM, and
the random-number states a record needs for a resumed run to draw what an uninterrupted one
would have drawn."""

from __future__ import annotations

import os
import random
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..validate import integer

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def rng_state() -> dict[str, Any]:
    """The global generators' states (torch CPU, every initialised CUDA device, Python's
    `random`) as tensors and plain values, loadable with weights_only=True."""
    state: dict[str, Any] = {"torch": torch.random.get_rng_state(),
                             "python": _plain(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`."""
    torch.random.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(x):
    return [_plain(v) for v in x] if isinstance(x, tuple) else x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


class Checkpointer:
    """Writes `save(path)` every `every` steps and once more when the run ends; while active
    (a `with` block, main thread only) SIGINT and SIGTERM are held until the step under way
    has finished, the checkpoint is written, and the signal is then delivered as before."""

    def __init__(self, path: str | Path | None, every: int | None, save: Callable[[Path], None]):
        if path is not None and not isinstance(path, (str, os.PathLike)):
            from ..errors import InputTypeError
            raise InputTypeError(f"checkpoint must be a file path or None, got {path!r}")
        if every is not None:
            integer("checkpoint_every", every, 1)
        self.path = None if path is None else Path(path)
        self.every = every if every is not None else 50
        self.save = save
        self.caught: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Checkpointer:
        if self.path is not None and threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._old[sig] = signal.signal(sig, self._hold)
        return self

    def _hold(self, signum, frame) -> None:
        self.caught = signum

    @property
    def stop(self) -> bool:
        """Whether a signal arrived and the run should stop after this step."""
        return self.caught is not None

    def after_step(self, t: int) -> None:
        """Write the checkpoint when step count t is due."""
        if self.path is not None and t % self.every == 0:
            self.save(self.path)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self.path is not None and (exc_type is None or self.caught is not None):
                self.save(self.path)
        finally:
            for sig, old in self._old.items():
                signal.signal(sig, old)
            self._old.clear()
        if self.caught is not None and exc_type is None:
            # delivered now, under the handler the caller had: KeyboardInterrupt for SIGINT,
            # the default termination for SIGTERM
            signum, self.caught = self.caught, None
            os.kill(os.getpid(), signum)
