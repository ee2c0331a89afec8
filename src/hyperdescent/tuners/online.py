"""Online hyperparameter optimization by real-time recurrent learning (OHO; Im et al. 2021).

One training run: the weights take an inner step every step, and every `hyper_every` steps the
hyperparameters take a meta-step along the hypergradient of a validation minibatch loss, read
from the tangent ds/dλ carried forward by the forward engine (never by re-training).
"""

from __future__ import annotations

import copy
import math
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import HyperparameterError
from ..hypergrad.forward import ForwardTangent
from ..hypergrad.truncated import window_hypergrad
from ..problem import InnerState, Problem
from ..space import flatten, unflatten
from .schedule import Schedule

METHODS = ("forward", "greedy", "truncated")
META_OPTIMIZERS = ("adam", "sgd", "sign")


def to_plain(values: Mapping[str, Any]) -> dict[str, Any]:
    """Natural values as JSON-friendly floats/lists (per-parameter tensors summarised by mean)."""
    def conv(x):
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, torch.Tensor):
            return x.item() if x.numel() == 1 else x.detach().double().mean().item() \
                if x.dim() > 1 else [float(v) for v in x]
        return x
    return {k: conv(v) for k, v in values.items()}


class OnlineTuner:
    """Tune hyperparameters inside one training run (API.md `hd.OnlineTuner`).

    method: "forward" (exact RTRL tangent, or OHO's `tangent="summed"` approximation),
    "greedy" (tangent reset every step: one-step lookahead) or "truncated" (backprop through
    the last `window` steps). Meta-steps are taken in raw coordinates (log / logit), so values
    never leave their bounds. The defaults (meta_lr 0.03, tangent reset every 50 steps) come from
    benchmarks/oho_defaults.py. `history` holds one record per inner step (train loss,
    hyperparameters used, tangent norm, wall time) with the validation loss and hypergradient
    norm on meta-steps, which are every step by default. hyper_every=2 with meta_lr=0.06 did as
    well on every bundled task for a sixth less time per step (oho_defaults.py
    --hyper-every 1 2), at the price of those two entries on every other step only. compile=True
    runs the forward engine's steps as one torch.compile'd function (faster per step after a
    compilation of tens of seconds).
    """

    def __init__(self, problem: Problem, method: str = "forward", meta_optimizer: str = "adam",
                 meta_lr: float = 0.03, hyper_every: int = 1, reset_every: int | None = 50,
                 tune_on: str = "val", clip: float | None = 1.0, tangent: str = "exact",
                 window: int = 10, horizon: int | None = None, spike_factor: float = 3.0,
                 trend_factor: float = 1.2, giveback: float = 0.3,
                 snapshot_every: int = 25, max_rollbacks: int = 20,
                 backtrack: tuple[str, ...] = ("lr",), compile: bool | dict = False):
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not one of {METHODS}")
        if meta_optimizer not in META_OPTIMIZERS:
            raise ValueError(f"meta_optimizer={meta_optimizer!r} is not one of {META_OPTIMIZERS}")
        if tune_on not in ("val", "train"):
            raise ValueError(f"tune_on={tune_on!r} is not one of 'val', 'train'")
        if hyper_every < 1:
            raise ValueError(f"hyper_every must be >= 1, got {hyper_every}")
        if method == "truncated" and window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        problem.bound.space.require_differentiable(f"OnlineTuner(method={method!r})")
        if not problem.bound.real_names():
            raise HyperparameterError("the problem's space has no Real hyperparameter to tune")
        self.problem = problem
        self.config = dict(method=method, meta_optimizer=meta_optimizer, meta_lr=meta_lr,
                           hyper_every=hyper_every, reset_every=reset_every, tune_on=tune_on,
                           clip=clip, tangent=tangent, window=window, horizon=horizon,
                           spike_factor=spike_factor, trend_factor=trend_factor, giveback=giveback,
                           snapshot_every=snapshot_every,
                           max_rollbacks=max_rollbacks, backtrack=tuple(backtrack),
                           compile=compile)
        self.horizon = horizon or 1000
        self.like = problem.real_hparams()
        raw = flatten(problem.bound.to_raw(self.like))
        self.raw = {k: v.detach().clone().requires_grad_(True) for k, v in raw.items()}
        self.meta_lr = float(meta_lr)
        self.meta = self._make_meta(self.meta_lr)
        self.state: InnerState = problem.init_state()
        self.engine = ForwardTangent(problem, self.horizon, tangent,
                                     compile=compile if method == "forward" else False)
        self.window: deque = deque(maxlen=window)
        self.history: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.t = 0
        self.elapsed = 0.0
        self.rollbacks = 0
        self._smooth = self._first = self._best_smooth = None
        # two snapshots: the newer one may already hold a state that is about to blow up, so
        # a rollback returns to the older one, validated by `snapshot_every` healthy steps
        self._snapshots: deque = deque(maxlen=2)
        self._take_snapshot()

    # -- hyperparameters -----------------------------------------------------------------
    def _make_meta(self, lr: float) -> torch.optim.Optimizer:
        params = list(self.raw.values())
        if self.config["meta_optimizer"] == "adam":
            # the fused kernel skips most of torch.optim's per-step Python: 93 vs 161 µs for
            # two scalar hyperparameters on CPU, where a meta-step is ~1 ms in all
            try:
                return torch.optim.Adam(params, lr=lr, fused=True)
            except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
                return torch.optim.Adam(params, lr=lr)
        return torch.optim.SGD(params, lr=lr)

    def _natural_leaves(self) -> dict[str, torch.Tensor]:
        raw = unflatten({k: v.detach() for k, v in self.raw.items()}, self.like)
        return flatten(self.problem.bound.to_natural(raw))

    @property
    def hparams(self) -> dict[str, Any]:
        """Current natural values, in the value shapes of API.md."""
        return unflatten(self._natural_leaves(), self.like)

    @property
    def model(self) -> torch.nn.Module:
        """The problem's module holding the current weights (and buffers)."""
        return self.problem.write_weights(self.state.params, self.state.buffers)

    # -- one step ------------------------------------------------------------------------
    def step(self, batch=None, val_batch=None) -> dict[str, Any]:
        """One inner step, and a meta-step every `hyper_every` steps; returns the record."""
        cfg, problem = self.config, self.problem
        t0 = time.perf_counter()
        t = self.t
        batch = batch if batch is not None else problem.train_batch(t)
        leaves = self._natural_leaves()
        hp_used = to_plain(unflatten(self.engine.current(leaves, t), self.like))
        if cfg["reset_every"] and t % cfg["reset_every"] == 0:
            self.engine.reset()
        if cfg["method"] == "greedy":
            self.engine.reset()
        start = self.state
        if cfg["method"] == "truncated":
            self.state, loss = problem.step(start, batch, problem.hp_at(
                unflatten(leaves, self.like), t, self.horizon))
            self.window.append((start, t, batch))
        else:
            self.state, loss = self.engine.step(start, batch, leaves, t)
        record: dict[str, Any] = {"step": t, "train_loss": loss.item(), "hparams": hp_used,
                                  "tangent_norm": self.engine.tangent_norm()}
        self.t += 1
        if not math.isfinite(record["train_loss"]) or self._spiked(record["train_loss"]):
            self.elapsed += time.perf_counter() - t0
            return self._rollback(record)
        if self.t % cfg["hyper_every"] == 0:
            record.update(self._meta_step(val_batch))
        self.elapsed += time.perf_counter() - t0
        record["wall_time"] = self.elapsed
        self.history.append(record)
        if self.t % cfg["snapshot_every"] == 0:
            self._take_snapshot()
        return record

    def _hypergrad(self, val_batch) -> tuple[float, dict[str, torch.Tensor]]:
        problem = self.problem
        if val_batch is None:
            val_batch = (problem.val_batch(self.t) if self.config["tune_on"] == "val"
                         else problem.train_batch(self.t))
        if self.config["method"] == "truncated":
            start = self.window[0][0]
            steps = [(t, b) for _, t, b in self.window]
            return window_hypergrad(problem, start, steps, self._natural_leaves(), self.horizon,
                                    val_batch)
        return self.engine.hypergrad(self.state, val_batch)

    def _meta_step(self, val_batch) -> dict[str, Any]:
        value, grads = self._hypergrad(val_batch)
        raw = unflatten({k: v.detach() for k, v in self.raw.items()}, self.like)
        dnat = flatten(self.problem.bound.dnatural_draw(raw))
        raw_grads = {k: grads[k] * dnat[k] for k in grads}
        norm = math.sqrt(sum(float((g * g).sum()) for g in raw_grads.values()))
        out = {"val_loss": value, "hypergrad_norm": norm}
        if not (math.isfinite(norm) and math.isfinite(value)):
            self.events.append({"step": self.t - 1, "event": "skipped_meta_step",
                                "why": "non-finite hypergradient or validation loss"})
            out["event"] = "skipped_meta_step"
            return out
        scale = 1.0
        clip = self.config["clip"]
        if clip is not None and norm > clip:
            scale = clip / norm
        for k, p in self.raw.items():
            g = raw_grads[k] * scale
            p.grad = torch.sign(g) if self.config["meta_optimizer"] == "sign" else g.clone()
        self.meta.step()
        with torch.no_grad():
            projected = flatten(self.problem.bound.project_raw(
                unflatten({k: v.detach() for k, v in self.raw.items()}, self.like)))
            for k, p in self.raw.items():
                p.copy_(projected[k])
        return out

    # -- stability guards ----------------------------------------------------------------
    def _spiked(self, loss: float) -> bool:
        """Divergence: a batch loss far above the running average, above three times the
        first loss, or a running average that climbed well above its best (a slow blow-up
        that kills ReLUs without any single spike): by more than (trend_factor - 1) of the
        best, or, early on, by more than `giveback` of the progress made since the start."""
        if self._smooth is None:
            self._smooth = self._first = loss
            self._best_smooth = loss
            return False
        floor = 0.05 * self._first
        ema = 0.9 * self._smooth + 0.1 * loss
        spiked = self.t > 5 and (
            # one batch may be hard (replaying it gives the same loss), so a single loss only
            # counts as a spike once it is also above where training started
            loss > max(self.config["spike_factor"] * max(self._smooth, floor), self._first)
            or loss > 3 * self._first
            or (self.t > 20 and ema > self._best_smooth + floor + min(
                (self.config["trend_factor"] - 1) * self._best_smooth,
                # early on, a loss that gives back a large share of the progress made is
                # a run that has stalled at chance (dead ReLUs) before any spike shows
                self.config["giveback"] * (self._first - self._best_smooth))))
        if not spiked:
            self._smooth = ema
            self._best_smooth = min(self._best_smooth, ema)
        return spiked

    def _take_snapshot(self) -> None:
        self._snapshots.append({
            "t": self.t, "state": self.state.clone(), "engine": self.engine.state_dict(),
            "raw": {k: v.detach().clone() for k, v in self.raw.items()},
            "meta": copy.deepcopy(self.meta.state_dict()), "history_len": len(self.history),
            "window": list(self.window),
            "smooth": (self._smooth, self._first, self._best_smooth)})

    def _rollback(self, record: dict[str, Any]) -> dict[str, Any]:
        """Diverging inner loss: restore the last good state and halve the meta learning rate."""
        if self.rollbacks >= self.config["max_rollbacks"]:
            # past the limit the guard stands aside: the run goes on and keeps its results
            if math.isfinite(record["train_loss"]):
                event = {"step": record["step"], "event": "guard_exhausted",
                         "train_loss": record["train_loss"]}
                if not any(e["event"] == "guard_exhausted" for e in self.events):
                    self.events.append(event)
                record["wall_time"] = self.elapsed
                self.history.append(record)
                return record
            raise FloatingPointError(
                f"inner training diverged {self.rollbacks} times (train loss "
                f"{record['train_loss']}); lower meta_lr or start from a smaller learning rate")
        snap = self._snapshots[0]
        self._snapshots.clear()
        self._snapshots.append(snap)
        self._smooth, self._first, self._best_smooth = snap["smooth"]
        self.rollbacks += 1
        self.meta_lr *= 0.5
        self.t = snap["t"]
        self.state = snap["state"].clone()
        self.engine.load_state_dict(snap["engine"])
        with torch.no_grad():
            for k, p in self.raw.items():
                p.copy_(snap["raw"][k])
        self._backtrack_step_sizes()
        self.meta = self._make_meta(self.meta_lr)
        meta_state = copy.deepcopy(snap["meta"])
        meta_state["param_groups"][0]["lr"] = self.meta_lr
        self.meta.load_state_dict(meta_state)
        del self.history[snap["history_len"]:]
        self.window = deque(snap["window"], maxlen=self.window.maxlen)
        event = {"step": record["step"], "event": "rollback", "to_step": snap["t"],
                 "train_loss": record["train_loss"], "meta_lr": self.meta_lr}
        self.events.append(event)
        return {**record, **event}

    def _backtrack_step_sizes(self) -> None:
        """Halve learning-rate hyperparameters after a divergence (backtracking line search):
        the snapshot's values may already be past the stability edge, and replaying them with a
        smaller meta learning rate alone would diverge again."""
        names = [n for n in self.like if n in self.config["backtrack"]]
        if not names:
            return
        raw = unflatten({k: v.detach() for k, v in self.raw.items()}, self.like)
        nat = self.problem.bound.to_natural(raw)
        for n in names:
            hp = self.problem.bound.space[n]
            v = nat[n]
            nat[n] = ({p: (x * 0.5).clamp(hp.low, hp.high) for p, x in v.items()}
                      if isinstance(v, dict) else (v * 0.5).clamp(hp.low, hp.high))
        new_raw = flatten(self.problem.bound.to_raw({n: nat[n] for n in names}))
        with torch.no_grad():
            for k, x in new_raw.items():
                self.raw[k].copy_(x)

    # -- driving -------------------------------------------------------------------------
    def run(self, steps: int, callback=None) -> OnlineTuner:
        """Run until `steps` inner steps have been taken in total (the horizon of schedules)."""
        if self.config["horizon"] is None and self.t == 0:
            self.horizon = self.engine.horizon = steps
        while self.t < steps:
            record = self.step()
            if callback is not None:
                callback(self, record)
        return self

    def schedule(self) -> Schedule:
        """The learned trajectory: the hyperparameters each step used, replayable in torch.optim."""
        return Schedule([r["hparams"] for r in self.history])

    def evaluate(self, which: str = "val") -> dict[str, float]:
        """Loss and accuracy of the current weights on the whole val or test split."""
        return self.problem.evaluate(self.state.params, self.state.buffers, which)

    # -- persistence ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly."""
        return {"config": self.config, "t": self.t, "elapsed": self.elapsed,
                "horizon": self.horizon, "state": self.state.clone(),
                "engine": self.engine.state_dict(),
                "raw": {k: v.detach().clone() for k, v in self.raw.items()},
                "meta_lr": self.meta_lr, "meta": self.meta.state_dict(),
                "history": self.history, "events": self.events, "rollbacks": self.rollbacks,
                "smooth": (self._smooth, self._first, self._best_smooth), "window": list(self.window)}

    def save(self, path: str | Path) -> None:
        """Write the whole tuner state to `path` (atomically)."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, problem: Problem) -> OnlineTuner:
        """Restore a tuner saved by `save`, bound to `problem` (same model, space and data)."""
        sd = torch.load(path, weights_only=False)
        tuner = cls(problem, **sd["config"])
        tuner.t, tuner.elapsed, tuner.horizon = sd["t"], sd["elapsed"], sd["horizon"]
        tuner.state = sd["state"]
        tuner.engine.load_state_dict(sd["engine"])
        with torch.no_grad():
            for k, p in tuner.raw.items():
                p.copy_(sd["raw"][k])
        tuner.meta_lr = sd["meta_lr"]
        tuner.meta = tuner._make_meta(tuner.meta_lr)
        tuner.meta.load_state_dict(sd["meta"])
        tuner.history, tuner.events, tuner.rollbacks = sd["history"], sd["events"], sd["rollbacks"]
        tuner._smooth, tuner._first, tuner._best_smooth = sd["smooth"]
        tuner.window = deque(sd["window"], maxlen=sd["config"]["window"])
        tuner._take_snapshot()
        return tuner
