"""STNTrainer: alternating best-response training of a self-tuning network (MacKay et al. 2019, Alg. 1).

Weight steps fit the elementary and hypernetwork weights on training batches with every
example's hyperparameters perturbed, λ̃ = λ + softplus(σ)·ε (ε ~ N(0, I)) in raw coordinates,
regularisation (dropout, augmentation, penalties) applied at the natural value of λ̃.
Hyperparameter steps move λ and σ along the gradient of the validation loss through the
hypernetwork (regularisation off) minus τ times the entropy of the perturbation,
Σ log softplus(σ) + const. With `centred` (Bae & Grosse 2020, Δ-STN) the hypernetwork sees
λ̃ - stopgrad(λ) instead of λ̃.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .. import distributed as dp
from ..data import ReplayableBatches, as_tensor_pair, seed_for
from ..errors import DataError, HyperparameterError
from ..space import Real, Space
from ..tuners.checkpoint import Checkpointer
from ..tuners.guard import DivergenceGuard, GuardExhausted
from ..tuners.meta import MetaOptimizer
from ..tuners.record import copy_record, load_record, save_record
from ..tuners.schedule import Schedule
from .augment import Augmentation
from .layers import HyperContext

KIND = "stn"
# names that only enter the optimizer's update rule, never the training loss
OPTIMIZER_HPARAMS = ("lr", "learning_rate", "momentum", "weight_decay", "beta1", "beta2",
                     "betas", "eps", "dampening", "nesterov", "alpha", "rho")
_STREAM_TRAIN, _STREAM_VAL = 0, 1          # batch streams (as hd.Problem numbers them)
_RNG_TRAIN, _RNG_VAL = 17, 18              # perturbation / mask streams


def _inv_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def check_space(space: Space, used: list[str]) -> None:
    """Refuse what an STN cannot tune: optimizer hyperparameters, Int/Categorical, per-layer, unused names."""
    if not isinstance(space, Space) or len(space) == 0:
        raise HyperparameterError("STNTrainer needs a non-empty hd.Space of hyperparameters")
    for name, hp in space.items():
        if name in OPTIMIZER_HPARAMS:
            raise HyperparameterError(
                f"hyperparameter {name!r} is an optimizer hyperparameter: it never appears in "
                f"the training loss, so a self-tuning network cannot learn a response to it; "
                f"tune it with hd.OnlineTuner (gradient, online) or hd.blackbox.search (an L2 "
                f"penalty coefficient in the loss can be tuned here with regularizers=)")
        if not isinstance(hp, Real):
            raise HyperparameterError(
                f"hyperparameter {name!r} is {type(hp).__name__}; an STN tunes hd.Real only. "
                f"Declare a discrete one (cutout holes, length) as hd.Real: the continuous latent "
                f"feeds the hypernetwork and the rounded value is applied")
        if hp.per != "global" or hp.schedule is not None:
            raise HyperparameterError(
                f"hyperparameter {name!r} has per={hp.per!r}, schedule={hp.schedule!r}; an STN "
                f"tunes one global scalar per name (its trajectory is the schedule)")
        if name not in used:
            raise HyperparameterError(
                f"hyperparameter {name!r} is used by no dropout layer, augmentation or "
                f"regularizer of this STN; those use {used}")
    missing = [n for n in used if n not in list(space)]
    if missing:
        raise HyperparameterError(f"the STN uses hyperparameter(s) {missing}, which the space "
                                  f"{list(space)} does not declare")


class STNTrainer:
    """Self-tuning network training (MacKay et al. 2019, "Self-tuning networks", Alg. 1; Bae & Grosse 2020 centring).

    `model(x, ctx)` takes a batch and a `HyperContext` (e.g. from `hd.stn.from_sequential`); the
    space's names, in order, are the hypernetwork's input columns. `centred` (default: the
    model's `centred` attribute, else True) feeds the hypernetwork λ̃ - stopgrad(λ). The first `warmup_steps`
    weight steps train only the weights (at perturbed λ); after that every `train_steps` weight
    steps are followed by `val_steps` hyperparameter steps. Weights: SGD(lr, momentum), their
    gradient norm clipped to `grad_clip` (recurrent models); λ and σ:
    the shared MetaOptimizer (`hyper_optimizer`, `hyper_lr`). Batches, perturbations, masks and
    augmentations are pure functions of (seed, step), so a run restored from `save` and run to the
    same total ends bit-identical.

    `distributed=True` (under torchrun, or in an initialized process group) trains data
    parallel as `hd.Problem(distributed=True)` does: every rank starts from rank 0's weights,
    takes its 1/world share of every training and validation batch (perturbations,
    augmentations and dropout masks are drawn for the whole batch and sliced, so each example
    gets what it gets in one process), and the weight and hyperparameter gradients are averaged
    over the ranks: every rank holds the same weights, λ and σ, equal to one process on the
    whole batch up to rounding. Batch norm's batch statistics stay per rank.
    """

    def __init__(self, model: nn.Module, space: Space, train, val, test=None, *,
                 loss: Callable = F.cross_entropy, batch_size: int = 128,
                 val_batch_size: int | None = None, lr: float = 0.01, momentum: float = 0.9,
                 warmup_steps: int = 0, train_steps: int = 2, val_steps: int = 1,
                 hyper_optimizer: str = "adam", hyper_lr: float = 3e-3,
                 sigma_init: float = 0.5, tau: float = 1e-3, tune_scale: bool = True,
                 perturb: bool = True, centred: bool | None = None,
                 augment: Augmentation | None = None,
                 regularizers: Mapping[str, Callable[[nn.Module], torch.Tensor]] | None = None,
                 clip: float | None = None, grad_clip: float | None = None,
                 guard: Mapping[str, Any] | bool = True,
                 seed: int = 0, distributed: bool = False):
        for name, v, low in (("warmup_steps", warmup_steps, 0), ("train_steps", train_steps, 1),
                             ("val_steps", val_steps, 0), ("batch_size", batch_size, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise HyperparameterError(f"{name} must be an integer >= {low}, got {v!r}")
        for name, v in (("lr", lr), ("momentum", momentum), ("tau", tau)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise HyperparameterError(f"{name} must be a finite number >= 0, got {v!r}")
        if grad_clip is not None and not (isinstance(grad_clip, (int, float)) and grad_clip > 0):
            raise HyperparameterError(f"grad_clip must be a positive number or None, got "
                                      f"{grad_clip!r}")
        if not (isinstance(sigma_init, (int, float)) and sigma_init > 0):
            raise HyperparameterError(f"sigma_init must be > 0, got {sigma_init!r}")
        if augment is not None and not isinstance(augment, Augmentation):
            raise HyperparameterError(f"augment must be an hd.stn.Augmentation, got "
                                      f"{type(augment).__name__}")
        self.model, self.space, self.loss = model, space, loss
        self.augment = augment
        self.regularizers = dict(regularizers or {})
        used = list(getattr(model, "hparam_names", lambda: [])())
        for n in (augment.names() if augment else []) + list(self.regularizers):
            if n not in used:
                used.append(n)
        check_space(space, used)
        self.names = list(space)
        n_h = getattr(_first_hyper(model), "n_hparams", len(self.names))
        if n_h != len(self.names):
            raise HyperparameterError(f"the model's hypernetwork takes {n_h} input(s) but the "
                                      f"space has {len(self.names)} hyperparameters {self.names}")
        p0 = next(model.parameters())
        self.device, self.dtype = p0.device, p0.dtype
        # Δ-STN's centring is the default: on mnist1d_mlp the uncentred input drifted to input
        # dropout ~0.9 from every start (benchmarks/results/stn_results.md)
        self.centred = bool(getattr(model, "centred", True) if centred is None else centred)
        self.config = dict(batch_size=batch_size, val_batch_size=val_batch_size or batch_size,
                           lr=lr, momentum=momentum, warmup_steps=warmup_steps,
                           train_steps=train_steps, val_steps=val_steps,
                           hyper_optimizer=hyper_optimizer, hyper_lr=hyper_lr,
                           sigma_init=sigma_init, tau=tau, tune_scale=tune_scale,
                           perturb=perturb, centred=self.centred, grad_clip=grad_clip,
                           seed=seed)
        self.seed = int(seed)
        self._data = {}
        for split, data in (("train", train), ("val", val), ("test", test)):
            if data is None:
                continue
            pair = as_tensor_pair(data, split, device=self.device, dtype=self.dtype)
            if pair is None:
                raise DataError(f"dataset {split!r}: STNTrainer replays batches by index; give "
                                f"an (X, Y) tensor pair or an indexable dataset, not a stream")
            self._data[split] = pair
        self._train = ReplayableBatches(*self._data["train"], batch_size, self.seed,
                                        _STREAM_TRAIN)
        self._val = ReplayableBatches(*self._data["val"], val_batch_size or batch_size,
                                      self.seed, _STREAM_VAL)
        self.distributed = dp.setup(model) if distributed else False
        if self.distributed:
            dp.check_shardable(self._train.batch_size, "train", batch_size)
            dp.check_shardable(self._val.batch_size, "val", val_batch_size or batch_size)
        self.weight_opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        lam = torch.stack([space[n].to_raw(torch.tensor(space[n].init, dtype=self.dtype))
                           for n in self.names]).to(self.device)
        scale = torch.full((len(self.names),), _inv_softplus(sigma_init), dtype=self.dtype,
                           device=self.device)
        self.meta = MetaOptimizer({"lambda": lam, "scale": scale}, kind=hyper_optimizer,
                                  lr=hyper_lr, clip=clip, project=self._project)
        if guard is True:
            # dropout that rises as tuning proceeds raises the training loss for good, so only
            # non-finite losses and spikes count: with the trend rules on, a non-centred STN on
            # mnist1d_mlp whose input dropout drifted up was rolled back 20 times onto
            # snapshots that already held the drifted values (benchmarks/stn_mnist1d.py)
            guard = {"trend_factor": math.inf, "giveback": math.inf}
        self.guard = DivergenceGuard(**guard) if guard else None
        self.t = 0            # weight steps taken
        self.hyper_t = 0      # hyperparameter steps taken
        self.history: list[dict[str, Any]] = []
        if self.guard is not None:
            self.guard.snapshot(self._record(with_guard=False))

    # -- values ----------------------------------------------------------------------------
    def _project(self, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        lam = torch.stack([self.space[n].project_raw(leaves["lambda"][i])
                           for i, n in enumerate(self.names)])
        return {**leaves, "lambda": lam}

    def _natural(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        """Natural values of raw coordinates (last dim = hyperparameters), one entry per name."""
        return {n: self.space[n].to_natural(raw[..., i]) for i, n in enumerate(self.names)}

    @property
    def hparams(self) -> dict[str, float]:
        """Current natural value of every hyperparameter (the centre of the perturbation)."""
        return {n: float(v) for n, v in self._natural(self.meta.values()["lambda"]).items()}

    @property
    def scale(self) -> dict[str, float]:
        """Current perturbation scale softplus(σ) of every hyperparameter, in raw units."""
        s = F.softplus(self.meta.values()["scale"])
        return {n: float(s[i]) for i, n in enumerate(self.names)}

    def _generator(self, stream: int, t: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed_for(self.seed, stream, t))

    def _perturbed(self, lam: torch.Tensor, scale: torch.Tensor, B: int,
                   g: torch.Generator) -> torch.Tensor:
        """λ̃ = λ + softplus(σ)·ε, one row per example (λ itself when perturb=False)."""
        if not self.config["perturb"]:
            return lam.expand(B, -1)
        eps = torch.randn(B, lam.shape[0], generator=g, dtype=self.dtype, device=self.device)
        return lam + F.softplus(scale) * eps

    def _hnet(self, raw_tilde: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return raw_tilde - lam.detach() if self.centred else raw_tilde

    def _rows(self, n: int) -> tuple[int, int, int] | None:
        """This rank's (start, stop, total) of a global batch of n, or None in one process."""
        if not self.distributed or dp.world_size() == 1:
            return None
        dp.check_shardable(n, "training or validation")
        k = n // dp.world_size()
        return dp.rank() * k, (dp.rank() + 1) * k, n

    def _reduce_weight_grads(self) -> None:
        """Average the weights' gradients over the ranks (the gradient of the global batch)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        for p, g in zip(params, dp.mean_all_reduce([p.grad for p in params])):
            p.grad.copy_(g)

    # -- steps -----------------------------------------------------------------------------
    def train_step(self) -> float:
        """One weight step on training batch t at perturbed, regularised hyperparameters."""
        x, y = self._train(self.t)
        g = self._generator(_RNG_TRAIN, self.t)
        raw = self.meta.values()
        with torch.no_grad():
            raw_tilde = self._perturbed(raw["lambda"], raw["scale"], x.shape[0], g)
            values = self._natural(raw_tilde)
        self.model.train()
        if self.augment is not None:
            # on the whole batch under data parallelism too: its draws follow the batch's
            x = self.augment(x, values, g)
        rows = self._rows(x.shape[0])
        if rows is not None:
            sl = slice(rows[0], rows[1])
            x, y, raw_tilde = x[sl], y[sl], raw_tilde[sl]
            values = {n: v[sl] for n, v in values.items()}
        ctx = HyperContext(self._hnet(raw_tilde, raw["lambda"]), values, g, rows)
        loss = self.loss(self.model(x, ctx), y)
        for name, penalty in self.regularizers.items():
            # the mean over ranks of each shard's mean is the batch's: the gradient is exact
            loss = loss + values[name].mean() * penalty(self.model)
        self.weight_opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.distributed:
            self._reduce_weight_grads()
            loss = dp.mean_value(loss.detach())
        if self.config["grad_clip"] is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config["grad_clip"])
        self.weight_opt.step()
        return float(loss.detach())

    def hyper_step(self) -> dict[str, float]:
        """One step of λ and σ on validation batch k: val loss through the hypernetwork - τ·entropy."""
        x, y = self._val(self.hyper_t)
        g = self._generator(_RNG_VAL, self.hyper_t)
        lam, scale = self.meta.raw["lambda"], self.meta.raw["scale"]
        raw_tilde = self._perturbed(lam, scale, x.shape[0], g)
        rows = self._rows(x.shape[0])
        if rows is not None:
            x, y, raw_tilde = x[rows[0]:rows[1]], y[rows[0]:rows[1]], raw_tilde[rows[0]:rows[1]]
        ctx = HyperContext(self._hnet(raw_tilde, lam), None, g, rows)
        self.model.eval()
        val_loss = self.loss(self.model(x, ctx), y)
        entropy = torch.log(F.softplus(scale)).sum()
        objective = val_loss - self.config["tau"] * entropy
        g_lam, g_scale = torch.autograd.grad(objective, [lam, scale], allow_unused=True)
        grads = {"lambda": _or_zero(g_lam, lam), "scale": _or_zero(g_scale, scale)}
        if self.distributed:  # the entropy term is the same on every rank: its mean is itself
            grads["lambda"], grads["scale"] = dp.mean_all_reduce([grads["lambda"],
                                                                  grads["scale"]])
            val_loss = dp.mean_value(val_loss.detach())
        if not self.config["tune_scale"]:
            grads["scale"] = torch.zeros_like(scale)
        info = self.meta.step(grads)
        self.hyper_t += 1
        return {"val_loss": float(val_loss.detach()), "hypergrad_norm": info["hypergrad_norm"]}

    def _hyper_due(self) -> bool:
        c = self.config
        n = self.t - c["warmup_steps"]
        return c["val_steps"] > 0 and n > 0 and n % c["train_steps"] == 0

    def step(self) -> dict[str, Any]:
        """One weight step, then the hyperparameter steps due after it; returns its record."""
        used = self.hparams
        loss = self.train_step()
        self.t += 1
        rec: dict[str, Any] = {"step": self.t, "train_loss": loss, "hparams": used,
                               "phase": "warmup" if self.t <= self.config["warmup_steps"]
                               else "train"}
        if self.guard is not None and self.guard.diverged(self.t, loss):
            return self._rollback(rec)
        if self._hyper_due():
            for _ in range(self.config["val_steps"]):
                info = self.hyper_step()
            rec.update(info, scale=self.scale)
        self.history.append(rec)
        if self.guard is not None and self.guard.due(self.t):
            self.guard.snapshot(self._record(with_guard=False))
        return rec

    def _rollback(self, rec: dict[str, Any]) -> dict[str, Any]:
        """Restore the guard's older snapshot and halve the weight and hyperparameter learning rates."""
        try:
            snap = self.guard.rollback()
        except GuardExhausted:
            raise FloatingPointError(
                f"STN training diverged at step {self.t} (train loss {rec['train_loss']}) "
                f"after {self.guard.max_rollbacks} rollbacks; lower lr or hyper_lr") from None
        bad = self.t
        self._restore(snap)
        # the snapshot holds the learning rates of its time; every rollback so far halves both
        halve = 0.5 ** self.guard.rollbacks
        for group in self.weight_opt.param_groups:
            group["lr"] = self.config["lr"] * halve
        self.meta.set_lr(self.config["hyper_lr"] * halve)
        event = {"step": self.t, "event": "rollback", "from_step": bad,
                 "train_loss": rec["train_loss"], "lr": self.config["lr"] * halve,
                 "hyper_lr": self.meta.lr}
        self.history.append(event)
        return event

    def run(self, steps: int, checkpoint: str | Path | None = None,
            checkpoint_every: int | None = None,
            callback: Callable[[STNTrainer, dict], None] | None = None) -> STNTrainer:
        """Train until `steps` weight steps in total have been taken (a restored run continues)."""
        if checkpoint is not None and (not isinstance(checkpoint_every, int)
                                       or checkpoint_every < 1):
            raise HyperparameterError(f"checkpoint= needs checkpoint_every >= 1, got "
                                      f"{checkpoint_every!r}")
        # SIGINT/SIGTERM wait for the step under way, then the state is saved first
        with Checkpointer(checkpoint, checkpoint_every, self.save) as ck:
            while self.t < steps and not ck.stop:
                rec = self.step()
                if "event" not in rec:  # a rolled-back step is not a state worth saving
                    ck.after_step(self.t)
                if callback is not None:
                    callback(self, rec)
        return self

    # -- results ---------------------------------------------------------------------------
    def context(self, batch: int) -> HyperContext:
        """The evaluation context: the current λ for every example, regularisation off."""
        lam = self.meta.values()["lambda"].expand(batch, -1)
        return HyperContext(self._hnet(lam, lam), None, None)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output at the current hyperparameters (eval mode, no regularisation)."""
        self.model.eval()
        x = x.to(device=self.device, dtype=self.dtype if x.is_floating_point() else x.dtype)
        return self.model(x, self.context(x.shape[0]))

    @torch.no_grad()
    def evaluate(self, split: str = "val", chunk: int = 1024) -> dict[str, float]:
        """Loss and accuracy on a whole split at the current hyperparameters."""
        if split not in self._data:
            raise DataError(f"no {split!r} split; this trainer has {sorted(self._data)}")
        x, y = self._data[split]
        total, correct = 0.0, 0
        for i in range(0, len(x), chunk):
            out = self.predict(x[i:i + chunk])
            yi = y[i:i + chunk]
            total += float(self.loss(out, yi)) * len(yi)
            if out.dim() == 2 and yi.dtype == torch.int64:
                correct += int((out.argmax(-1) == yi).sum())
        return {"loss": total / len(x), "acc": correct / len(x)}

    def schedule(self) -> Schedule:
        """The hyperparameter values every weight step used, to replay when retraining from scratch."""
        vals = [r["hparams"] for r in self.history if "event" not in r]
        if not vals:
            vals = [self.hparams]
        return Schedule(vals)

    # -- state -----------------------------------------------------------------------------
    def _record(self, with_guard: bool = True) -> dict[str, Any]:
        rec = {"model": self.model.state_dict(), "weight_opt": self.weight_opt.state_dict(),
               "meta": self.meta.state_dict(), "t": self.t, "hyper_t": self.hyper_t,
               "history_len": len(self.history), "names": list(self.names),
               "config": dict(self.config)}
        rec = copy_record(rec)
        if with_guard:
            rec["history"] = copy_record(self.history)
            rec["guard"] = self.guard.state_dict() if self.guard is not None else None
        return rec

    def _restore(self, rec: Mapping[str, Any]) -> None:
        self.model.load_state_dict(rec["model"])
        self.weight_opt.load_state_dict(copy_record(rec["weight_opt"]))
        self.meta.load_state_dict(rec["meta"])
        self.t, self.hyper_t = int(rec["t"]), int(rec["hyper_t"])
        if "history" in rec:
            self.history = copy_record(rec["history"])
        else:
            del self.history[int(rec["history_len"]):]
        if rec.get("guard") is not None and self.guard is not None:
            self.guard.load_state_dict(rec["guard"])

    def save(self, path: str | Path) -> None:
        """Write the whole state (weights, both optimizers, λ, σ, counters, history) atomically."""
        save_record(path, self._record(), KIND)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, space: Space, train, val, test=None,
             **kwargs: Any) -> STNTrainer:
        """A trainer built like the saved one (same model architecture, space, data, options), restored from `path`."""
        rec = load_record(path, KIND)
        trainer = cls(model, space, train, val, test, **kwargs)
        if list(rec["names"]) != trainer.names:
            raise HyperparameterError(f"checkpoint {str(path)!r} tunes {rec['names']}, not "
                                      f"{trainer.names}")
        differ = sorted(k for k, v in rec["config"].items() if trainer.config.get(k) != v)
        if differ:
            raise HyperparameterError(
                f"checkpoint {str(path)!r} was written with other settings {differ}: "
                f"{ {k: rec['config'][k] for k in differ} }; pass the same ones to load")
        trainer._restore(rec)
        return trainer


def _first_hyper(model: nn.Module):
    for m in model.modules():
        if hasattr(m, "n_hparams"):
            return m
    return None


def _or_zero(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g
