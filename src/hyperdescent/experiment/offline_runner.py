"""The compare-run kind "fds": one OfflineTuner (Micaelli & Storkey 2021) under the budget.

Each meta-step is a whole training run of `steps` inner steps; it is logged as a ``meta_step``
record (validation loss of that run's final weights on the whole validation split, the values
it trained with, cumulative inner steps and seconds). The budget is checked after every
meta-step, so a method overruns it by at most one meta-step. At the end the learned schedule is
retrained from scratch on the training split (its steps count towards `inner_steps`) and its
test loss and accuracy go into ``run_end``.
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Any

from ..errors import ConfigError
from ..tasks.base import Task
from .config import Config, Method

#: settings of kind "fds" that are not OfflineTuner arguments
OFFLINE_EXTRA = {"retrain_on": "'train' (default) or 'train+val' for the final retraining",
                 "retrain_values": "'best' (default) or 'last': the values the final retraining "
                                   "takes (OfflineTuner.retrain's values=)"}


def offline_settings() -> list[str]:
    """Setting names kind "fds" accepts: OfflineTuner's keyword arguments plus retrain_on."""
    from ..tuners.offline import OfflineTuner
    names = [n for n, p in inspect.signature(OfflineTuner.__init__).parameters.items()
             if n not in ("self", "problem", "method", "steps") and p.kind is not p.VAR_KEYWORD]
    return names + list(OFFLINE_EXTRA)


def run_offline(task: Task, cfg: Config, method: Method, seed: int, log) -> dict[str, Any]:
    """One OfflineTuner(method="fds") run for `seed` under `cfg.budget`; returns run_end."""
    from ..optim import SGD, Adam
    from ..problem import Problem
    from ..tuners.offline import OfflineTuner
    from .runners import _budget_left, _describe, _plain_hparams, build_space, resolve_steps

    steps = resolve_steps(task, cfg)
    space = build_space(task, cfg, method)
    settings = dict(method.settings)
    retrain_on = settings.pop("retrain_on", "train")
    retrain_values = settings.pop("retrain_values", "best")
    base = {"method": method.label, "seed": seed}
    log({**base, "kind": "run_start", "method_kind": method.kind, "steps": steps,
         "settings": {**settings, "retrain_on": retrain_on, "retrain_values": retrain_values},
         "space": _describe(space),
         "time": time.time()})
    t0 = time.perf_counter()
    optimizer = SGD(momentum=task.momentum) if task.optimizer == "sgd" else Adam()
    if task.optimizer == "sgd" and "momentum" in list(space):
        optimizer = SGD()
    problem = Problem(task.make_model(seed), loss=task.loss, optimizer=optimizer, space=space,
                      train=task.train, val=task.val, test=task.test,
                      batch_size=task.batch_size, val_batch_size=len(task.val[0]), seed=seed)
    try:
        tuner = OfflineTuner(problem, method=method.kind, steps=steps, seed=seed, **settings)
    except TypeError as e:
        raise ConfigError(f"config key 'methods[{cfg.methods.index(method)}].settings': {e}") \
            from None
    best = math.inf
    stopped_by = "meta_steps"
    while tuner.m < tuner.config["meta_steps"]:
        try:
            rec = tuner.step()
        except FloatingPointError as e:
            stopped_by = "diverged"
            log({**base, "kind": "meta_event", "event": "diverged", "why": str(e),
                 "inner_steps": tuner.inner_steps, "elapsed_s": time.perf_counter() - t0})
            break
        if "event" not in rec and math.isfinite(rec["val_loss"]):
            best = min(best, rec["val_loss"])
        log({**base, "kind": "meta_step", "meta_step": rec["meta_step"],
             "inner_steps": tuner.inner_steps, "elapsed_s": time.perf_counter() - t0,
             "val_loss": rec["val_loss"], "best_val_loss": best, "hparams": rec["hparams"],
             "hypergrad": rec["hypergrad"], "event": rec.get("event")})
        why = _budget_left(cfg, time.perf_counter() - t0, tuner.inner_steps)
        if why:
            stopped_by = why
            break
    out = tuner.retrain(steps=steps, on=retrain_on, values=retrain_values)
    end = {**base, "kind": "run_end", "method_kind": method.kind, "best_val_loss": best,
           "test_loss": out["test_loss"], "test_acc": out["test_acc"],
           "inner_steps": tuner.inner_steps + out["steps"], "meta_steps": tuner.m,
           "elapsed_s": time.perf_counter() - t0, "stopped_by": stopped_by,
           "backtracks": tuner.backtracks, "final_hparams": _plain_hparams(tuner.hparams)}
    log(end)
    return end
