"""`task_objective`: a black-box objective that trains a bundled `Task` with plain torch.optim.

The sampled values (API shapes, see `assemble`) set the optimizer's hyperparameters:

- the arguments of the task's optimizer in `hd.optim` (``lr``, ``weight_decay`` as coupled
  L2, ``momentum``, ``dampening`` for SGD; ``lr``, ``weight_decay``, ``beta1``, ``beta2``,
  ``eps`` for Adam); ``batch_size`` (Int) and ``optimizer``/``opt`` (Categorical
  ``"sgd"``/``"adam"``) override the task's;
- ``per="layer"`` values go to one param group per parameter tensor;
- a ``Piecewise(K)`` schedule sets the param groups' value at each block boundary; step t of
  T uses block floor(t*K/T).

Training batch t is the one a gradient run with the same seed and batch size trains on
(`hd.Problem(..., seed=seed).train_batch(t)`): each epoch is a seeded permutation of the
training set cut into consecutive batches, the ragged last batch dropped, and a batch size of
at least the set's size is full-batch training. Only the method differs between the two.
Every ``eval_every`` steps the full validation loss is computed, reported with
``trial.report(val_loss, step=inner_steps)``, and the trial is pruned if
``trial.should_prune()`` (not after the last step: a finished run is reported as complete).

Divergence (a non-finite training or validation loss) stops training and raises
``optuna.TrialPruned`` with user attribute ``diverged=True``. This is the Optuna-idiomatic
choice: a pruned trial is "stopped early because it was unpromising", keeps its last finite
intermediate value, and TPE ranks pruned trials below all completed ones, so it learns to avoid
the diverging region; returning NaN would mark the trial FAILED, which every sampler ignores.
(GP and CMA-ES samplers ignore pruned trials too; they simply do not learn from divergence.)

User attributes of every trial: ``inner_steps`` (steps run, also for pruned trials),
``wall_time`` (s, `time.perf_counter`), ``curve`` (list of ``[inner_steps, val_loss,
elapsed_s]``, starting at step 0), ``val_acc``, ``diverged``, ``pruned_by``
(``"pruner"``/``"divergence"``/None); completed trials also get ``test_loss``, ``test_acc``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import optuna
import torch

from ..data import ReplayableBatches
from ..errors import ConfigError, HyperparameterError
from ..metrics import evaluate_outputs
from ..optim.names import BY_OPTIMIZER, TASK_HPARAMS, TASK_OPTIMIZERS, set_group_hparam
from ..tasks.base import Task

_OTHER = ("batch_size", "optimizer", "opt")
KNOWN_HPARAMS = tuple(dict.fromkeys(TASK_HPARAMS + _OTHER))
#: the stream of hd.Problem's training batches, so that a trial and a gradient run agree
TRAIN_STREAM = 0
_EVAL_CHUNK = 8192


def _plain(v: Any) -> Any:
    """Tensors to floats / lists, recursively into dicts (the objective accepts both)."""
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().tolist()
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _leaf(name: str, v: Any, pname: str, t: int, horizon: int) -> float:
    """The value `name` takes for parameter `pname` at step t (per-layer and schedule lookup)."""
    if isinstance(v, Mapping):
        if pname not in v:
            raise HyperparameterError(
                f"hyperparameter {name!r} has no value for parameter {pname!r}; it has "
                f"{sorted(v)}")
        v = v[pname]
    if isinstance(v, (list, tuple)):
        if len(v) == 0:
            raise HyperparameterError(f"hyperparameter {name!r} got an empty schedule")
        k = min(len(v) - 1, (t * len(v)) // max(horizon, 1))
        v = v[k]
    return float(v)


def _blocks(values: Mapping[str, Any], t: int, horizon: int) -> tuple:
    """Schedule block indices in force at step t (changes only at block boundaries)."""
    key = []
    for v in values.values():
        leaves = v.values() if isinstance(v, Mapping) else [v]
        for x in leaves:
            if isinstance(x, (list, tuple)):
                key.append(min(len(x) - 1, (t * len(x)) // max(horizon, 1)))
    return tuple(key)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor
             ) -> tuple[float, float | None]:
    """Loss and accuracy of `model` on (x, y) by `evaluate_outputs`, in eval mode, without grad;
    accuracy None when the targets are not class labels."""
    was_training = model.training
    model.eval()
    try:
        # forward in chunks to bound activation memory; the outputs themselves are small
        out = torch.cat([model(x[i:i + _EVAL_CHUNK])
                         for i in range(0, max(len(x), 1), _EVAL_CHUNK)])
    finally:
        model.train(was_training)
    ev = evaluate_outputs(out, y, loss_fn)
    return ev["loss"], None if math.isnan(ev["acc"]) else ev["acc"]


#: Optuna samplers that learn nothing from pruned trials (GP-BO, CMA-ES)
SAMPLERS_IGNORING_PRUNED = ("gp", "cmaes")


class TaskObjective:
    """Callable objective(values, trial) -> final val loss of `task` trained with torch.optim.

    `trial` may be None (a plain evaluation: nothing is reported, divergence returns inf).
    """

    def __init__(self, task: Task, steps: int | None = None, eval_every: int | None = None,
                 seed: int = 0, device: str | torch.device | None = None):
        self.task, self.seed = task, int(seed)
        self.steps = int(task.steps if steps is None else steps)
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {steps!r}")
        if eval_every is not None and (not isinstance(eval_every, int) or eval_every < 1):
            raise ConfigError(f"eval_every must be None or an integer >= 1, got {eval_every!r}")
        self.eval_every = eval_every
        self.device = torch.device(device) if device is not None else task.train[0].device
        model = task.make_model(self.seed)
        # parameter names and shapes, so that `search` can bind per='layer' spaces by itself
        self.param_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}

    # -- helpers -------------------------------------------------------------------------
    def _settings(self, values: Mapping[str, Any]) -> tuple[str, int, dict]:
        unknown = [n for n in values if n not in KNOWN_HPARAMS]
        if unknown:
            raise HyperparameterError(
                f"task_objective does not know hyperparameter(s) {unknown}; it understands "
                f"{list(KNOWN_HPARAMS)} (write your own objective(values, trial) for others)")
        opt = values.get("optimizer", values.get("opt", self.task.optimizer))
        if opt not in TASK_OPTIMIZERS:
            raise HyperparameterError(
                f"optimizer must be one of {list(TASK_OPTIMIZERS)}, got {opt!r}")
        chosen = "optimizer" in values or "opt" in values
        allowed = BY_OPTIMIZER[opt]
        other = [n for n in values if n not in allowed and n not in _OTHER]
        if other and not chosen:
            raise HyperparameterError(
                f"hyperparameter(s) {other} do not apply to task optimizer {opt!r}, which "
                f"takes {list(allowed)}")
        bs = int(values.get("batch_size", self.task.batch_size))
        if bs < 1:
            raise HyperparameterError(f"batch_size must be >= 1, got {bs}")
        hps = {n: v for n, v in values.items() if n in allowed}
        if "lr" not in hps:
            sp = self.task.space
            if "lr" not in set(sp):
                raise HyperparameterError(
                    "task_objective needs an 'lr' value (the task's space has none to default to)")
            hps["lr"] = sp["lr"].init
        if opt == "sgd":
            hps.setdefault("momentum", self.task.momentum)
        return opt, bs, hps

    def _apply(self, optimizer: torch.optim.Optimizer, hps: dict, t: int) -> None:
        T = self.steps
        for group in optimizer.param_groups:
            pname = group["name"]
            for n, v in hps.items():
                set_group_hparam(group, n, _leaf(n, v, pname, t, T))

    def batches(self, batch_size: int, x: torch.Tensor, y: torch.Tensor) -> ReplayableBatches:
        """The training batches of a trial: those of `hd.Problem` with the same seed."""
        return ReplayableBatches(x, y, batch_size=batch_size, seed=self.seed, stream=TRAIN_STREAM)

    # -- the objective -------------------------------------------------------------------
    def __call__(self, values: Mapping[str, Any], trial: optuna.Trial | None = None) -> float:
        """Train with the sampled `values`, report val loss to `trial` for pruning, return it."""
        t_start = time.perf_counter()
        task, T = self.task, self.steps
        values = _plain(values)
        opt_name, bs, hps = self._settings(values)

        xtr, ytr = (a.to(self.device) for a in task.train)
        xva, yva = (a.to(self.device) for a in task.val)
        model = task.make_model(self.seed).to(self.device)
        if xtr.is_floating_point():
            model = model.to(dtype=xtr.dtype)
        model.train()
        groups = [{"params": [p], "name": n} for n, p in model.named_parameters()
                  if p.requires_grad]
        if opt_name == "sgd":
            optimizer = torch.optim.SGD(groups, lr=0.0)
        else:
            optimizer = torch.optim.Adam(groups, lr=0.0)

        train_batch = self.batches(bs, xtr, ytr)
        eval_every = self.eval_every or train_batch.per_epoch
        curve: list[list[float]] = []
        attrs: dict[str, Any] = {"diverged": False, "pruned_by": None}

        def record(step: int, val_loss: float) -> None:
            curve.append([step, val_loss, time.perf_counter() - t_start])

        def finish(step: int, val_acc: float | None) -> None:
            attrs.update(inner_steps=step, wall_time=time.perf_counter() - t_start,
                         curve=curve, val_acc=val_acc)
            if trial is not None:
                for k, v in attrs.items():
                    trial.set_user_attr(k, v)

        val_loss, val_acc = evaluate(model, task.loss, xva, yva)
        record(0, val_loss)
        blocks = None
        for t in range(T):
            b = _blocks(hps, t, T)
            if b != blocks:  # first step and every schedule block boundary
                self._apply(optimizer, hps, t)
                blocks = b
            xb, yb = train_batch(t)
            optimizer.zero_grad(set_to_none=True)
            loss = task.loss(model(xb), yb)
            if not torch.isfinite(loss.detach()):
                return self._diverged(trial, attrs, finish, curve, t, val_acc,
                                      f"training loss became {loss.item()} at step {t}")
            loss.backward()
            optimizer.step()
            done = t + 1
            if done % eval_every == 0 or done == T:
                val_loss, val_acc = evaluate(model, task.loss, xva, yva)
                record(done, val_loss)
                if not math.isfinite(val_loss):
                    return self._diverged(trial, attrs, finish, curve, done, val_acc,
                                          f"validation loss became {val_loss} after step {done}")
                if trial is not None:
                    trial.report(val_loss, step=done)
                    if done < T and trial.should_prune():
                        attrs["pruned_by"] = "pruner"
                        finish(done, val_acc)
                        raise optuna.TrialPruned(f"pruned at inner step {done}")

        test_loss, test_acc = evaluate(model, task.loss, *(a.to(self.device) for a in task.test))
        attrs.update(test_loss=test_loss, test_acc=test_acc)
        finish(T, val_acc)
        return val_loss

    #: "prune": a diverged trial is pruned (TPE ranks it below completed ones);
    #: "penalty": it completes with the worst finite validation loss it saw, so that
    #: samplers that ignore pruned trials (GP, CMA-ES) learn to avoid the region.
    on_divergence = "prune"

    def set_divergence_policy(self, sampler) -> None:
        """Penalize rather than prune diverged trials for samplers that ignore pruned ones."""
        if isinstance(sampler, str):
            ignores = sampler.lower() in SAMPLERS_IGNORING_PRUNED
        else:
            ignores = isinstance(sampler, (optuna.samplers.GPSampler,
                                           optuna.samplers.CmaEsSampler))
        self.on_divergence = "penalty" if ignores else "prune"

    def _diverged(self, trial, attrs, finish, curve, step, val_acc, why) -> float:
        attrs.update(diverged=True, pruned_by="divergence")
        finish(step, val_acc)
        if trial is None:
            return math.inf
        finite = [v for _, v, _ in curve if math.isfinite(v)]
        if self.on_divergence == "penalty" and finite:
            attrs["pruned_by"] = None
            trial.set_user_attr("pruned_by", None)
            return max(finite)
        raise optuna.TrialPruned(f"diverged: {why}")


def task_objective(task: Task, steps: int | None = None, eval_every: int | None = None,
                   seed: int = 0, device: str | torch.device | None = None) -> TaskObjective:
    """Objective(values, trial) training `task` with torch.optim and reporting val loss for pruning (Li et al. 2017)."""
    return TaskObjective(task, steps=steps, eval_every=eval_every, seed=seed, device=device)
