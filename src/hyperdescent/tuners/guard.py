"""The divergence guard every tuner shares: it watches each inner step's loss, keeps
snapshots of the tuner's state record, and hands back the one to roll back to.

Like optax's `apply_if_finite` it wraps a step instead of living inside the algorithm: the
tuner asks `diverged(t, loss)` after each inner step, offers `snapshot` a copy of its record
after healthy ones, and on divergence takes `rollback()` and restores from it.

Every rule is judged against the loss's own noise level, so that the spread of a noisy batch
loss (regression, language models) is never taken for divergence: the noise of one batch
loss is estimated from successive differences of recent healthy losses (a linear trend cancels
in differences; von Neumann et al. 1941) by their 90th-percentile absolute deviation from the
median, a quantile rather than the MAD so that skewed, heavy-tailed batch losses are not
underestimated, and one that a lone spike does not move; a rule fires only when its signal
clears its threshold by `noise_tolerance` standard deviations of what it compares.

A finite loss above the spike thresholds is not enough on its own where the noise may be
heavy-tailed: the mean of a few skewed per-example losses now and then lands 8 standard
deviations above its mean, as far out in noise units as a genuine jump on a short, quiet
run. Such a loss is held out of the running statistics and rolls back only
when the next ones are as high (`_PERSIST` in a row), or at once when it is beyond any
noise (`_EXTREME` standard deviations above the average, or the noise is nil).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from ..errors import HyperparameterError

_ALPHA = 0.1  # weight of the newest loss in the running average
# 90th percentile of |N(0, 2)|, the absolute difference of two standard normals
_Q90_TO_SD = 1.6449 * math.sqrt(2)
_NOISE_WINDOW = 50  # successive differences the noise estimate uses
_FEW = 20  # below this many differences the quantile is unreliable: also take the plain sd
_PERSIST = 3  # high losses in a row that make a finite spike a divergence
_EXTREME = 50.0  # standard deviations above the average that no batch noise reaches
# how far the validation losses' average must have fallen, beyond its noise, to veto the trend
# rules: a drift of a few percent is not the tuner regularizing on purpose
_VAL_MARGIN = 0.1


class GuardExhausted(Exception):
    """Raised by `DivergenceGuard.rollback` once `max_rollbacks` rollbacks have been taken."""


def noise_sd(diffs) -> float:
    """Standard deviation of one loss from successive differences of losses: the 90th
    percentile of their absolute deviations from the median, over that of |N(0, 2)|, or the
    plain sd of the differences / sqrt 2 if larger while there are few (0 below 4)."""
    n = len(diffs)
    if n < 4:
        return 0.0
    s = sorted(diffs)
    med = _median(s)
    dev = sorted(abs(d - med) for d in s)
    sd = dev[min(n - 1, int(0.9 * n))] / _Q90_TO_SD
    if n < _FEW:
        mean = sum(s) / n
        sd = max(sd, math.sqrt(sum((d - mean) ** 2 for d in s) / (n - 1) / 2))
    return sd


def ema_sd(n: int) -> float:
    """Standard deviation of a running average of n white-noise losses that starts at the
    first one, in units of one loss's: 1 at n = 1, sqrt(α / (2 - α)) in the long run."""
    decay = (1 - _ALPHA) ** (2 * (n - 1))
    return math.sqrt(decay + _ALPHA / (2 - _ALPHA) * (1 - decay))


def _median(s: list[float]) -> float:
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


class DivergenceGuard:
    """Noise-aware spike / first-loss / slow-trend rule on the inner training loss, with two
    snapshots.

    With σ the noise of one batch loss (see the module docstring) and z `noise_tolerance`, a
    loss counts as divergence when it is not finite; or (after step 5) when it is more than
    2·z·σ above the running average and also far above it (`spike_factor` times it, and
    above the first loss) or above three times the first loss, three steps in a row or once
    beyond 50·σ (see the module docstring); or (after step 20) when the
    running average, less z times its own noise, climbed above its best, plus z times the
    best's noise, by more than `trend_factor - 1` of the best or, early on, by more than
    `giveback` of the progress made since the first loss (taken z·σ higher: a low first
    loss is no progress to give back). A run stalling back at chance (dead ReLUs) shows no
    single spike; the trend rules catch it. A tuner that also hands the guard its validation
    losses (`observe_val`) vetoes the trend rules while their running average, plus z times its
    noise, is more than a tenth below where it was when the training loss set its best: a
    training loss climbing while the validation loss falls is the regularization the tuner
    asked for (weight decay raised on a net that had fitted its training set), not
    divergence, and rolling back for it only halves the learning rate again and again. The
    best is the average with the lowest upper bound seen, so an early average resting on few
    losses does not make later ones look high.
    With a noiseless loss these are the plain rules. Two snapshots are kept: the newer one may
    already hold a state about to blow up, so a rollback lands on the older one, validated by
    `snapshot_every` healthy steps. `backoff` halves a meta learning rate at a rollback, never
    below `meta_lr_floor` times its initial value.
    """

    def __init__(self, spike_factor: float = 3.0, trend_factor: float = 1.2,
                 giveback: float = 0.3, snapshot_every: int = 25, max_rollbacks: int = 20,
                 noise_tolerance: float = 4.0, meta_lr_floor: float = 0.01):
        for name, v, low in (("spike_factor", spike_factor, 1.0), ("trend_factor", trend_factor, 1.0),
                             ("giveback", giveback, 0.0), ("noise_tolerance", noise_tolerance, 0.0)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < low:
                raise HyperparameterError(f"{name} must be a number >= {low}, got {v!r}")
        if isinstance(meta_lr_floor, bool) or not isinstance(meta_lr_floor, (int, float)) \
                or not 0 <= meta_lr_floor <= 1:
            raise HyperparameterError(
                f"meta_lr_floor must be a number in [0, 1] (a fraction of the initial meta_lr), "
                f"got {meta_lr_floor!r}")
        for name, v, low in (("snapshot_every", snapshot_every, 1),
                             ("max_rollbacks", max_rollbacks, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise HyperparameterError(f"{name} must be an integer >= {low}, got {v!r}")
        self.spike_factor, self.trend_factor, self.giveback = spike_factor, trend_factor, giveback
        self.noise_tolerance, self.meta_lr_floor = float(noise_tolerance), float(meta_lr_floor)
        self.snapshot_every, self.max_rollbacks = snapshot_every, max_rollbacks
        self.rollbacks = 0
        self.reason: str | None = None  # the rule that fired at the last `diverged` call
        self.smooth: tuple[float | None, float | None, float | None] = (None, None, None)
        self.last: float | None = None  # the latest healthy loss
        self.count = 0  # healthy losses in the running average
        self.best_sd = 1.0  # ema_sd of the running average when it set the best
        self.diffs: deque = deque(maxlen=_NOISE_WINDOW)
        self.high = 0  # spike-high losses in a row, held out of the statistics
        # running average of the validation losses a tuner observes (None: none seen), and its
        # value when the training loss's average last set its best (None: not since)
        self.val_smooth: float | None = None
        self.val_at_best: float | None = None
        self.val_last: float | None = None
        self.val_count = 0
        self.val_diffs: deque = deque(maxlen=_NOISE_WINDOW)
        self._snapshots: deque = deque(maxlen=2)

    @property
    def noise(self) -> float:
        """The current estimate of one batch loss's noise standard deviation."""
        return noise_sd(self.diffs)

    def observe_val(self, loss: float) -> None:
        """Fold a validation loss of the tuned run into its running average (non-finite ones
        are left out)."""
        if not math.isfinite(loss):
            return
        self.val_smooth = loss if self.val_smooth is None else \
            (1 - _ALPHA) * self.val_smooth + _ALPHA * loss
        if self.val_last is not None:
            self.val_diffs.append(loss - self.val_last)
        self.val_last, self.val_count = loss, self.val_count + 1

    def _validation_improved(self) -> bool:
        """Whether the validation losses' average, plus z times its noise, is more than
        _VAL_MARGIN below its value when the training loss's average set its best."""
        if self.val_smooth is None or self.val_at_best is None:
            return False
        upper = self.val_smooth + self.noise_tolerance * noise_sd(self.val_diffs) * \
            ema_sd(self.val_count)
        return upper < (1 - _VAL_MARGIN) * self.val_at_best

    def diverged(self, t: int, loss: float) -> bool:
        """Whether the training loss of inner step t (1-based count of steps taken) signals
        divergence (its rule then in `reason`); a healthy loss updates the running average
        and the noise estimate."""
        self.reason = None
        if not math.isfinite(loss):
            self.reason = "non-finite training loss"
            return True
        smooth, first, best = self.smooth
        if smooth is None:
            self.smooth, self.last, self.count, self.best_sd = (loss, loss, loss), loss, 1, 1.0
            return False
        z, sd = self.noise_tolerance, self.noise
        floor = 0.05 * first
        ema = (1 - _ALPHA) * smooth + _ALPHA * loss
        ema_noise = z * sd * ema_sd(self.count + 1)
        best_noise = z * sd * self.best_sd
        # one batch may be hard (replaying it gives the same loss), so a single loss only
        # counts as a spike once it is also above where training started
        far = loss > max(self.spike_factor * max(smooth, floor), first) or loss > 3 * first
        high = t > 5 and far and loss > smooth + 2 * z * sd
        extreme = high and (sd == 0.0 or loss > smooth + _EXTREME * sd)
        self.high = self.high + 1 if high else 0
        spike = extreme or self.high >= _PERSIST
        trend = (t > 20 and not high and ema - ema_noise > best + best_noise + floor + min(
            (self.trend_factor - 1) * best,
            # progress measured from the first loss's upper bound: a noisy first loss
            # below the average must not make the progress, and the allowance, negative
            self.giveback * max(0.0, first + z * sd - best))
            and not self._validation_improved())
        spiked = spike or trend
        if spike:
            self.reason = ("training loss spike" if extreme else
                           f"training loss spike, {self.high} steps in a row")
            self.high = 0
        elif trend:
            self.reason = "running training loss climbing back"
        if not spiked and not high:
            self.count += 1
            if ema + ema_noise <= best + best_noise:
                best, self.best_sd = ema, ema_sd(self.count)
                self.val_at_best = self.val_smooth
            self.smooth = (ema, first, best)
            if self.last is not None:  # None in a record saved before the noise statistics
                self.diffs.append(loss - self.last)
            self.last = loss
        return spiked

    def due(self, t: int) -> bool:
        """Whether a snapshot is due after healthy step count t."""
        return t % self.snapshot_every == 0

    def _stats(self) -> dict[str, Any]:
        return {"smooth": list(self.smooth), "last": self.last, "diffs": list(self.diffs),
                "count": self.count, "best_sd": self.best_sd, "high": self.high,
                "val_smooth": self.val_smooth, "val_at_best": self.val_at_best,
                "val_last": self.val_last, "val_count": self.val_count,
                "val_diffs": list(self.val_diffs)}

    def _load_stats(self, st: dict[str, Any]) -> None:
        self.smooth = tuple(st["smooth"])
        self.last = st.get("last")
        self.diffs = deque(st.get("diffs", ()), maxlen=_NOISE_WINDOW)
        self.count, self.best_sd = int(st.get("count", 0)), float(st.get("best_sd", 1.0))
        self.high = int(st.get("high", 0))
        # records saved before the guard watched validation losses have none
        self.val_smooth, self.val_at_best = st.get("val_smooth"), st.get("val_at_best")
        self.val_last, self.val_count = st.get("val_last"), int(st.get("val_count", 0))
        self.val_diffs = deque(st.get("val_diffs", ()), maxlen=_NOISE_WINDOW)

    def snapshot(self, record: dict[str, Any]) -> None:
        """Keep `record` (a copy of the tuner's state, which the guard does not copy again)
        together with the guard's running statistics."""
        self._snapshots.append({"record": record, **self._stats()})

    def rollback(self) -> dict[str, Any]:
        """The record to restore (the older snapshot), or GuardExhausted past max_rollbacks."""
        if self.rollbacks >= self.max_rollbacks:
            raise GuardExhausted(self.rollbacks)
        snap = self._snapshots[0]
        self._snapshots.clear()
        self._snapshots.append(snap)
        self._load_stats(snap)
        self.rollbacks += 1
        return snap["record"]

    def replace(self, record: dict[str, Any]) -> None:
        """Make `record` the only snapshot: the state a rollback restored, as the tuner then
        changed it (smaller step sizes), so that the next rollback compounds the change."""
        self._snapshots.clear()
        self.snapshot(record)

    def backoff(self, lr: float, initial: float) -> tuple[float, bool]:
        """(the meta learning rate after a rollback, whether the floor held it): half of `lr`,
        but never below `meta_lr_floor` x `initial`, so repeated rollbacks cannot stop tuning."""
        floor = self.meta_lr_floor * initial
        half = 0.5 * lr
        return (half, False) if half >= floor else (min(lr, floor), True)

    def state_dict(self) -> dict[str, Any]:
        """Counters, running statistics and snapshots (plain values and the records given)."""
        return {"rollbacks": self.rollbacks, **self._stats(),
                "snapshots": [{**s, "smooth": list(s["smooth"]), "diffs": list(s["diffs"]),
                               "val_diffs": list(s.get("val_diffs", ()))}
                              for s in self._snapshots]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore `state_dict`."""
        self.rollbacks = int(sd["rollbacks"])
        self._load_stats(sd)
        self._snapshots = deque(
            ({**s, "smooth": tuple(s["smooth"]), "diffs": list(s.get("diffs", ())),
              "val_diffs": list(s.get("val_diffs", ()))}
             for s in sd["snapshots"]), maxlen=2)
