"""`search`: black-box hyperparameter search over an `hd.Space`, backed by an Optuna study.

Samplers (`sampler=`): ``"random"`` (Bergstra & Bengio 2012), ``"grid"``, ``"tpe"`` (Bergstra et
al. 2011), ``"gp"`` (GP Bayesian optimisation, Snoek et al. 2012), ``"cmaes"`` (Hansen 2016;
needs the ``cmaes`` package), ``"qmc"`` (scrambled Sobol sequence), or any
``optuna.samplers.BaseSampler``. Pruners (`pruner=`): ``None``/``"none"``, ``"median"``,
``"successive_halving"`` (Jamieson & Talwalkar 2016), ``"hyperband"`` (Li et al. 2017), or any
``optuna.pruners.BasePruner``.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import optuna
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from ..errors import ConfigError
from ..space import BoundSpace, Space
from .distributions import assemble, bind_space, grid_search_space, space_to_distributions
from .storage import shared_storage

SAMPLERS = ("random", "grid", "tpe", "gp", "cmaes", "qmc")
PRUNERS = ("none", "median", "successive_halving", "hyperband")

Objective = Callable[[dict, optuna.Trial], float]


def make_sampler(sampler: str | optuna.samplers.BaseSampler, bound: BoundSpace,
                 seed: int | None = 0, grid_points: int = 5,
                 **kwargs: Any) -> optuna.samplers.BaseSampler:
    """An Optuna sampler by name (TPE: Bergstra et al. 2011; CMA-ES: Hansen 2016), seeded."""
    if isinstance(sampler, optuna.samplers.BaseSampler):
        return sampler
    if not isinstance(sampler, str) or sampler.lower() not in SAMPLERS:
        raise ConfigError(
            f"unknown sampler {sampler!r}; use one of {list(SAMPLERS)} or an "
            f"optuna.samplers.BaseSampler instance")
    name = sampler.lower()
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed, **kwargs)
    if name == "grid":
        return optuna.samplers.GridSampler(grid_search_space(bound, grid_points=grid_points),
                                           seed=seed, **kwargs)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, **kwargs)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, **kwargs)
    if name == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError as e:  # pragma: no cover - cmaes is a core dependency
            raise ConfigError("sampler='cmaes' needs the `cmaes` package: pip install cmaes") from e
        return optuna.samplers.CmaEsSampler(seed=seed, **kwargs)
    kwargs.setdefault("scramble", True)  # a scrambled sequence, so that `seed` matters
    with warnings.catch_warnings():  # asked for by name: no "experimental" warning
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.QMCSampler(seed=seed, **kwargs)


def make_pruner(pruner: str | optuna.pruners.BasePruner | None,
                **kwargs: Any) -> optuna.pruners.BasePruner:
    """An Optuna pruner by name (successive halving: Jamieson & Talwalkar 2016; Hyperband: Li et al. 2017)."""
    if isinstance(pruner, optuna.pruners.BasePruner):
        return pruner
    if pruner is None or (isinstance(pruner, str) and pruner.lower() == "none"):
        return optuna.pruners.NopPruner()
    if not isinstance(pruner, str) or pruner.lower() not in PRUNERS:
        raise ConfigError(
            f"unknown pruner {pruner!r}; use None or one of {list(PRUNERS)} or an "
            f"optuna.pruners.BasePruner instance")
    name = pruner.lower()
    if name == "median":
        return optuna.pruners.MedianPruner(**kwargs)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**kwargs)
    kwargs.setdefault("min_resource", 1)
    return _ThreadSafeHyperband(**kwargs)


class _ThreadSafeHyperband(optuna.pruners.HyperbandPruner):
    """Optuna's HyperbandPruner (Li et al. 2017) with its lazy bracket set-up under a lock.

    With ``max_resource="auto"`` the brackets are built when the first trial completes; two
    threads (``n_jobs > 1``) can both build them, after which `_get_bracket_id` fails with
    "This line should be unreachable". A lock around set-up and bracket look-up prevents that.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._hd_lock = threading.RLock()

    def _try_initialization(self, study: optuna.Study) -> None:
        with self._hd_lock:
            if len(self._pruners) == 0:
                super()._try_initialization(study)

    def _get_bracket_id(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> int:
        with self._hd_lock:
            return super()._get_bracket_id(study, trial)


def _suggest(trial: optuna.Trial, name: str, dist: optuna.distributions.BaseDistribution):
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    raise ConfigError(f"unsupported distribution {dist!r} for dimension {name!r}")


def _continued_seed(seed: int | None, n_existing: int) -> int | None:
    """Seed for a sampler continuing a study that already holds `n_existing` trials."""
    if seed is None or n_existing == 0:
        return seed
    return int(np.random.SeedSequence([int(seed), n_existing]).generate_state(1)[0])


def search(objective: Objective, space: Space | BoundSpace,
           sampler: str | optuna.samplers.BaseSampler = "tpe", n_trials: int | None = 50,
           timeout: float | None = None, pruner: str | optuna.pruners.BasePruner | None = None,
           storage: str | optuna.storages.BaseStorage | None = None,
           study_name: str | None = None, n_jobs: int = 1, seed: int | None = 0,
           model: torch.nn.Module | Mapping[str, Sequence[int]] | None = None,
           direction: str = "minimize", grid_points: int = 5, load_if_exists: bool = True,
           sampler_kwargs: Mapping[str, Any] | None = None,
           pruner_kwargs: Mapping[str, Any] | None = None,
           callbacks: Sequence[Callable] | None = None, verbose: bool = False,
           ) -> optuna.Study:
    """Black-box search of `space` with an Optuna study (TPE: Bergstra et al. 2011; Hyperband: Li et al. 2017).

    `objective(values, trial)` gets `values` in the API shapes (see `assemble`) and the
    `optuna.Trial` (for `trial.report` / `trial.should_prune` / `optuna.TrialPruned`) and
    returns the number to minimise (or maximise, `direction=`). With a `storage` URL and a
    `study_name` an existing study is continued (`load_if_exists`) and `n_trials` counts the
    new trials; the sampler is then re-seeded from (`seed`, trials so far) so that it does not
    replay the first trials. `model` gives parameter names for per='layer' spaces (defaults to
    `objective.param_shapes` when the objective has one, as `task_objective`'s does).
    """
    if model is None and getattr(objective, "param_shapes", None) is not None:
        needs = isinstance(space, Space) and any(h.per != "global" for h in space.values())
        if needs:
            model = objective.param_shapes
    bound = bind_space(space, model)
    dists = space_to_distributions(bound)
    if direction not in ("minimize", "maximize"):
        raise ConfigError(f"direction must be 'minimize' or 'maximize', got {direction!r}")
    if n_trials is not None and (not isinstance(n_trials, int) or n_trials < 0):
        raise ConfigError(f"n_trials must be None or an integer >= 0, got {n_trials!r}")
    if not isinstance(n_jobs, int) or n_jobs == 0 or n_jobs < -1:
        raise ConfigError(f"n_jobs must be a positive integer or -1, got {n_jobs!r}")

    if storage is None and study_name is None:
        # Optuna names an unnamed study at random, and HyperbandPruner assigns each trial's
        # bracket by a hash of the study name: named after the seed, an in-memory search with
        # Hyperband prunes the same trials on every run (a stored study keeps a unique name)
        study_name = f"hyperdescent-seed{seed}"

    def build_sampler(s):
        return make_sampler(sampler, bound, seed=s, grid_points=grid_points,
                            **dict(sampler_kwargs or {}))

    old_verbosity = optuna.logging.get_verbosity()
    if not verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(
            storage=shared_storage(storage), sampler=build_sampler(seed),
            pruner=make_pruner(pruner, **dict(pruner_kwargs or {})),
            study_name=study_name, direction=direction, load_if_exists=load_if_exists)
        if study.direction.name.lower() != direction:
            raise ConfigError(
                f"study {study.study_name!r} in storage already exists with direction "
                f"{study.direction.name.lower()!r}, not {direction!r}")
        n_existing = len(study.trials)
        if n_existing and not isinstance(sampler, optuna.samplers.BaseSampler):
            study.sampler = build_sampler(_continued_seed(seed, n_existing))

        if hasattr(objective, "set_divergence_policy"):
            objective.set_divergence_policy(sampler)

        def wrapped(trial: optuna.Trial) -> float:
            flat = {dim: _suggest(trial, dim, d) for dim, d in dists.items()}
            return objective(assemble(flat, bound), trial)

        study.optimize(wrapped, n_trials=n_trials, timeout=timeout, n_jobs=n_jobs,
                       callbacks=list(callbacks) if callbacks else None)
    finally:
        optuna.logging.set_verbosity(old_verbosity)
    return study
