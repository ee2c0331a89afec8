"""The divergence guard every tuner shares: it watches each inner step's loss, keeps
snapshots of the tuner's state record, and hands back the one to roll back to.

Like optax's `apply_if_finite` it wraps a step instead of living inside the algorithm: the
tuner asks `diverged(t, loss)` after each inner step, offers `snapshot` a copy of its record
after healthy ones, and on divergence takes `rollback()` and restores from it.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from ..errors import HyperparameterError


class GuardExhausted(Exception):
    """Raised by `DivergenceGuard.rollback` once `max_rollbacks` rollbacks have been taken."""


class DivergenceGuard:
    """Spike / first-loss / slow-trend rule on the inner training loss, with two snapshots.

    A loss counts as divergence when it is not finite; or (after step 5) when it is far above
    the running average and above the first loss, or above three times the first loss; or
    (after step 20) when the running average climbed above its best by more than
    `trend_factor - 1` of the best or, early on, by more than `giveback` of the progress made
    since the start (a run stalling back at chance, dead ReLUs, shows no single spike).
    Two snapshots are kept: the newer one may already hold a state about to blow up, so a
    rollback lands on the older one, validated by `snapshot_every` healthy steps.
    """

    def __init__(self, spike_factor: float = 3.0, trend_factor: float = 1.2,
                 giveback: float = 0.3, snapshot_every: int = 25, max_rollbacks: int = 20):
        for name, v, low in (("spike_factor", spike_factor, 1.0), ("trend_factor", trend_factor, 1.0),
                             ("giveback", giveback, 0.0)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < low:
                raise HyperparameterError(f"{name} must be a number >= {low}, got {v!r}")
        for name, v, low in (("snapshot_every", snapshot_every, 1),
                             ("max_rollbacks", max_rollbacks, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise HyperparameterError(f"{name} must be an integer >= {low}, got {v!r}")
        self.spike_factor, self.trend_factor, self.giveback = spike_factor, trend_factor, giveback
        self.snapshot_every, self.max_rollbacks = snapshot_every, max_rollbacks
        self.rollbacks = 0
        self.smooth: tuple[float | None, float | None, float | None] = (None, None, None)
        self._snapshots: deque = deque(maxlen=2)

    def diverged(self, t: int, loss: float) -> bool:
        """Whether the training loss of inner step t (1-based count of steps taken) signals
        divergence; a healthy loss updates the running average."""
        if not math.isfinite(loss):
            return True
        smooth, first, best = self.smooth
        if smooth is None:
            self.smooth = (loss, loss, loss)
            return False
        floor = 0.05 * first
        ema = 0.9 * smooth + 0.1 * loss
        spiked = t > 5 and (
            # one batch may be hard (replaying it gives the same loss), so a single loss only
            # counts as a spike once it is also above where training started
            loss > max(self.spike_factor * max(smooth, floor), first)
            or loss > 3 * first
            or (t > 20 and ema > best + floor + min(
                (self.trend_factor - 1) * best,
                self.giveback * (first - best))))
        if not spiked:
            self.smooth = (ema, first, min(best, ema))
        return spiked

    def due(self, t: int) -> bool:
        """Whether a snapshot is due after healthy step count t."""
        return t % self.snapshot_every == 0

    def snapshot(self, record: dict[str, Any]) -> None:
        """Keep `record` (a copy of the tuner's state, which the guard does not copy again)
        together with the guard's running average."""
        self._snapshots.append({"record": record, "smooth": self.smooth})

    def rollback(self) -> dict[str, Any]:
        """The record to restore (the older snapshot), or GuardExhausted past max_rollbacks."""
        if self.rollbacks >= self.max_rollbacks:
            raise GuardExhausted(self.rollbacks)
        snap = self._snapshots[0]
        self._snapshots.clear()
        self._snapshots.append(snap)
        self.smooth = snap["smooth"]
        self.rollbacks += 1
        return snap["record"]

    def state_dict(self) -> dict[str, Any]:
        """Counters, running average and snapshots (plain values and the records given)."""
        return {"rollbacks": self.rollbacks, "smooth": list(self.smooth),
                "snapshots": [{"record": s["record"], "smooth": list(s["smooth"])}
                              for s in self._snapshots]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore `state_dict`."""
        self.rollbacks = int(sd["rollbacks"])
        self.smooth = tuple(sd["smooth"])
        self._snapshots = deque(({"record": s["record"], "smooth": tuple(s["smooth"])}
                                 for s in sd["snapshots"]), maxlen=2)
