"""Run one method for one seed on one task under a budget, logging measured cost as it goes.

Every method gets the same budget (`Budget`): wall-clock seconds measured with
`time.perf_counter` from the start of the method's run (model construction, evaluations and
sampler overhead included), inner training steps (every step executed, including those of
pruned trials and steps a tuner later rolled back), and trials (black-box only).

- Gradient methods (`hd.OnlineTuner`) run one training run of `steps` inner steps and stop early
  when the wall-clock or inner-step budget is spent; every `eval_every` steps they evaluate the
  whole validation split and log an ``oho_step`` record.
- Black-box methods run `hd.blackbox.search` on `task_objective(task, steps, seed=seed)`; a
  callback logs a ``trial`` record per finished trial and stops the study when a budget is
  spent. A trial still running when the budget runs out is cut at its next evaluation (pruned,
  ``pruned_by="budget"``), so no method gets more than one evaluation interval of slack.

Records carry ``method`` (the label), ``seed``, ``kind``, ``inner_steps`` (cumulative),
``elapsed_s`` (cumulative) and ``best_val_loss`` (best so far); each run ends with a
``run_end`` record (final best val loss, test loss/accuracy, totals, why it stopped).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from ..errors import ConfigError, HyperparameterError
from ..optim.names import BY_OPTIMIZER
from ..space import Piecewise, Real, Space
from ..tasks.base import Task
from .config import GRADIENT_KINDS, Config, HParam, Method
from .run_checkpoint import TUNER_FILE, RunCheckpoint, read_runner, write_runner

Log = Callable[[dict[str, Any]], None]


def build_space(task: Task, cfg: Config, method: Method) -> Space:
    """The method's space: the task's default space with the config's overrides merged field-wise."""
    if method.space is not None:
        overrides: dict[str, HParam] = method.space
        idx = cfg.methods.index(method)
        where = f"methods[{idx}].space"
    else:
        overrides, where = cfg.space or {}, "space"
    hps = dict(task.space.items())
    allowed = BY_OPTIMIZER.get(task.optimizer, ())
    for name, spec in overrides.items():
        key = f"{where}.{name}"
        if allowed and name not in allowed:
            raise ConfigError(f"config key {key!r}: task {task.name!r} trains with "
                              f"{task.optimizer!r}, which takes {list(allowed)}")
        old = hps.get(name)
        if old is not None and not isinstance(old, Real):
            raise ConfigError(f"config key {key!r}: the task's {name!r} is not a Real")
        fields = {f: getattr(spec, f) for f in ("init", "low", "high", "log", "per")}
        for f in fields:
            if fields[f] is None and old is not None:
                fields[f] = getattr(old, f)
        missing = [f for f in ("init", "low", "high") if fields[f] is None]
        if missing:
            raise ConfigError(f"config key {key!r}: the task's space has no {name!r}, so "
                              f"{missing} must be given")
        schedule = (Piecewise(spec.schedule) if spec.schedule is not None
                    else getattr(old, "schedule", None))
        try:
            hps[name] = Real(fields["init"], low=fields["low"], high=fields["high"],
                             log=bool(fields["log"]), per=fields["per"] or "global",
                             schedule=schedule)
        except HyperparameterError as e:
            raise ConfigError(f"config key {key!r}: {e}") from None
    return Space(hps)


def resolve_steps(task: Task, cfg: Config) -> int:
    """Inner steps of one training run: the config's `steps`, else the task's default."""
    return int(cfg.steps or task.steps)


def _budget_left(cfg: Config, elapsed: float, inner: int) -> str | None:
    """Why the run must stop now ("wall_clock" / "inner_steps"), or None."""
    b = cfg.budget
    if b.wall_clock_s is not None and elapsed >= b.wall_clock_s:
        return "wall_clock"
    if b.inner_steps is not None and inner >= b.inner_steps:
        return "inner_steps"
    return None


def _describe(space: Space) -> dict[str, Any]:
    """The space as plain data for the records: init, bounds, log, per, schedule blocks."""
    out = {}
    for name, hp in space.items():
        if isinstance(hp, Real):
            out[name] = {"init": hp.init, "low": hp.low, "high": hp.high, "log": hp.log,
                         "per": hp.per, "schedule": hp.K if hp.schedule else None}
        else:
            out[name] = {"type": type(hp).__name__}
    return out


def _plain_hparams(values: dict[str, Any]) -> dict[str, Any]:
    from ..tuners.online import to_plain
    return to_plain(values)


# -- gradient methods --------------------------------------------------------------------------
def resumable(method: Method) -> bool:
    """Whether `method`'s runs resume from a RunCheckpoint (run_gradient's kinds)."""
    return method.kind in GRADIENT_KINDS


class _Stop(Exception):
    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


def run_gradient(task: Task, cfg: Config, method: Method, seed: int, log: Log,
                 checkpoint: RunCheckpoint | None = None) -> dict[str, Any]:
    """One OnlineTuner training run (OHO / greedy / truncated; Im, Savin & Cho 2021, "Online
    hyperparameter optimization by real-time recurrent learning") under the budget; returns run_end.

    With `checkpoint` (run_checkpoint.RunCheckpoint) the run resumes from `checkpoint.latest()`
    when there is one (no run_start or step-0 record again; the inner steps and seconds already
    charged carry on) and saves tuner and counters after every logged evaluation."""
    from ..optim import SGD, Adam
    from ..problem import Problem
    from ..tuners.online import OnlineTuner

    steps = resolve_steps(task, cfg)
    space = build_space(task, cfg, method)
    settings = dict(method.settings)
    eval_every = int(settings.pop("eval_every", None) or max(1, round(steps / 30)))
    # the validation minibatch of each meta-step defaults to the training batch size, as in
    # the experiments that chose OHO's defaults: on digits_mlp the whole split (400) each
    # meta-step reached TPE's target 3x later than minibatches of 128
    # (benchmarks/time_to_target.py --target 0.0655 --oho-setting val_batch_size=...)
    val_batch_size = int(settings.pop("val_batch_size", task.batch_size))
    trace_every = max(1, eval_every // 8)
    base = {"method": method.label, "seed": seed}
    resume = checkpoint.latest() if checkpoint is not None else None
    if resume is None:
        log({**base, "kind": "run_start", "method_kind": method.kind, "steps": steps,
             "eval_every": eval_every, "settings": settings, "space": _describe(space),
             "time": time.time()})

    t0 = time.perf_counter()
    optimizer = (SGD(momentum=task.momentum) if task.optimizer == "sgd" else Adam())
    problem = Problem(task.make_model(seed), loss=task.loss, optimizer=optimizer, space=space,
                      train=task.train, val=task.val, test=task.test,
                      batch_size=task.batch_size, val_batch_size=val_batch_size, seed=seed)
    try:
        tuner = OnlineTuner(problem, method=GRADIENT_KINDS[method.kind], **settings)
    except TypeError as e:
        raise ConfigError(f"config key 'methods[{cfg.methods.index(method)}].settings': {e}") \
            from None
    state = {"executed": 0, "best": math.inf, "best_acc": None, "trace": [], "events": 0,
             "last_logged": -1}
    if resume is not None:
        saved = read_runner(resume)
        tuner = OnlineTuner.load(resume / TUNER_FILE, problem)
        state = saved["state"]
        t0 -= saved["elapsed_s"]  # the seconds charged before the restart stay charged

    def write_checkpoint(d: Path) -> None:
        tuner.save(d / TUNER_FILE)
        write_runner(d, {"state": state, "step": tuner.t, "elapsed_s": time.perf_counter() - t0})

    def evaluate_and_log(train_loss: float | None = None) -> None:
        ev = tuner.evaluate("val")
        loss = ev["loss"]
        if math.isfinite(loss) and loss < state["best"]:
            state["best"], state["best_acc"] = loss, ev["acc"]
        rec = tuner.history[-1] if tuner.history else {}
        log({**base, "kind": "oho_step", "step": tuner.t, "inner_steps": state["executed"],
             "elapsed_s": time.perf_counter() - t0, "val_loss": loss, "val_acc": ev["acc"],
             "best_val_loss": state["best"], "train_loss": rec.get("train_loss", train_loss),
             "hypergrad_norm": rec.get("hypergrad_norm"), "hparams": _plain_hparams(tuner.hparams),
             "trace": state["trace"]})
        state["trace"] = []
        state["last_logged"] = state["executed"]
        if checkpoint is not None:
            checkpoint.save(write_checkpoint)

    def callback(tuner: OnlineTuner, record: dict[str, Any]) -> None:
        state["executed"] += 1
        n = state["executed"]
        if "event" in record:
            log({**base, "kind": "oho_event", "inner_steps": n,
                 "elapsed_s": time.perf_counter() - t0,
                 **{k: v for k, v in record.items() if k != "hparams"}})
        if n % trace_every == 0 or n == 1:
            state["trace"].append([record["step"], record.get("train_loss"), record["hparams"]])
        if n % eval_every == 0:
            evaluate_and_log()
        why = _budget_left(cfg, time.perf_counter() - t0, n)
        if why:
            raise _Stop(why)

    if resume is None:
        evaluate_and_log()  # step 0: the initial weights
    stopped_by = "steps"
    try:
        tuner.run(steps, callback=callback)
    except _Stop as s:
        stopped_by = s.why
    except FloatingPointError as e:
        stopped_by = "diverged"
        log({**base, "kind": "oho_event", "event": "diverged", "why": str(e),
             "inner_steps": state["executed"], "elapsed_s": time.perf_counter() - t0})
    if state["last_logged"] != state["executed"]:
        evaluate_and_log()
    test = tuner.evaluate("test")
    end = {**base, "kind": "run_end", "method_kind": method.kind,
           "best_val_loss": state["best"], "final_val_loss": tuner.evaluate("val")["loss"],
           "test_loss": test["loss"], "test_acc": test["acc"],
           "inner_steps": state["executed"], "elapsed_s": time.perf_counter() - t0,
           "stopped_by": stopped_by, "rollbacks": tuner.rollbacks,
           "final_hparams": _plain_hparams(tuner.hparams)}
    log(end)
    return end


# -- black-box methods -------------------------------------------------------------------------
class _BudgetTrial:
    """An optuna.Trial that also answers should_prune() once the method's budget is spent."""

    def __init__(self, trial: optuna.Trial, over_budget: Callable[[int], bool]):
        self._trial = trial
        self._over = over_budget
        self._step = 0
        self.cut = False

    def report(self, value: float, step: int) -> None:
        """Forward to the trial, remembering the inner step reached."""
        self._step = step
        self._trial.report(value, step)

    def should_prune(self) -> bool:
        """True when the budget is spent (the trial is cut) or the study's pruner says so."""
        if self._over(self._step):
            self.cut = True
            return True
        return self._trial.should_prune()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trial, name)



def record_trial(state: dict[str, Any], ft, base: dict[str, Any], elapsed: float
                 ) -> dict[str, Any]:
    """Count a finished Optuna trial into a black-box run's running `state` (inner steps,
    trials, pruned, best so far) and return its metrics record (one per trial, whichever
    executor ran it)."""
    import optuna

    attrs = ft.user_attrs
    state["inner"] += int(attrs.get("inner_steps", 0) or 0)
    state["n"] += 1
    complete = ft.state == optuna.trial.TrialState.COMPLETE
    value = ft.value if complete else None
    if ft.state == optuna.trial.TrialState.PRUNED:
        state["pruned"] += 1
    if complete and value is not None and math.isfinite(value) and value < state["best"]:
        state.update(best=value, best_trial=ft.number, best_params=dict(ft.params),
                     test_loss=attrs.get("test_loss"), test_acc=attrs.get("test_acc"))
    last = (ft.intermediate_values[max(ft.intermediate_values)]
            if ft.intermediate_values else None)
    return {**base, "kind": "trial", "trial": ft.number, "state": ft.state.name.lower(),
            "value": value, "last_val_loss": last, "params": dict(ft.params),
            "trial_inner_steps": attrs.get("inner_steps"), "trial_wall_s": attrs.get("wall_time"),
            "val_acc": attrs.get("val_acc"), "pruned_by": attrs.get("pruned_by"),
            "inner_steps": state["inner"], "elapsed_s": elapsed, "best_val_loss": state["best"],
            "best_trial": state["best_trial"], "test_loss": state["test_loss"],
            "test_acc": state["test_acc"]}

def run_blackbox(task: Task, cfg: Config, method: Method, seed: int, log: Log,
                 run_dir: str | Path | None = None) -> dict[str, Any]:
    """One black-box search (Optuna sampler/pruner) under the budget; returns the run_end record.

    With `run_dir` the study is kept in a journal file there, and a run whose run_start is
    already in the directory's metrics.jsonl (killed before its end) continues its study: the
    trial the kill cut short runs again with its values, only the trials still owed run, and
    only trials without a record are recorded.
    """
    from ..blackbox import search, space_to_distributions, task_objective
    from ..blackbox.resume import open_study_storage, study_file

    steps = resolve_steps(task, cfg)
    space = build_space(task, cfg, method)
    settings = dict(method.settings)
    objective = task_objective(task, steps, eval_every=settings.pop("eval_every", None),
                               seed=seed)
    budget = cfg.budget
    base = {"method": method.label, "seed": seed}
    dists = space_to_distributions(space, objective.param_shapes)
    prior = _prior_records(run_dir, base)
    resuming = any(r.get("kind") == "run_start" for r in prior)
    if not resuming:
        log({**base, "kind": "run_start", "method_kind": method.kind, "pruner": method.pruner,
             "steps": steps, "settings": settings, "space": _describe(space),
             "dimensions": {k: {"low": getattr(d, "low", None), "high": getattr(d, "high", None),
                                "log": getattr(d, "log", None)} for k, d in dists.items()},
             "time": time.time()})
    state: dict[str, Any] = {"inner": 0, "n": 0, "pruned": 0, "best": math.inf, "best_trial": None,
                             "test_loss": None, "test_acc": None, "best_params": None,
                             "stopped_by": None, "killed": 0}
    study_name = f"hyperdescent-seed{seed}"  # as a search in memory names it
    storage = None if run_dir is None else open_study_storage(
        study_file(run_dir, cfg.methods.index(method), method.label, seed), resume=resuming)
    # the time the killed process had spent counts against the wall-clock budget
    spent = max((float(r.get("elapsed_s") or 0.0) for r in prior), default=0.0)
    if resuming:
        _catch_up(storage, study_name, prior, state, base, spent, log)
    t0 = time.perf_counter() - spent

    def over_budget(step_in_trial: int) -> bool:
        return _budget_left(cfg, time.perf_counter() - t0, state["inner"] + step_in_trial) \
            is not None

    objective.set_divergence_policy(method.kind)

    def wrapped(values: dict[str, Any], trial: optuna.Trial) -> float:
        bt = _BudgetTrial(trial, over_budget)
        try:
            return objective(values, bt)
        except optuna.TrialPruned:
            if bt.cut:
                trial.set_user_attr("pruned_by", "budget")
            raise

    wrapped.param_shapes = objective.param_shapes  # type: ignore[attr-defined]

    def callback(study: optuna.Study, ft: optuna.trial.FrozenTrial) -> None:
        elapsed = time.perf_counter() - t0
        log(record_trial(state, ft, base, elapsed))
        why = _budget_left(cfg, elapsed, state["inner"])
        if why:
            state["stopped_by"] = why
            study.stop()

    kwargs: dict[str, Any] = {}
    if "grid_points" in settings:
        kwargs["grid_points"] = int(settings["grid_points"])
    n_trials = None if budget.trials is None else max(0, budget.trials - state["n"])
    timeout = None if budget.wall_clock_s is None else budget.wall_clock_s - spent
    if _budget_left(cfg, spent, state["inner"]) or (timeout is not None and timeout <= 0):
        n_trials, timeout = 0, None  # spent before the kill: only the run_end is owed
    search(wrapped, space, sampler=method.kind, pruner=method.pruner, n_trials=n_trials,
           timeout=timeout, seed=seed, storage=storage, study_name=study_name,
           sampler_kwargs=settings.get("sampler_kwargs"),
           pruner_kwargs=settings.get("pruner_kwargs"), callbacks=[callback], **kwargs)
    elapsed = time.perf_counter() - t0
    stopped_by = state["stopped_by"] or _budget_left(cfg, elapsed, state["inner"]) or (
        "trials" if budget.trials is not None and state["n"] >= budget.trials else "exhausted")
    end = {**base, "kind": "run_end", "method_kind": method.kind, "pruner": method.pruner,
           "best_val_loss": state["best"], "test_loss": state["test_loss"],
           "test_acc": state["test_acc"], "best_params": state["best_params"],
           "best_trial": state["best_trial"], "n_trials": state["n"],
           "n_pruned": state["pruned"], "inner_steps": state["inner"], "elapsed_s": elapsed,
           "stopped_by": stopped_by}
    if state["killed"]:
        end["n_killed"] = state["killed"]
    log(end)
    return end


def _prior_records(run_dir: str | Path | None, base: dict[str, Any]) -> list[dict[str, Any]]:
    """The records run (method, seed) `base` already has in `run_dir`'s metrics.jsonl."""
    if run_dir is None:
        return []
    from .rundir import METRICS, read_records
    return [r for r in read_records(Path(run_dir) / METRICS)
            if r.get("method") == base["method"] and r.get("seed") == base["seed"]]


def _catch_up(storage, study_name: str, prior: list[dict[str, Any]], state: dict[str, Any],
              base: dict[str, Any], spent: float, log: Log) -> None:
    """Count the trials a killed run finished into `state` and record those it had no time to
    record (finished in the study, killed before the record was written); record each trial
    the kill cut short (failed in the study, queued again) once, as ``trial_killed``."""
    import optuna

    from ..blackbox.resume import RETRY_OF, fail_killed
    logged = {r["trial"] for r in prior if r.get("kind") == "trial"}
    killed = {r["trial"] for r in prior if r.get("kind") == "trial_killed"}
    for ft in fail_killed(storage, study_name):
        if ft.state == optuna.trial.TrialState.FAIL:
            state["killed"] += 1
            if ft.number not in killed:
                log({**base, "kind": "trial_killed", "trial": ft.number,
                     "params": dict(ft.params), "retry_of": ft.user_attrs.get(RETRY_OF),
                     "inner_steps": state["inner"], "elapsed_s": spent})
            continue
        rec = record_trial(state, ft, base, spent)
        if ft.number not in logged:
            log(rec)


def run_method(task: Task, cfg: Config, method: Method, seed: int, log: Log,
               checkpoint: RunCheckpoint | None = None,
               run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run `method` for `seed` on `task` under `cfg.budget`, logging records; returns run_end.
    `checkpoint` is honoured by the gradient kinds of `resumable` (the others start again).
    A black-box run keeps its study in `run_dir` and continues it there (run_blackbox)."""
    if method.kind == "fds":
        from .offline_runner import run_offline
        return run_offline(task, cfg, method, seed, log)
    if method.kind == "stn":
        from .stn_runner import run_stn
        return run_stn(task, cfg, method, seed, log)
    if method.kind == "pbt":
        from .pbt_runner import run_pbt
        return run_pbt(task, cfg, method, seed, log)
    if method.gradient:
        return run_gradient(task, cfg, method, seed, log, checkpoint)
    return run_blackbox(task, cfg, method, seed, log, run_dir=run_dir)
