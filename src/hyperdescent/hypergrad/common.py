"""What every hypergradient method shares: the result record, leaves of λ, cost accounting."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..problem import InnerState, Problem
from ..space import flatten, unflatten

Leaves = dict[str, torch.Tensor]


@dataclass
class HypergradResult:
    """value = E(s_T); grad = dE/dλ in natural units; raw_grad w.r.t. raw coordinates."""

    value: float
    grad: dict
    raw_grad: dict
    stats: dict = field(default_factory=dict)


def natural_leaves(values: Mapping[str, Any], requires_grad: bool = False) -> Leaves:
    """Natural hyperparameter values (API shapes) as flat leaves (fresh tensors)."""
    return {k: v.detach().clone().requires_grad_(requires_grad)
            for k, v in flatten(values).items()}


def hp_values(values: Mapping[str, Any], leaves: Leaves) -> dict:
    """Leaves back in the value shapes of `values`, which the optimizer and regularizer take."""
    return unflatten(leaves, values)


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


_ACTIVE: list[CostMeter] = []


def sample_memory() -> None:
    """Record the current memory in the active CostMeter(s): methods call it where their
    memory peaks (an unrolled graph, just before its backward)."""
    for meter in _ACTIVE:
        meter.sample()


class CostMeter:
    """Wall time, peak memory above the start (CUDA allocator, else sampled RSS), HVP count.

    On CPU the RSS is read at the start and end, wherever a method calls `sample_memory`,
    and every `interval_s` by a background thread. The thread must take the GIL to read, so
    a short interval slows the method it measures.
    """

    interval_s = 0.05

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.hvps = 0
        self.phases: dict[str, float] = {}
        self._peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> CostMeter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = self._peak = rss_bytes()
            self._thread = threading.Thread(target=self._sample_loop, daemon=True)
            self._thread.start()
        _ACTIVE.append(self)
        self._t0 = time.perf_counter()
        return self

    @contextmanager
    def phase(self, name: str):
        """Time a phase of the method (forward, backward, solve, ...) into stats["phase_s"]."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0

    def sample(self) -> None:
        """Read the RSS now (CPU; on CUDA the allocator keeps its own peak)."""
        if self.device.type != "cuda":
            self._peak = max(self._peak, rss_bytes())

    def _sample_loop(self):
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.sample()
        _ACTIVE.remove(self)
        self.wall_time = time.perf_counter() - self._t0
        return False

    def stats(self, **extra) -> dict[str, Any]:
        return {"wall_time_s": self.wall_time,
                "peak_memory_mb": max(0, self._peak - self._base) / 2 ** 20,
                "memory_source": "cuda_allocator" if self.device.type == "cuda" else "rss_sampled",
                "hvps": self.hvps, "phase_s": dict(self.phases), **extra}


def finish(problem: Problem, values: Mapping[str, Any], value: float,
           grad_leaves: Mapping[str, torch.Tensor | None], stats: dict) -> HypergradResult:
    """Assemble a result at hyperparameters `values`: natural grads in API shapes, and raw
    grads by the chain rule."""
    like = values
    flat = flatten(like)
    full = {k: (grad_leaves.get(k) if grad_leaves.get(k) is not None else torch.zeros_like(v))
            .detach() for k, v in flat.items()}
    grad = unflatten(full, like)
    dnat = flatten(problem.bound.dnatural_draw(problem.bound.to_raw(like)))
    raw_grad = unflatten({k: full[k] * dnat[k] for k in full}, like)
    return HypergradResult(float(value), grad, raw_grad, stats)


def run_plain(problem: Problem, state: InnerState, t0: int, t1: int, values: dict, horizon: int
              ) -> InnerState:
    """Advance s_t0 -> s_t1 without building a graph."""
    for t in range(t0, t1):
        state, _ = problem.step(state, problem.train_batch(t), problem.hp_at(values, t, horizon))
    return state
