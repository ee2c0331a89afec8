"""The compare-run kind "stn": one self-tuning network run (MacKay et al. 2019) under the budget.

The task's model must be an nn.Sequential or one Linear layer: an nn.Dropout goes before
each of its Linear layers, and the STN tunes one rate per dropout (``dropout0``, ``dropout1``,
... from `settings.dropout`) and, with `settings.noise`, the standard deviation of Gaussian input
noise. The weights train with the task's optimizer kind at its default learning rate (the
space's `lr` init, or `settings.lr`); STN does not tune optimizer hyperparameters. Every
`eval_every` weight steps the whole validation split is evaluated at the current λ and an
``oho_step`` record (the per-step record kind the report reads for gradient runs) is logged;
``inner_steps`` counts weight steps.
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..tasks.base import Task
from .config import Config, Method

#: settings of kind "stn" that are not STNTrainer arguments
STN_EXTRA = {"dropout": "initial rate of every dropout layer (default 0.1)",
             "noise": "initial std of tuned Gaussian input noise (default: noise not tuned)",
             "eval_every": "full-validation evaluation (and log record) every N weight steps"}
_FIXED = ("self", "model", "space", "train", "val", "test", "loss", "augment", "regularizers",
          "guard", "seed", "batch_size")


def stn_settings() -> list[str]:
    """Setting names kind "stn" accepts: STNTrainer's keyword arguments plus dropout/noise/eval_every."""
    from ..stn import STNTrainer
    names = [n for n in inspect.signature(STNTrainer.__init__).parameters if n not in _FIXED]
    return names + list(STN_EXTRA)


def stn_model(task: Task, seed: int, rate: float, noise: float | None):
    """The task's Sequential with a tuned dropout before every Linear, its space and augmentation."""
    from .. import stn
    from ..space import Real, Space

    base = task.make_model(seed)
    if isinstance(base, nn.Linear):  # logistic regression: a one-layer Sequential
        base = nn.Sequential(base)
    if not isinstance(base, nn.Sequential):
        raise ConfigError(f"kind 'stn' needs a task whose model is an nn.Sequential; task "
                          f"{task.name!r} builds a {type(base).__name__}")
    layers, names = [], []
    for m in base:
        if isinstance(m, nn.Linear):
            names.append(f"dropout{len(names)}")
            layers.append(nn.Dropout(rate))
        layers.append(m)
    hps = {n: Real(rate, low=0.0, high=0.9) for n in names}
    augment = None
    if noise is not None:
        hps["noise"] = Real(noise, low=0.0, high=1.5)
        augment = stn.Augmentation(noise="noise")
    space = Space(hps)
    model = stn.from_sequential(nn.Sequential(*layers), space, dropout=names, seed=seed)
    return model, space, augment


def run_stn(task: Task, cfg: Config, method: Method, seed: int, log) -> dict[str, Any]:
    """One STNTrainer run for `seed` under `cfg.budget`, logging oho_step records; returns run_end."""
    from ..stn import STNTrainer
    from .runners import _budget_left, _describe, resolve_steps

    steps = resolve_steps(task, cfg)
    settings = dict(method.settings)
    eval_every = int(settings.pop("eval_every", None) or max(1, round(steps / 30)))
    rate = float(settings.pop("dropout", 0.1))
    noise = settings.pop("noise", None)
    settings.setdefault("lr", float(task.space["lr"].init) if "lr" in task.space else 0.05)
    settings.setdefault("momentum", task.momentum if task.optimizer == "sgd" else 0.9)
    base = {"method": method.label, "seed": seed}
    t0 = time.perf_counter()
    model, space, augment = stn_model(task, seed, rate, None if noise is None else float(noise))
    log({**base, "kind": "run_start", "method_kind": method.kind, "steps": steps,
         "eval_every": eval_every, "settings": {**settings, "dropout": rate, "noise": noise},
         "space": _describe(space), "time": time.time()})
    try:
        trainer = STNTrainer(model, space, task.train, task.val, task.test, loss=task.loss,
                             batch_size=task.batch_size, augment=augment, seed=seed, **settings)
    except TypeError as e:
        raise ConfigError(f"config key 'methods[{cfg.methods.index(method)}].settings': {e}") \
            from None
    state = {"best": math.inf, "last": -1}

    def evaluate_and_log(train_loss=None):
        ev = trainer.evaluate("val")
        if math.isfinite(ev["loss"]) and ev["loss"] < state["best"]:
            state["best"] = ev["loss"]
        log({**base, "kind": "oho_step", "step": trainer.t, "inner_steps": trainer.t,
             "elapsed_s": time.perf_counter() - t0, "val_loss": ev["loss"], "val_acc": ev["acc"],
             "best_val_loss": state["best"], "train_loss": train_loss,
             "hparams": trainer.hparams, "scale": trainer.scale})
        state["last"] = trainer.t

    class _Stop(Exception):
        pass

    def callback(tr, rec):
        if "event" in rec:
            log({**base, "kind": "oho_event", "inner_steps": tr.t,
                 "elapsed_s": time.perf_counter() - t0, **rec})
        elif tr.t % eval_every == 0:
            evaluate_and_log(rec["train_loss"])
        why = _budget_left(cfg, time.perf_counter() - t0, tr.t)
        if why:
            state["why"] = why
            raise _Stop

    evaluate_and_log()
    stopped_by = "steps"
    try:
        trainer.run(steps, callback=callback)
    except _Stop:
        stopped_by = state["why"]
    except FloatingPointError as e:
        stopped_by = "diverged"
        log({**base, "kind": "oho_event", "event": "diverged", "why": str(e),
             "inner_steps": trainer.t, "elapsed_s": time.perf_counter() - t0})
    if state["last"] != trainer.t:
        evaluate_and_log()
    test = trainer.evaluate("test")
    end = {**base, "kind": "run_end", "method_kind": method.kind,
           "best_val_loss": state["best"], "final_val_loss": trainer.evaluate("val")["loss"],
           "test_loss": test["loss"], "test_acc": test["acc"], "inner_steps": trainer.t,
           "hyper_steps": trainer.hyper_t, "elapsed_s": time.perf_counter() - t0,
           "stopped_by": stopped_by,
           "rollbacks": sum(1 for r in trainer.history if r.get("event") == "rollback"),
           "final_hparams": trainer.hparams}
    log(end)
    return end
