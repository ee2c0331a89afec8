"""Kind "pbt": Population Based Training (Jaderberg et al. 2017) through Ray Tune's
`PopulationBasedTraining`, as one more baseline over the same space and budget.

Each member trains the task's `hd.Problem` with its optimizer's plain step (the weights and
optimizer state of the OHO runs, without tangents) for `interval` steps per Tune iteration,
reports the whole validation split's loss and a checkpoint of its state record; PBT (synchronous,
`time_attr="training_iteration"`) lets the worst `quantile_fraction` copy the best members'
checkpoints and perturb or resample their hyperparameters (explore/exploit). Every inner step of
every member counts against the budget; the run's records carry each member's hyperparameters
at each report, so the report plots the schedule PBT found beside OHO's trajectory.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..space import Real
from ..tasks.base import Task
from .config import Config, Method
from .runners import _describe, _plain_hparams, build_space, resolve_steps

PBT_SETTINGS = {"population": "members trained at once (default 4, at most budget.trials)",
                "interval": "inner steps between explore/exploit decisions (default steps/10)",
                "quantile_fraction": "share of members that copy better ones (default 0.25)",
                "resample_probability": "chance a copied value is drawn anew (default 0.25)"}
RECORD_KIND = "PBTMember"


def _settings(cfg: Config, method: Method, steps: int) -> dict[str, Any]:
    s = dict(method.settings)
    population = int(s.get("population", 4))
    if cfg.budget.trials is not None:
        population = min(population, cfg.budget.trials)
    interval = int(s.get("interval", max(1, steps // 10)))
    if population < 2 or interval < 1:
        raise ConfigError(f"config key 'methods[{cfg.methods.index(method)}].settings': "
                          f"population must be >= 2 and interval >= 1, got {population}, "
                          f"{interval}")
    return {"population": population, "interval": interval,
            "quantile_fraction": float(s.get("quantile_fraction", 0.25)),
            "resample_probability": float(s.get("resample_probability", 0.25))}


def _problem(task: Task, space, seed: int):
    from ..optim import SGD, Adam
    from ..problem import Problem
    optimizer = SGD(momentum=task.momentum) if task.optimizer == "sgd" else Adam()
    return Problem(task.make_model(seed), loss=task.loss, optimizer=optimizer, space=space,
                   train=task.train, val=task.val, test=task.test, batch_size=task.batch_size,
                   seed=seed)


def pbt_trainable(config: dict[str, Any]) -> None:
    """A Tune function trainable: one PBT member, resumed from `tune.get_checkpoint()` (its own
    or, after an exploit, a better member's)."""
    from ray import tune

    from ..problem import InnerState
    from ..tuners.record import load_record, save_record
    from .executors import _context
    task, cfg, method, seed = _context(config)
    steps = resolve_steps(task, cfg)
    space = build_space(task, cfg, method)
    problem = _problem(task, space, seed)
    values = {}
    for n, v in config["hp"].items():
        hp = space[n]
        values[n] = min(max(float(v), hp.low), hp.high)
    problem.set_hparams(values)
    state = problem.init_state()
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = InnerState.from_record(load_record(Path(d) / "state.pt", RECORD_KIND)["state"])
    hp = problem.hparams
    interval = int(config["interval"])
    while state.t < steps:
        start = state.t
        for t in range(start, min(start + interval, steps)):
            state, _ = problem.step(state, problem.train_batch(t), problem.hp_at(hp, t, steps))
        ev = problem.evaluate(state.params, state.buffers, "val")
        done = state.t >= steps or not math.isfinite(ev["loss"])
        metrics = {"val_loss": ev["loss"] if math.isfinite(ev["loss"]) else 1e30,
                   "val_acc": ev["acc"], "step": state.t, "executed": state.t - start,
                   "done_member": int(done), "diverged": int(not math.isfinite(ev["loss"])),
                   "hparams": {n: float(v) for n, v in values.items()}}
        if done and math.isfinite(ev["loss"]):
            test = problem.evaluate(state.params, state.buffers, "test")
            metrics.update(test_loss=test["loss"], test_acc=test["acc"])
        with tempfile.TemporaryDirectory() as d:
            save_record(Path(d) / "state.pt", {"state": state.as_record()}, RECORD_KIND)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        if done:
            return


def _mutations(space) -> dict[str, Any]:
    from ray import tune
    out = {}
    for name, hp in space.items():
        if not isinstance(hp, Real) or hp.per != "global" or hp.schedule is not None:
            raise ConfigError(f"kind 'pbt' tunes global Real hyperparameters only; {name!r} is "
                              f"{'per ' + hp.per if isinstance(hp, Real) else type(hp).__name__}")
        out[name] = tune.loguniform(hp.low, hp.high) if hp.log else tune.uniform(hp.low, hp.high)
    return out


def _draw(rng: random.Random, hp: Real) -> float:
    """A uniform (log-uniform for log=True) draw inside the bounds."""
    if hp.log:
        return math.exp(rng.uniform(math.log(hp.low), math.log(hp.high)))
    return rng.uniform(hp.low, hp.high)


def run_pbt(task: Task, cfg: Config, method: Method, seed: int, log) -> dict[str, Any]:
    """One PBT run (Jaderberg et al. 2017) of a population on `task` under `cfg.budget`, through
    Ray Tune; logs ``run_start``, a ``pbt_step`` per member report and ``run_end``."""
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    from .executors import init_ray
    init_ray(cfg)
    steps = resolve_steps(task, cfg)
    space = build_space(task, cfg, method)
    opts = _settings(cfg, method, steps)
    mutations = _mutations(space)
    base = {"method": method.label, "seed": seed}
    log({**base, "kind": "run_start", "method_kind": "pbt", "steps": steps, "settings": opts,
         "space": _describe(space), "time": time.time()})
    rng = random.Random(seed)
    init = {n: hp.init for n, hp in space.items()}
    # member 0 starts at the space's initial values (where OHO starts), the others at random
    starts = [init] + [{n: _draw(rng, hp) for n, hp in space.items()}
                       for _ in range(opts["population"] - 1)]
    random.seed(seed)  # PBT's explore/exploit draws come from the random module
    scheduler = PopulationBasedTraining(
        time_attr="training_iteration", metric="val_loss", mode="min", perturbation_interval=1,
        hyperparam_mutations={"hp": mutations}, quantile_fraction=opts["quantile_fraction"],
        resample_probability=opts["resample_probability"], synch=True)
    recorder = _Recorder(cfg, base, log, steps)
    tuner = tune.Tuner(
        tune.with_resources(pbt_trainable, {"cpu": 1}),
        param_space={"cfg": cfg.model_dump(mode="json"), "label": method.label, "seed": seed,
                     "interval": opts["interval"], "hp": tune.grid_search(starts)},
        tune_config=tune.TuneConfig(scheduler=scheduler, reuse_actors=True,
                                    time_budget_s=cfg.budget.wall_clock_s),
        run_config=tune.RunConfig(name=f"pbt-{seed}", storage_path=tempfile.mkdtemp(
            prefix="hd-pbt-"), verbose=0, stop=recorder.stopper(),
            callbacks=[recorder.callback()], failure_config=tune.FailureConfig(max_failures=2)))
    results = tuner.fit()
    errors = [r.error for r in results if r.error is not None]
    if errors:
        raise errors[0]
    return recorder.finish()


class _Recorder:
    """In the driver: logs each member report, charges the inner steps, stops at the budget."""

    def __init__(self, cfg: Config, base: dict, log, steps: int):
        self.cfg, self.base, self.log, self.steps = cfg, base, log, steps
        self.t0 = time.perf_counter()
        self.inner = 0
        self.best = math.inf
        self.best_member: dict[str, Any] = {}
        self.members: dict[str, int] = {}
        self.last_hp: dict[str, dict] = {}
        self.stopped_by: str | None = None

    def _spent(self) -> str | None:
        b = self.cfg.budget
        if b.wall_clock_s is not None and time.perf_counter() - self.t0 >= b.wall_clock_s:
            return "wall_clock"
        if b.inner_steps is not None and self.inner >= b.inner_steps:
            return "inner_steps"
        return None

    def on_result(self, trial_id: str, result: dict) -> None:
        member = self.members.setdefault(trial_id, len(self.members))
        self.inner += int(result["executed"])
        loss = float(result["val_loss"])
        hp = dict(result["hparams"])
        event = None
        prev = self.last_hp.get(trial_id)
        if prev is not None and prev != hp:
            event = "exploit"  # the member copied a better one's weights and moved its values
        self.last_hp[trial_id] = hp
        if math.isfinite(loss) and loss < self.best and not result.get("diverged"):
            self.best = loss
        if result.get("done_member") and "test_loss" in result and (
                not self.best_member or loss < self.best_member["val_loss"]):
            self.best_member = {"val_loss": loss, "test_loss": result["test_loss"],
                                "test_acc": result["test_acc"], "hparams": hp}
        self.log({**self.base, "kind": "pbt_step", "member": member, "step": int(result["step"]),
                  "executed": int(result["executed"]), "val_loss": loss,
                  "val_acc": result.get("val_acc"), "hparams": hp,
                  "event": event, "inner_steps": self.inner,
                  "elapsed_s": time.perf_counter() - self.t0, "best_val_loss": self.best})

    def callback(self):
        """A Tune callback passing each result to `on_result`."""
        return _driver_classes()[0](self)

    def stopper(self):
        """A Tune stopper ending every member once the budget is spent."""
        return _driver_classes()[1](self)

    def finish(self) -> dict[str, Any]:
        end = {**self.base, "kind": "run_end", "method_kind": "pbt", "best_val_loss": self.best,
               "test_loss": self.best_member.get("test_loss"),
               "test_acc": self.best_member.get("test_acc"),
               "best_params": self.best_member.get("hparams"),
               "final_hparams": _plain_hparams(self.best_member.get("hparams") or {}),
               "n_members": len(self.members), "inner_steps": self.inner,
               "elapsed_s": time.perf_counter() - self.t0,
               "stopped_by": self.stopped_by or "steps"}
        self.log(end)
        return end


def _driver_classes():
    """The Tune callback and stopper classes (made on first use: Ray is optional). The Tuner
    pickles its config, so both drop the recorder (which holds the run directory) when pickled."""
    from ray.tune import Callback, Stopper

    class Forward(Callback):
        def __init__(self, recorder):
            self.recorder = recorder

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.recorder.on_result(trial.trial_id, result)

        def __getstate__(self):
            return {}

    class BudgetStop(Stopper):
        def __init__(self, recorder):
            self.recorder = recorder

        def __call__(self, trial_id, result):
            return False

        def stop_all(self):
            why = self.recorder._spent()
            if why:
                self.recorder.stopped_by = why
            return why is not None

        def __getstate__(self):
            return {}

    return Forward, BudgetStop
