"""Online hyperparameter optimization by real-time recurrent learning (OHO; Im, Savin & Cho
2021, "Online hyperparameter optimization by real-time recurrent learning").

One training run: the weights take an inner step every step, and every `hyper_every` steps the
hyperparameters take a meta-step along the hypergradient of a validation minibatch loss, read
from an engine's carry (the forward tangent ds/dλ, or a truncated window), never by
re-training. The loop is short because its parts are shared with every tuner: the engine
(hypergrad/engine.py), the MetaOptimizer, the DivergenceGuard and the state record.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import HyperparameterError
from ..hypergrad.forward import check_hvp, forward_engine
from ..hypergrad.truncated import TruncatedWindow, check_window
from ..problem import InnerState, Problem
from ..space import flatten, unflatten
from .checkpoint import Checkpointer, rng_state, set_rng_state
from .guard import DivergenceGuard, GuardExhausted
from .meta import KINDS as META_OPTIMIZERS
from .meta import MetaOptimizer
from .record import copy_record, load_record, save_record
from .schedule import Schedule

METHODS = ("forward", "greedy", "truncated")
RECORD_KIND = "OnlineTuner"


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
    """Tune hyperparameters inside one training run (`hd.OnlineTuner`).

    method: "forward" (exact RTRL tangent, OHO's `tangent="summed"` approximation, or
    `tangent="uoro"`, an unbiased rank-one estimate averaged over `uoro_samples`; unbiased
    variance reducers: `uoro_blocks="name"/"layer"`, and `uoro_centred=True`, which carries
    each name's mean over layers exactly and estimates only the deviations from it;
    `hvp="finite_difference"` / `"central_difference"`: its Hessian-vector products by
    differences of gradients, an approximation),
    "greedy" (tangent reset every step: one-step lookahead) or "truncated" (backprop through
    the last `window` steps, all replayed at the current values). Meta-steps are taken in raw
    coordinates (log / logit), so values never leave their bounds. The defaults (meta_lr 0.05,
    tangent reset every 200 steps, meta-Adam betas (0.9, 0.97)) come from
    benchmarks/oho_defaults.py and oho_recovery.py, which start every bundled task from a
    learning rate 100x too small (benchmarks/results/oho_defaults_recovery.md,
    oho_recovery.md): hypergradients shrink by orders of magnitude as training settles, and
    Adam's usual beta2 0.999 remembers the early large ones, so its steps shrank and the
    learning rate crawled (on cancer_logreg the validation loss came within 10% of its best
    only at 0.84 of a 1500-step run); beta2 0.97 forgets them in tens of steps (0.39 there).
    meta_lr 0.05 rather than 0.03 climbs out of the poor start sooner (digits_mlp 0.29 of the
    run rather than 0.42); it passed the stability checks once the guard stopped rolling back
    for a training loss that climbs while the validation loss falls (see DivergenceGuard).
    200-step tangent windows rather than 50 weigh the longer-term effect of the learning rate
    (the short-horizon bias of Wu et al. 2018, "Understanding short-horizon bias in stochastic
    meta-optimization"): cancer_logreg came within 10% of its best at 0.25 of the run rather
    than 0.46 (10 seeds). They passed the stability checks once a rollback that finds the
    weights shrunk halves the `regularizers` instead of the step sizes; 100-step windows
    failed the lr x 10 perturbation on digits_mlp. `reset_every` applies to the forward
    tangent only, and so does `tangent_growth`: the tangent is also reset (the record says
    `tangent_reset`: steps into its window) once its norm k steps after a reset exceeds
    tangent_growth x k x its norm after the first step, and the step sizes named in
    `backtrack` are halved as at a rollback. A stable inner step adds its direct effect to a
    contracting tangent, which grows about linearly (at most k/(1 - momentum) times), while
    past the stability edge it grows geometrically and the hypergradient is noise of random
    sign; on the bundled tasks stable windows stayed below 22 x k and exploding ones passed
    76 x k. From lr 0.5 (3 seeds, benchmarks/results/oho_stability.json) OHO then ends at
    test loss 0.097-0.131 on digits_mlp (0.095-0.205 without it, at meta_lr 0.03 and reset
    50; fixed-lr median 0.185) and 0.77-1.32 on mnist1d_mlp (0.80-1.23; fixed-lr median 1.381).
    From lr/100 it never fired with 50-step windows; with 200-step ones it fires 0-3 times a
    1500-step run (oho_recovery.json's traces).
    `history` holds one record per inner step (train loss, hyperparameters used, tangent
    norm, wall time) with the validation loss, the hypergradient (natural units) and its
    raw-coordinate norm on meta-steps, which are every step by default; hyper_every=2 with
    meta_lr=0.06 did as well as every step at 0.03 on every bundled task in oho_defaults.py
    --hyper-every 1 2. compile=True runs the forward engine's steps as one torch.compile'd
    function (faster per step after a compilation). The divergence guard
    (spike_factor, trend_factor, giveback, noise_tolerance: see DivergenceGuard) rolls back
    to a snapshot, halves meta_lr (never below meta_lr_floor x its initial value, reported
    once as a "meta_lr_floor" event) and halves the step sizes named in `backtrack`, or the
    regularizers named in `regularizers` when the weights shrank since the snapshot while the
    loss climbed (too much weight decay pulls them in, and halving lr would only slow the
    meta-steps that bring it back down; the event's "halved" says which); with
    tune_on="val" it is handed every meta-step's validation loss, and a training loss that
    climbs back while that loss falls by more than a tenth is not rolled back for.

    meta_optimizer: "adam" (the default), "sgd", "sign" or "normalized": normalized momentum
    (Cutkosky & Mehta 2020) with one root-mean-square over every raw coordinate and each step at
    most meta_lr, so a hyperparameter whose hypergradient is negligible beside the others' stays
    put and no second moment remembers the large hypergradients of a ramp. From lr/100 at
    meta_lr 0.03 it came within 10% of the best sooner than Adam at 0.03 on three bundled tasks
    of four (as soon as Adam at 0.05 on digits_mlp), later on cancer_logreg; from the default
    lr at meta_lr 0.06 every 2 steps it drove lr down to 4e-5 once the net had fitted its
    training set, as Adam, whose steps shrink with the hypergradient, did not, and with
    per-layer values it ended worse than Adam (benchmarks/results/oho_recovery_notes.md).
    clip: the largest joint norm of a raw hypergradient; "auto" is 1.0, or None for
    "normalized", whose step is scale-free (a clip would only weigh its momentum towards the
    small hypergradients early in each window).
    """

    def __init__(self, problem: Problem, method: str = "forward", meta_optimizer: str = "adam",
                 meta_lr: float = 0.05, hyper_every: int = 1, reset_every: int | None = 200,
                 tune_on: str = "val", clip: float | str | None = "auto", tangent: str = "exact",
                 window: int = 10, horizon: int | None = None, spike_factor: float = 3.0,
                 trend_factor: float = 1.2, giveback: float = 0.3,
                 snapshot_every: int = 25, max_rollbacks: int = 20,
                 backtrack: tuple[str, ...] = ("lr",), compile: bool | dict = False,
                 uoro_samples: int = 1, uoro_blocks: str = "all", uoro_centred: bool = False,
                 hvp: str = "autodiff", noise_tolerance: float = 4.0,
                 meta_lr_floor: float = 0.01, meta_betas: tuple[float, float] = (0.9, 0.97),
                 tangent_growth: float | None = 50.0,
                 regularizers: tuple[str, ...] = ("weight_decay",)):
        if method not in METHODS:
            raise HyperparameterError(f"method={method!r} is not one of {METHODS}")
        if meta_optimizer not in META_OPTIMIZERS:
            raise HyperparameterError(
                f"meta_optimizer={meta_optimizer!r} is not one of {META_OPTIMIZERS}")
        if isinstance(clip, str):
            if clip != "auto":
                raise HyperparameterError(f"clip must be a positive number, None or 'auto', got "
                                          f"{clip!r}")
            # the normalized step is scale-free: a clip would only weigh its momentum towards the
            # small early-window hypergradients of each tangent window
            clip = None if meta_optimizer == "normalized" else 1.0
        if tune_on not in ("val", "train"):
            raise HyperparameterError(f"tune_on={tune_on!r} is not one of 'val', 'train'")
        _check_int("hyper_every", hyper_every, 1)
        if reset_every is not None:
            _check_int("reset_every", reset_every, 1)
        if horizon is not None:
            _check_int("horizon", horizon, 1)
        if method == "truncated":
            check_window(window)
        check_hvp(hvp)
        if hvp != "autodiff" and method == "truncated":
            raise HyperparameterError(f"hvp={hvp!r} is an option of the forward tangent, not of "
                                      "method='truncated'")
        problem.bound.space.require_differentiable(f"OnlineTuner(method={method!r})")
        if not problem.bound.real_names():
            raise HyperparameterError("the problem's space has no Real hyperparameter to tune")
        backtrack = _check_names("backtrack", backtrack, ("lr",), problem)
        regularizers = _check_names("regularizers", regularizers, ("weight_decay",), problem)
        self.problem = problem
        self.config = dict(method=method, meta_optimizer=meta_optimizer, meta_lr=meta_lr,
                           hyper_every=hyper_every, reset_every=reset_every, tune_on=tune_on,
                           clip=clip, tangent=tangent, window=window, horizon=horizon,
                           spike_factor=spike_factor, trend_factor=trend_factor, giveback=giveback,
                           snapshot_every=snapshot_every,
                           max_rollbacks=max_rollbacks, backtrack=backtrack,
                           regularizers=regularizers,
                           compile=compile, uoro_samples=uoro_samples,
                           uoro_blocks=uoro_blocks, uoro_centred=uoro_centred, hvp=hvp,
                           noise_tolerance=noise_tolerance, meta_lr_floor=meta_lr_floor,
                           meta_betas=tuple(meta_betas) if isinstance(meta_betas, (tuple, list))
                           else meta_betas)
        if tangent_growth is not None and (isinstance(tangent_growth, bool) or not isinstance(
                tangent_growth, (int, float)) or not tangent_growth > 0
                or not math.isfinite(tangent_growth)):
            raise HyperparameterError(f"tangent_growth must be a positive number or None, got "
                                      f"{tangent_growth!r}")
        self.config["tangent_growth"] = tangent_growth
        self.horizon = horizon or 1000
        self.like = problem.real_hparams()
        bound = problem.bound
        self.meta = MetaOptimizer(
            flatten(bound.to_raw(self.like)), meta_optimizer, meta_lr, clip,
            project=lambda raw: flatten(bound.project_raw(unflatten(raw, self.like))),
            betas=meta_betas)
        self.guard = DivergenceGuard(spike_factor, trend_factor, giveback, snapshot_every,
                                     max_rollbacks, noise_tolerance, meta_lr_floor)
        self.state: InnerState = problem.init_state()
        if method == "truncated":
            self.engine = TruncatedWindow(problem, self.horizon, window)
        else:
            self.engine = forward_engine(problem, self.horizon, tangent,
                                         compile=compile if method == "forward" else False,
                                         uoro_samples=uoro_samples, uoro_blocks=uoro_blocks,
                                         uoro_centred=uoro_centred, hvp=hvp)
        self.carry = self.engine.init()
        self.history: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self._fault_step: int | None = None  # the step of the last non-finite rollback
        self.t = 0
        # the tangent's window: the step it was last reset at, the norm after its first step,
        # and whether it grew past tangent_growth (reset before the next step)
        self._window: dict[str, Any] = {"start": 0, "first": None, "blown": False}
        self.elapsed = 0.0
        self.guard.snapshot(self._snapshot())

    # -- hyperparameters -----------------------------------------------------------------
    @property
    def raw(self) -> dict[str, torch.Tensor]:
        """The raw coordinates the meta-optimizer steps (flat leaves)."""
        return self.meta.raw

    @property
    def meta_lr(self) -> float:
        """The current meta learning rate (halved at every rollback)."""
        return self.meta.lr

    @property
    def rollbacks(self) -> int:
        """How many rollbacks the guard has taken."""
        return self.guard.rollbacks

    def _natural_leaves(self) -> dict[str, torch.Tensor]:
        raw = unflatten(self.meta.values(), self.like)
        return flatten(self.problem.bound.to_natural(raw))

    @property
    def hparams(self) -> dict[str, Any]:
        """Current natural values, in the value shapes of `hd.Problem.hparams`."""
        return unflatten(self._natural_leaves(), self.like)

    @property
    def model(self) -> torch.nn.Module:
        """The problem's module holding the current weights (and buffers)."""
        return self.problem.write_weights(self.state.params, self.state.buffers)

    def _publish(self) -> None:
        """Let `problem.hparams` show the tuner's current values."""
        self.problem._natural.update(self.hparams)

    # -- one step ------------------------------------------------------------------------
    def step(self, batch=None, val_batch=None) -> dict[str, Any]:
        """One inner step, and a meta-step every `hyper_every` steps; returns the record."""
        record = self._step(batch, val_batch)
        self._publish()
        return record

    def _step(self, batch, val_batch) -> dict[str, Any]:
        cfg, problem = self.config, self.problem
        t0 = time.perf_counter()
        t = self.t
        leaves = self._natural_leaves()
        hp_used = to_plain(problem.hp_at(unflatten(leaves, self.like), t, self.horizon))
        win = self._window
        if cfg["method"] == "greedy" or (cfg["method"] == "forward" and (
                win["blown"] or (cfg["reset_every"]
                                  and (t - win["start"]) % cfg["reset_every"] == 0))):
            self.carry = self.engine.reset(self.carry)
            self._window = win = {"start": t, "first": None, "blown": False}
        if batch is None and cfg["method"] != "truncated":
            batch = problem.train_batch(t)
        # engines never write a state or carry in place: these stay the pre-step ones
        before = (self.state, self.carry)
        self.state, self.carry, loss = self.engine.step(self.carry, self.state, batch, leaves, t)
        record: dict[str, Any] = {"step": t, "train_loss": loss.item(), "hparams": hp_used,
                                  "tangent_norm": self.engine.tangent_norm(self.carry)}
        self.t += 1
        if self.guard.diverged(self.t, record["train_loss"]):
            # a batch is checked only once its loss is not finite (no cost on healthy steps):
            # a batch holding NaN/inf is skipped from the pre-step state, not rolled back for
            checked = batch if batch is not None or not problem.replayable else \
                problem.train_batch(t)
            if not math.isfinite(record["train_loss"]) and checked is not None \
                    and not _finite_batch(checked):
                self.state, self.carry = before
                return self._skip(t0, {"step": t, "train_loss": math.nan, "hparams": hp_used},
                                  "non-finite values in the training batch")
            if not math.isfinite(record["train_loss"]) and self._fault_step == t:
                # non-finite again at the same step after rolling back to before it: the
                # batch overflows whatever the weights, so it is skipped, not retried
                self.state, self.carry = before
                self._fault_step = None
                return self._skip(t0, record, "non-finite training loss again after a "
                                              "rollback")
            if not math.isfinite(record["train_loss"]):
                self._fault_step = t
            self.elapsed += time.perf_counter() - t0
            return self._rollback(record)
        self._watch_tangent(t, record)
        if self.t % cfg["hyper_every"] == 0:
            record.update(self._meta_step(val_batch))
        self.elapsed += time.perf_counter() - t0
        record["wall_time"] = self.elapsed
        self.history.append(record)
        if self.guard.due(self.t):
            self.guard.snapshot(self._snapshot())
        return record

    def _watch_tangent(self, t: int, record: dict[str, Any]) -> None:
        """Mark the tangent for a reset once it grows faster than the inner step can carry
        it while that step is stable."""
        growth, win = self.config["tangent_growth"], self._window
        if growth is None or self.config["method"] != "forward":
            return
        k, norm = t + 1 - win["start"], record["tangent_norm"]
        if win["first"] is None:
            win["first"] = norm
        elif win["first"] > 0 and norm > growth * k * win["first"]:
            # a contracting (stable) step adds its direct effect ∂step/∂λ to a decaying
            # tangent, so the norm grows at most like k/(1 - momentum) x its first value;
            # geometric growth means the step's Jacobian expands (the learning rate is past the
            # stability edge) and the tangent, and with it the hypergradient, is chaotic noise:
            # a fresh, short tangent still points the way
            win["blown"] = True
            record["tangent_reset"] = k
            # the same instability the guard backtracks for, seen before the loss shows it
            self._backtrack_step_sizes()

    def _meta_step(self, val_batch) -> dict[str, Any]:
        problem = self.problem
        if val_batch is None:
            val_batch = (problem.val_batch(self.t) if self.config["tune_on"] == "val"
                         else problem.train_batch(self.t))
        value, grads = self.engine.readout(self.carry, self.state, val_batch)
        if self.config["tune_on"] == "val":
            self.guard.observe_val(value)
        raw = unflatten(self.meta.values(), self.like)
        dnat = flatten(problem.bound.dnatural_draw(raw))
        raw_grads = {k: grads[k] * dnat[k] for k in grads}
        if not math.isfinite(value):
            raw_grads = {k: torch.full_like(g, math.nan) for k, g in raw_grads.items()}
        info = self.meta.step(raw_grads)
        out = {"val_loss": value, "hypergrad_norm": info["hypergrad_norm"],
               "hypergrad": to_plain(unflatten(grads, self.like))}
        if info["skipped"]:
            self.events.append({"step": self.t - 1, "event": "skipped_meta_step",
                                "why": "non-finite hypergradient or validation loss"})
            out["event"] = "skipped_meta_step"
        return out

    # -- stability -----------------------------------------------------------------------
    def _skip(self, t0: float, record: dict[str, Any], why: str) -> dict[str, Any]:
        """Step `record["step"]` leaves weights, carry and hyperparameters as they were; the
        history keeps its record with the reason."""
        self.elapsed += time.perf_counter() - t0
        event = {"step": record["step"], "event": "skipped_step", "why": why}
        self.events.append(event)
        record = {**record, **event, "wall_time": self.elapsed}
        self.history.append(record)
        if self.guard.due(self.t):
            self.guard.snapshot(self._snapshot())
        return record

    def _rollback(self, record: dict[str, Any]) -> dict[str, Any]:
        """Diverging inner loss: restore the older snapshot, halve the meta learning rate and
        backtrack the step sizes, or halve the regularizers if the weights shrank."""
        try:
            snap = self.guard.rollback()
        except GuardExhausted:
            # past the limit the guard stands aside: the run goes on and keeps its results
            if math.isfinite(record["train_loss"]):
                if not any(e["event"] == "guard_exhausted" for e in self.events):
                    self.events.append({"step": record["step"], "event": "guard_exhausted",
                                        "train_loss": record["train_loss"]})
                record["wall_time"] = self.elapsed
                self.history.append(record)
                return record
            raise FloatingPointError(
                f"inner training diverged {self.rollbacks} times (train loss "
                f"{record['train_loss']}); lower meta_lr or start from a smaller learning rate"
            ) from None
        lr, floored = self.guard.backoff(self.meta.lr, self.config["meta_lr"])
        # weights that shrank since the snapshot while the loss climbed (finitely) were pulled
        # in by too much regularization, not thrown out by too large a step: halving the step
        # sizes then only slows the meta-steps that would bring the regularizers back down
        shrunk = math.isfinite(record["train_loss"]) and \
            _norm(self.state.params) < _norm(snap["state"]["params"])
        regularizers = self._named("regularizers")
        halved = regularizers if shrunk and regularizers else self._named("backtrack")
        self._restore_snapshot(snap)
        self._halve(halved)
        self.meta.set_lr(lr)
        # rolling back to this snapshot again must halve the halved values, not the originals
        self.guard.replace(self._snapshot())
        event = {"step": record["step"], "event": "rollback", "to_step": snap["t"],
                 "train_loss": record["train_loss"], "meta_lr": self.meta.lr,
                 "why": self.guard.reason, "halved": halved}
        self.events.append(event)
        if floored and not any(e["event"] == "meta_lr_floor" for e in self.events):
            # said once: from here on rollbacks no longer slow tuning down
            self.events.append({"step": record["step"], "event": "meta_lr_floor",
                                "meta_lr": self.meta.lr, "rollbacks": self.rollbacks})
        return {**record, **event}

    def _backtrack_step_sizes(self) -> None:
        """Halve learning-rate hyperparameters after a divergence (backtracking line search):
        the snapshot's values may already be past the stability edge, and replaying them with a
        smaller meta learning rate alone would diverge again."""
        self._halve(self._named("backtrack"))

    def _named(self, option: str) -> list[str]:
        """The tuned hyperparameters that the names option `option` lists, in space order."""
        return [n for n in self.like if n in self.config[option]]

    def _halve(self, names: list[str]) -> None:
        """Halve the named hyperparameters' current values (clamped to their bounds)."""
        if not names:
            return
        nat = self.problem.bound.to_natural(unflatten(self.meta.values(), self.like))
        for n in names:
            hp = self.problem.bound.space[n]
            v = nat[n]
            nat[n] = ({p: (x * 0.5).clamp(hp.low, hp.high) for p, x in v.items()}
                      if isinstance(v, dict) else (v * 0.5).clamp(hp.low, hp.high))
        self.meta.assign(flatten(self.problem.bound.to_raw({n: nat[n] for n in names})))

    # -- the state record ----------------------------------------------------------------
    def _core(self) -> dict[str, Any]:
        """What a snapshot restores: step, weights, engine carry, meta-optimizer (references;
        callers copy)."""
        return {"t": self.t, "state": self.state.as_record(),
                "carry": _carry_record(self.carry), "meta": self.meta.state_dict(),
                "history_len": len(self.history), "window": dict(self._window)}

    def _snapshot(self) -> dict[str, Any]:
        return copy_record(self._core())

    def _restore_snapshot(self, snap: Mapping[str, Any]) -> None:
        snap = copy_record(snap)
        self.t = snap["t"]
        self.state = InnerState.from_record(snap["state"])
        self.carry = _carry_from_record(snap["carry"])
        self.meta.load_state_dict(snap["meta"])
        del self.history[snap["history_len"]:]
        reset = self.config["reset_every"]
        # a record saved before windows were kept reset on multiples of reset_every
        self._window = dict(snap.get("window") or {
            "start": self.t - self.t % reset if reset else 0, "first": None, "blown": False})

    def state_dict(self) -> dict[str, Any]:
        """The whole state record: everything needed to continue this run exactly (tensors,
        plain values; snapshots and guard state included, so a resumed run rolls back as an
        uninterrupted one would)."""
        cfg = dict(self.config)
        if cfg["compile"] is not False and not isinstance(cfg["compile"], (bool, dict)):
            cfg["compile"] = bool(cfg["compile"])
        return {**self._core(), "config": cfg, "elapsed": self.elapsed,
                "horizon": self.horizon, "history": self.history, "events": self.events,
                "guard": self.guard.state_dict(), "rng": rng_state(),
                "fault_step": self._fault_step,
                "data": {"replayable": self.problem.replayable, "position": self.t,
                         **{f"{name}_consumed": stream.consumed
                            for name, stream in (("train", self.problem.train_data),
                                                 ("val", self.problem.val_data))
                            if hasattr(stream, "consumed")}}}

    def save(self, path: str | Path) -> None:
        """Write the whole tuner state to `path` atomically (fsync'd temp file + rename)."""
        save_record(path, self.state_dict(), RECORD_KIND)

    @classmethod
    def load(cls, path: str | Path, problem: Problem) -> OnlineTuner:
        """Restore a tuner saved by `save`, bound to `problem` (same model, space and data);
        the global random generators (torch, CUDA, `random`) are set back to their states at
        the save and streams read past the batches already used, so the run goes on as if
        never interrupted."""
        sd = load_record(path, RECORD_KIND)
        tuner = cls(problem, **sd["config"])
        tuner.horizon = sd["horizon"]
        tuner.engine.horizon = sd["horizon"]
        tuner._restore_snapshot(sd)
        tuner.history = list(sd["history"])
        tuner.events = list(sd["events"])
        tuner.elapsed = sd["elapsed"]
        tuner.guard.load_state_dict(sd["guard"])
        tuner._fault_step = sd.get("fault_step")
        for name, stream in (("train", problem.train_data), ("val", problem.val_data)):
            if hasattr(stream, "skip_to") and f"{name}_consumed" in sd.get("data", {}):
                stream.skip_to(sd["data"][f"{name}_consumed"])
        if "rng" in sd:
            set_rng_state(sd["rng"])
        return tuner

    # -- driving -------------------------------------------------------------------------
    def run(self, steps: int, callback=None, checkpoint: str | Path | None = None,
            checkpoint_every: int | None = None) -> OnlineTuner:
        """Run until `steps` inner steps have been taken in total (the horizon of schedules).

        With `checkpoint=PATH` the whole state record is written there atomically every
        `checkpoint_every` steps (default 50), when the run ends, and on SIGINT/SIGTERM (after
        the step under way; the signal then takes its usual effect): `OnlineTuner.load(PATH,
        problem).run(steps)` then ends bit-identical to a run never interrupted."""
        _check_int("steps", steps, 1)
        if callback is not None and not callable(callback):
            raise HyperparameterError(f"callback must be callable(tuner, record), got "
                                      f"{callback!r}")
        if self.config["horizon"] is None and self.t == 0:
            self.horizon = self.engine.horizon = steps
        with Checkpointer(checkpoint, checkpoint_every, self.save) as ck:
            while self.t < steps and not ck.stop:
                record = self._step(None, None)
                ck.after_step(self.t)
                if callback is not None:
                    callback(self, record)
            self._publish()
        return self

    def schedule(self) -> Schedule:
        """The learned trajectory: the hyperparameters each step used, replayable in torch.optim."""
        return Schedule([r["hparams"] for r in self.history])

    def evaluate(self, which: str = "val") -> dict[str, float]:
        """Loss and accuracy of the current weights on the whole val or test split."""
        return self.problem.evaluate(self.state.params, self.state.buffers, which)


def _finite_batch(batch) -> bool:
    """Whether the floating-point tensors of an (x, y) batch hold only finite values."""
    return all(torch.isfinite(v).all().item() for v in batch
               if isinstance(v, torch.Tensor) and v.is_floating_point())


def _check_names(option: str, names, default: tuple[str, ...], problem: Problem
                 ) -> tuple[str, ...]:
    """A tuple of hyperparameter names for `option`; names the space lacks are refused unless
    `option` is left at its default (which then applies to the names present)."""
    if isinstance(names, str):
        names = (names,)
    if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) for n in names):
        raise HyperparameterError(
            f"{option} must be a tuple of hyperparameter names, e.g. {default!r}, got {names!r}")
    unknown = sorted(set(names) - set(problem.bound.real_names()))
    if unknown and set(names) != set(default):
        raise HyperparameterError(
            f"{option} names {unknown}, which the space does not have; it has "
            f"{problem.bound.real_names()}")
    return tuple(names)


def _norm(params: Mapping[str, torch.Tensor]) -> float:
    """The Euclidean norm of all weights together."""
    return math.sqrt(sum(float(p.detach().double().square().sum()) for p in params.values()))


def _check_int(name: str, v, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise HyperparameterError(f"{name} must be an integer >= {low}, got {v!r}")


def _carry_record(carry: Mapping[str, Any]) -> dict[str, Any]:
    """An engine carry in record form (window states as plain dicts)."""
    if "window" in carry:
        return {"window": [{**e, "state": e["state"].as_record()} for e in carry["window"]]}
    return dict(carry)


def _carry_from_record(rec: Mapping[str, Any]) -> dict[str, Any]:
    if "window" in rec:
        return {"window": [{**e, "state": InnerState.from_record(e["state"])}
                           for e in rec["window"]]}
    return dict(rec)
