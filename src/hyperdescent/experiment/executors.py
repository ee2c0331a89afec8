"""Where the runs of a comparison execute: in this process (`executor = "local"`) or as Ray Tune
trials (`executor = "ray"`, Liaw et al. 2018, "Tune: a research platform for distributed model
selection and training").

Under Ray, each black-box trial is one Tune trial, proposed by the method's Optuna sampler
(ask/tell in this process) and cut, like a local trial, at its next evaluation once the budget
is spent or the Optuna pruner says so (with trials in parallel, each may run one evaluation
interval past the budget, as one local trial may); each gradient-based run (oho, greedy,
truncated, fds, stn) is one Tune trial, and a `pbt` run drives its own Tuner from here. Every
trial reports its records as it goes. An oho/greedy/truncated run also reports a tune.Checkpoint
of its tuner and counters after every evaluation (run_gradient's checkpoint hook), and a trial
restarted after its worker died (`max_failures`) resumes from the last one; the other kinds
checkpoint only how many records they have reported and start again from step 0. Either way
the driver drops the records a restarted trial sends again (by their count), so the run
directory holds each record once and inner steps are charged once. Records are written here, by
the driver, into the same run directory as a local run's.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..tasks.base import Task
from .config import Config, Method
from .run_checkpoint import DirCheckpoint, is_run_checkpoint, read_runner, run_checkpoint_dir
from .runners import _describe, build_space, record_trial, resolve_steps, resumable, run_method

Log = Callable[[dict[str, Any]], None]
EXECUTORS = ("local", "ray")
_PROGRESS = "progress.json"


def run_all(task: Task, cfg: Config, log: Log, callbacks: Sequence = (),
            done: set[tuple[str, int]] = frozenset(), run_dir: str | Path | None = None) -> None:
    """Every method x seed of `cfg` on its executor, records through `log`; the (label, seed)
    runs in `done` (finished before an interruption) are not run again; locally, black-box
    runs keep (and continue) their studies in `run_dir`, and gradient runs of the kinds that
    can (runners.resumable) their last checkpoint, removed once the run has finished."""
    if cfg.executor == "local":
        for i, m in enumerate(cfg.methods):
            for seed in cfg.seeds:
                if (m.label, seed) in done:
                    continue
                ck = (DirCheckpoint(run_checkpoint_dir(run_dir, i, m.label, seed))
                      if run_dir is not None and resumable(m) else None)
                run_method(task, cfg, m, seed, log, checkpoint=ck, run_dir=run_dir)
                if ck is not None:
                    ck.clear()
        return
    RayExecutor(cfg, callbacks).run(task, log, done=done)


def require_ray():
    """The `ray` module with Tune, or ConfigError saying how to install it."""
    try:
        import ray
        import ray.tune  # noqa: F401
    except ImportError as e:
        raise ConfigError("executor = 'ray' (and kind 'pbt') need Ray Tune: "
                          "pip install 'hyperdescent[ray]'") from e
    return ray


def init_ray(cfg: Config) -> None:
    """Connect to the cluster at `ray.address`, or start a local Ray (`ray.num_cpus` CPUs)."""
    ray = require_ray()
    if ray.is_initialized():
        return
    opts = cfg.ray
    address = opts.address if opts is not None else None
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if address is None and opts is not None and opts.num_cpus is not None:
        kwargs["num_cpus"] = opts.num_cpus
    ray.init(address=address, **kwargs)


def _jsonable(x: Any) -> Any:
    from .rundir import jsonable
    return jsonable(x)


# -- inside a Tune trial -------------------------------------------------------------------------
class _Reporter:
    """Sends records to the driver with `tune.report`. A run that cannot resume checkpoints the
    count sent with every record and, restarted, skips the records its earlier attempts sent;
    a resumable run (`resumable`) is checkpointed by `_TuneCheckpoint` and, restarted from
    one, counts on from the records sent before it. Every report says from which inner step
    this attempt started (`resumed_at`, 0 for a fresh start)."""

    def __init__(self, resumable: bool = False):
        from ray import tune
        self.tune = tune
        self.resumable = resumable
        self.sent = 0
        self.n = 0
        self.resumed_at = 0
        ckpt = tune.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                self.sent = int(json.loads((Path(d) / _PROGRESS).read_text())["records"])
                if resumable and is_run_checkpoint(Path(d)):
                    self.n, self.resumed_at = self.sent, int(read_runner(Path(d))["step"])

    def __call__(self, rec: dict[str, Any], **metrics: Any) -> None:
        self.n += 1
        if self.n <= self.sent:
            return
        out = {"record": json.dumps(_jsonable(rec), allow_nan=False), "n_records": self.n,
               "resumed_at": self.resumed_at, **metrics}
        if self.resumable:  # the run's own checkpoints carry the count
            self.tune.report(out)
            return
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / _PROGRESS).write_text(json.dumps({"records": self.n}))
            self.tune.report(out, checkpoint=self.tune.Checkpoint.from_directory(d))

    def checkpoint(self, directory: Path) -> None:
        """Report a resumable run's checkpoint directory, with the count of records sent."""
        (directory / _PROGRESS).write_text(json.dumps({"records": self.n}))
        self.tune.report({"n_records": self.n, "resumed_at": self.resumed_at},
                         checkpoint=self.tune.Checkpoint.from_directory(directory))


class _TuneCheckpoint:
    """run_gradient's RunCheckpoint inside a Tune trial: `latest` is tune.get_checkpoint() as
    a local directory, `save` a tune.report with a tune.Checkpoint of the directory."""

    def __init__(self, reporter: _Reporter, scratch: str):
        self.reporter, self.scratch = reporter, scratch

    def latest(self) -> Path | None:
        """The trial's last checkpoint, copied under the scratch directory, or None."""
        ckpt = self.reporter.tune.get_checkpoint()
        if ckpt is None:
            return None
        d = Path(ckpt.to_directory(str(Path(self.scratch) / "resume")))
        return d if is_run_checkpoint(d) else None

    def save(self, write) -> None:
        """`write` the checkpoint into a scratch directory and hand it to Tune (copied to the
        trial's storage before this returns)."""
        with tempfile.TemporaryDirectory(dir=self.scratch) as d:
            write(Path(d))
            self.reporter.checkpoint(Path(d))


def _context(config: dict[str, Any]) -> tuple[Task, Config, Method, int]:
    import torch

    from .. import tasks
    torch.set_num_threads(int(config.get("threads", 1)))
    cfg = Config.model_validate(config["cfg"])
    run = config.get("run", config)
    return tasks.get(cfg.task), cfg, cfg.method(run["label"]), int(run["seed"])


def run_trainable(config: dict[str, Any],
                  after_report: Callable[[dict[str, Any]], None] | None = None) -> None:
    """A Tune function trainable: one whole run of a method for a seed (run_method), resumed
    from the trial's checkpoint where the kind can (runners.resumable); `after_report(record)`
    runs after each record has gone to the driver (fault injection, progress output)."""
    task, cfg, method, seed = _context(config)
    reporter = _Reporter(resumable(method))
    log: Log = reporter
    if after_report is not None:
        def log(rec: dict[str, Any]) -> None:
            reporter(rec)
            after_report(rec)
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = _TuneCheckpoint(reporter, scratch) if reporter.resumable else None
        run_method(task, cfg, method, seed, log, checkpoint=checkpoint)


class _TuneTrial:
    """What a task objective asks of an optuna.Trial, inside a Tune trial: each report goes to
    the driver (which prunes by stopping the trial); user attributes return with the result."""

    def __init__(self, number: int, params: dict[str, Any]):
        from ray import tune
        self.tune, self.number, self.params = tune, number, params
        self.user_attrs: dict[str, Any] = {}

    def report(self, value: float, step: int) -> None:
        self.tune.report({"val_loss": value, "step": int(step), "final": 0})

    def should_prune(self) -> bool:
        return False

    def set_user_attr(self, key: str, value: Any) -> None:
        self.user_attrs[key] = value


def trial_trainable(config: dict[str, Any]) -> None:
    """A Tune function trainable: one black-box trial (task_objective at the sampled values)."""
    import optuna

    from ..blackbox import assemble, bind_space, task_objective
    task, cfg, method, seed = _context(config)
    settings = dict(method.settings)
    objective = task_objective(task, resolve_steps(task, cfg),
                               eval_every=settings.get("eval_every"), seed=seed)
    objective.set_divergence_policy(method.kind)
    bound = bind_space(build_space(task, cfg, method), objective.param_shapes)
    trial = _TuneTrial(int(config["number"]), config["values"])
    value, pruned = None, False
    try:
        value = objective(assemble(config["values"], bound), trial)
    except optuna.TrialPruned:
        pruned = True
    trial.tune.report({"val_loss": value if value is not None else math.nan, "final": 1,
                       "pruned": int(pruned), "step": trial.user_attrs.get("inner_steps", 0),
                       "attrs": json.dumps(_jsonable(trial.user_attrs))})


# -- the driver -----------------------------------------------------------------------------------
class RayExecutor:
    """Runs a config's methods x seeds as Ray Tune trials (see the module docstring)."""

    def __init__(self, cfg: Config, callbacks: Sequence = (),
                 trainable: Callable[[dict[str, Any]], None] = run_trainable):
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.trainable = trainable  # of the whole gradient-based runs (a wrapper in tests)

    def _run_config(self, name: str, storage: str, callbacks: Sequence = ()):
        from ray import tune
        opts = self.cfg.ray
        return tune.RunConfig(
            name=name, storage_path=storage, verbose=0,
            callbacks=[*callbacks, *self.callbacks],
            failure_config=tune.FailureConfig(max_failures=opts.max_failures if opts else 2))

    def _max_concurrent(self) -> int:
        import ray
        opts = self.cfg.ray
        if opts is not None and opts.max_concurrent is not None:
            return opts.max_concurrent
        return max(1, int(ray.cluster_resources().get("CPU", 1)))

    def run(self, task: Task, log: Log, done: set[tuple[str, int]] = frozenset()) -> None:
        """Every (method, seed) of the config not in `done` (finished before the driver was
        killed; an unfinished one starts again from its seed: RunDir.reopen dropped its records)."""
        from ray import tune
        init_ray(self.cfg)
        cfg_dict = self.cfg.model_dump(mode="json")
        storage = tempfile.mkdtemp(prefix="hd-ray-")
        whole = [(m, s) for m in self.cfg.methods for s in self.cfg.seeds
                 if m.gradient and (m.label, s) not in done]
        if whole:
            grid = [{"label": m.label, "seed": s} for m, s in whole]
            tuner = tune.Tuner(
                tune.with_resources(self.trainable, {"cpu": 1}),
                param_space={"cfg": cfg_dict, "run": tune.grid_search(grid)},
                tune_config=tune.TuneConfig(max_concurrent_trials=self._max_concurrent()),
                run_config=self._run_config("runs", storage, [_ForwardRecords(log)]))
            _check(tuner.fit())
        for m in self.cfg.methods:
            for seed in self.cfg.seeds:
                if (m.label, seed) in done:
                    continue
                if m.kind == "pbt":  # a Tuner of its own, driven from here
                    run_method(task, cfg=self.cfg, method=m, seed=seed, log=log)
                elif not m.gradient:
                    self._blackbox(task, m, seed, log, cfg_dict, storage)

    def _blackbox(self, task: Task, method: Method, seed: int, log: Log, cfg_dict: dict,
                  storage: str) -> dict[str, Any]:
        from ray import tune

        from ..blackbox import space_to_distributions, task_objective
        cfg = self.cfg
        steps = resolve_steps(task, cfg)
        space = build_space(task, cfg, method)
        settings = dict(method.settings)
        shapes = task_objective(task, steps, seed=seed).param_shapes
        dists = space_to_distributions(space, shapes)
        base = {"method": method.label, "seed": seed}
        log({**base, "kind": "run_start", "method_kind": method.kind, "pruner": method.pruner,
             "steps": steps, "settings": settings, "space": _describe(space),
             "dimensions": {k: {"low": getattr(d, "low", None), "high": getattr(d, "high", None),
                                "log": getattr(d, "log", None)} for k, d in dists.items()},
             "executor": "ray", "time": time.time()})
        search = _AskTell(cfg, method, seed, space, shapes, dists, base, log, steps)
        tuner = tune.Tuner(
            tune.with_resources(trial_trainable, {"cpu": 1}),
            param_space={"cfg": cfg_dict, "label": method.label, "seed": seed},
            tune_config=tune.TuneConfig(
                search_alg=search, num_samples=cfg.budget.trials or 10 ** 9,
                max_concurrent_trials=self._max_concurrent(), reuse_actors=True,
                time_budget_s=cfg.budget.wall_clock_s),
            run_config=tune.RunConfig(
                name=f"{method.label}-{seed}".replace(" ", "_"), storage_path=storage,
                verbose=0, stop=search.stopper, callbacks=self.callbacks,
                failure_config=tune.FailureConfig(max_failures=0)))
        _check(tuner.fit())
        return search.finish()


def _check(results) -> None:
    errors = [r.error for r in results if r.error is not None]
    if errors:
        raise errors[0]


class _ForwardRecords:
    """A Tune callback (in the driver) that logs the records trials report, as they arrive."""

    def __new__(cls, log: Log):
        from ray.tune import Callback

        class Forward(Callback):
            def __init__(self, log):
                self.log = log
                self.logged: dict[str, int] = {}

            def on_trial_result(self, iteration, trials, trial, result, **info):
                # a restarted trial resumes after its last checkpoint, which can be older than
                # its last report: records it sends again are dropped by their count
                n = int(result.get("n_records", 0))
                if "record" in result and n > self.logged.get(trial.trial_id, 0):
                    self.logged[trial.trial_id] = n
                    self.log(json.loads(result["record"]))

            def __getstate__(self):  # the Tuner pickles its config: the run directory stays
                return {}

        return Forward(log)


class _AskTell:
    """The method's Optuna study driven by ask/tell from Tune: a Tune Searcher proposing each
    trial's values, telling results back, logging trial records and charging the budget."""

    def __new__(cls, cfg, method, seed, space, shapes, dists, base, log, steps):
        import optuna
        from ray.tune.search import Searcher

        from ..blackbox import bind_space, grid_search_space, make_pruner, make_sampler
        from ..blackbox.search import _suggest

        class AskTell(Searcher):
            def __init__(self, cfg, method, seed, space, shapes, dists, base, log, steps):
                super().__init__(metric="val_loss", mode="min")
                self.cfg, self.method, self.seed, self.space = cfg, method, seed, space
                self.shapes, self.dists, self.base, self.log = shapes, dists, base, log
                self.steps = steps
                optuna.logging.set_verbosity(optuna.logging.WARNING)
                bound = bind_space(self.space, self.shapes)
                opts = self.method.settings
                kwargs = dict(opts.get("sampler_kwargs") or {})
                if "grid_points" in opts:
                    kwargs["grid_points"] = int(opts["grid_points"])
                self.study = optuna.create_study(
                    sampler=make_sampler(self.method.kind, bound, seed=self.seed, **kwargs),
                    pruner=make_pruner(self.method.pruner, **dict(opts.get("pruner_kwargs") or {})),
                    study_name=f"hyperdescent-seed{self.seed}")
                self.live: dict[str, Any] = {}  # tune trial id -> [optuna trial, last step]
                self.cut: dict[str, str] = {}
                self.state = {"inner": 0, "n": 0, "pruned": 0, "best": math.inf,
                              "best_trial": None, "test_loss": None, "test_acc": None,
                              "best_params": None, "stopped_by": None}
                self.t0 = time.perf_counter()
                self.done = False
                # a grid sampler asked for more trials than points repeats points: with trials
                # in parallel, stop asking once every point has been handed out
                self.grid_size = math.prod(len(v) for v in grid_search_space(
                    bound, grid_points=int(opts.get("grid_points", 5))).values()) \
                    if self.method.kind == "grid" else None

            # Tune pickles its search algorithm (for restoring an experiment): the study, the
            # log and the budget live in this process only
            def __getstate__(self):
                return {}

            def save(self, checkpoint_path: str) -> None:
                pass

            def restore(self, checkpoint_path: str) -> None:
                pass

            def save_to_dir(self, *args, **kwargs) -> None:
                pass

            def _spent(self, extra: int = 0) -> str | None:
                b = self.cfg.budget
                if b.wall_clock_s is not None and time.perf_counter() - self.t0 >= b.wall_clock_s:
                    return "wall_clock"
                if b.inner_steps is not None and self.state["inner"] + extra >= b.inner_steps:
                    return "inner_steps"
                if b.trials is not None and self.state["n"] + len(self.live) >= b.trials:
                    return "trials"
                return None

            def suggest(self, trial_id: str):
                why = self._spent()
                if self.grid_size is not None and len(self.study.trials) >= self.grid_size:
                    self.done = True
                if why or self.done:
                    self.state["stopped_by"] = self.state["stopped_by"] or why
                    return Searcher.FINISHED
                t = self.study.ask()
                values = {dim: _suggest(t, dim, d) for dim, d in self.dists.items()}
                self.live[trial_id] = [t, 0]
                return {"values": values, "number": t.number}

            def stopper(self, trial_id: str, result: dict) -> bool:
                entry = self.live.get(trial_id)
                if entry is None or result.get("final"):
                    return False
                t, _ = entry
                entry[1] = int(result["step"])
                t.report(float(result["val_loss"]), entry[1])
                running = sum(e[1] for e in self.live.values())
                b = self.cfg.budget
                over = (b.wall_clock_s is not None
                        and time.perf_counter() - self.t0 >= b.wall_clock_s) or (
                    b.inner_steps is not None and self.state["inner"] + running >= b.inner_steps)
                if over and entry[1] < self.steps:
                    self.cut[trial_id] = "budget"
                    return True
                if entry[1] < self.steps and t.should_prune():
                    self.cut[trial_id] = "pruner"
                    return True
                return False

            def on_trial_complete(self, trial_id: str, result: dict | None = None,
                                  error: bool = False):
                entry = self.live.pop(trial_id, None)
                if entry is None:
                    return
                t, last_step = entry
                result = result or {}
                attrs = json.loads(result["attrs"]) if result.get("final") else {}
                if trial_id in self.cut:
                    attrs.setdefault("inner_steps", last_step)
                    attrs["pruned_by"] = self.cut.pop(trial_id)
                for k, v in attrs.items():
                    t.set_user_attr(k, v)
                if error:
                    ft = self._tell(t, state=optuna.trial.TrialState.FAIL)
                elif trial_id in self.cut or attrs.get("pruned_by") or result.get("pruned"):
                    ft = self._tell(t, state=optuna.trial.TrialState.PRUNED)
                else:
                    ft = self._tell(t, float(result["val_loss"]))
                self._record(ft)

            def _tell(self, t, value=None, state=None):
                try:
                    return self.study.tell(t, value, state=state)
                except RuntimeError as e:
                    # a sampler that is done (the grid, all points tried) asks the study to
                    # stop, which only an optimize loop can: the trial is told, ask no more
                    if "Study.stop" not in str(e):
                        raise
                    self.done = True
                    return self.study.get_trials(deepcopy=False)[t.number]

            def _record(self, ft) -> None:
                st = self.state
                self.log({**record_trial(st, ft, self.base, time.perf_counter() - self.t0),
                          "executor": "ray"})
                why = self._spent()
                if why and why != "trials" or (why == "trials" and not self.live):
                    st["stopped_by"] = st["stopped_by"] or why
                    if why != "trials":
                        self.done = True

            def finish(self) -> dict[str, Any]:
                st = self.state
                elapsed = time.perf_counter() - self.t0
                b = self.cfg.budget
                stopped_by = st["stopped_by"] or self._spent() or (
                    "trials" if b.trials is not None and st["n"] >= b.trials else "exhausted")
                end = {**self.base, "kind": "run_end", "method_kind": self.method.kind,
                       "pruner": self.method.pruner, "best_val_loss": st["best"],
                       "test_loss": st["test_loss"], "test_acc": st["test_acc"],
                       "best_params": st["best_params"], "best_trial": st["best_trial"],
                       "n_trials": len(self.study.trials), "n_pruned": st["pruned"],
                       "inner_steps": st["inner"], "elapsed_s": elapsed,
                       "stopped_by": stopped_by, "executor": "ray"}
                self.log(end)
                return end

        return AskTell(cfg, method, seed, space, shapes, dists, base, log, steps)

