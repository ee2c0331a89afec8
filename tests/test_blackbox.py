"""Black-box baselines (seed 004): space -> Optuna mapping, samplers, pruners, storage, objective."""

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

try:
    import hyperdescent  # noqa: F401
except ImportError:  # running from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import optuna  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from optuna.distributions import (  # noqa: E402
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FixedTrial, TrialState  # noqa: E402

from hyperdescent.blackbox import (  # noqa: E402
    assemble,
    flatten_values,
    grid_search_space,
    initial_params,
    search,
    space_to_distributions,
    task_objective,
)
from hyperdescent.errors import ConfigError, HyperparameterError  # noqa: E402
from hyperdescent.space import Categorical, Int, Piecewise, Real, Space  # noqa: E402
from hyperdescent.tasks.base import Task  # noqa: E402


def tiny_task(steps=40, batch_size=20, n_train=200, regression=False, seed=0):
    """A 200x8 linear-softmax task with a learnable signal (or a linear regression)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 3, generator=g)

    def split(n):
        x = torch.randn(n, 8, generator=g)
        z = x @ w + 0.3 * torch.randn(n, 3, generator=g)
        return (x, z) if regression else (x, z.argmax(1))

    def make_model(s=0):
        torch.manual_seed(s)
        return torch.nn.Linear(8, 3)

    space = Space({"lr": Real(0.1, low=1e-4, high=10.0, log=True)})
    loss = torch.nn.functional.mse_loss if regression else torch.nn.functional.cross_entropy
    return Task("tiny", make_model, split(n_train), split(100), split(100), space, loss=loss,
                batch_size=batch_size, steps=steps, num_classes=3)


MLP_SHAPES = {"0.weight": (4, 8), "0.bias": (4,), "2.weight": (3, 4), "2.bias": (3,)}


# -- space -> distributions ------------------------------------------------------------------
def test_distributions_kinds():
    space = Space({
        "lr": Real(0.1, low=1e-5, high=2.0, log=True),
        "momentum": Real(0.9, low=0.0, high=0.999),
        "width": Int(128, low=16, high=512, log=True),
        "depth": Int(2, low=1, high=4),
        "opt": Categorical(["sgd", "adam"]),
    })
    d = space_to_distributions(space)
    assert d["lr"] == FloatDistribution(1e-5, 2.0, log=True)
    assert d["momentum"] == FloatDistribution(0.0, 0.999)
    assert d["width"] == IntDistribution(16, 512, log=True)
    assert d["depth"] == IntDistribution(1, 4)
    assert d["opt"] == CategoricalDistribution(["sgd", "adam"])


def test_per_layer_and_schedule_expansion():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    space = Space({
        "weight_decay": Real(1e-4, low=1e-8, high=1e-1, log=True, per="layer"),
        "lr": Real(0.1, low=1e-4, high=1.0, log=True, schedule=Piecewise(3)),
        "mom": Real(0.9, low=0.0, high=0.99, per="layer", schedule=Piecewise(2)),
    })
    d = space_to_distributions(space, model)
    params = ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert [k for k in d if k.startswith("weight_decay")] == [f"weight_decay/{p}" for p in params]
    assert [k for k in d if k.startswith("lr")] == ["lr[0]", "lr[1]", "lr[2]"]
    assert [k for k in d if k.startswith("mom")] == [f"mom/{p}[{k}]" for p in params
                                                     for k in range(2)]
    assert len(d) == 4 + 3 + 8
    # the same from a shape dict
    assert list(space_to_distributions(space, MLP_SHAPES)) == list(d)


def test_assemble_shapes_and_round_trip():
    space = Space({
        "wd": Real(1e-4, low=1e-8, high=1e-1, log=True, per="layer"),
        "lr": Real(0.1, low=1e-4, high=1.0, log=True, schedule=Piecewise(3)),
        "m": Real(0.5, low=0.0, high=0.9, per="layer", schedule=Piecewise(2)),
        "width": Int(8, low=2, high=16),
        "act": Categorical([torch.nn.ReLU, torch.nn.Tanh]),  # not storable: mapped to indices
        "opt": Categorical(["sgd", "adam"]),
    })
    init = initial_params(space, MLP_SHAPES)
    assert init["lr[2]"] == pytest.approx(0.1) and init["act"] == 0 and init["opt"] == "sgd"
    values = assemble(init, space, MLP_SHAPES)
    assert values["lr"] == pytest.approx([0.1, 0.1, 0.1])
    assert set(values["wd"]) == set(MLP_SHAPES) and isinstance(values["wd"]["0.bias"], float)
    assert values["m"]["2.weight"] == pytest.approx([0.5, 0.5])
    assert values["width"] == 8 and values["act"] is torch.nn.ReLU and values["opt"] == "sgd"
    assert flatten_values(values, space, MLP_SHAPES) == pytest.approx(init)
    with pytest.raises(HyperparameterError, match="no value"):
        assemble({"lr[0]": 0.1}, space, MLP_SHAPES)


def test_refusals_name_the_hyperparameter():
    with pytest.raises(HyperparameterError, match="'dropout'.*per='parameter'"):
        space_to_distributions(Space({"dropout": Real(0.1, low=0.0, high=0.5,
                                                      per="parameter")}), MLP_SHAPES)
    with pytest.raises(HyperparameterError, match="'scale'.*infinite bound"):
        space_to_distributions(Space({"scale": Real(1.0, low=0.0)}))
    with pytest.raises(HyperparameterError, match="'big'.*infinite bound"):
        space_to_distributions(Space({"big": Real(1.0, low=1e-3, log=True)}))
    with pytest.raises(HyperparameterError, match="'wd'.*model"):
        space_to_distributions(Space({"wd": Real(1e-4, low=1e-8, high=1.0, per="layer")}))


def test_grid_search_space():
    space = Space({
        "lr": Real(0.1, low=1e-4, high=1.0, log=True),
        "m": Real(0.5, low=0.0, high=1.0),
        "n": Int(3, low=1, high=3),
        "opt": Categorical(["sgd", "adam"]),
    })
    g = grid_search_space(space)
    assert g["lr"] == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    assert g["lr"][0] == 1e-4 and g["lr"][-1] == 1.0
    assert g["m"] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert g["n"] == [1, 2, 3] and g["opt"] == ["sgd", "adam"]
    assert len(grid_search_space(space, grid_points=3)["lr"]) == 3
    wide = Space({"w": Real(1e-4, low=1e-8, high=1.0, log=True, per="layer",
                            schedule=Piecewise(10))})
    with pytest.raises(HyperparameterError, match="grid"):
        grid_search_space(wide, MLP_SHAPES)


# -- samplers ----------------------------------------------------------------------------
SPACE2 = Space({"lr": Real(0.1, low=1e-3, high=5.0, log=True),
                "momentum": Real(0.5, low=0.0, high=0.95)})


@pytest.mark.parametrize("sampler,kwargs,cls", [
    ("random", {}, optuna.samplers.RandomSampler), ("grid", {}, optuna.samplers.GridSampler),
    ("tpe", {"n_startup_trials": 2}, optuna.samplers.TPESampler),
    ("gp", {"n_startup_trials": 2}, optuna.samplers.GPSampler),
    ("cmaes", {}, optuna.samplers.CmaEsSampler), ("qmc", {}, optuna.samplers.QMCSampler),
])
def test_each_sampler_runs_on_a_tiny_task(sampler, kwargs, cls):
    task = tiny_task()
    obj = task_objective(task)
    init_loss = obj({"lr": 1e-3, "momentum": 0.0})  # hardly trains
    study = search(obj, SPACE2, sampler=sampler, n_trials=5, seed=0, grid_points=3,
                   sampler_kwargs=kwargs)
    # the sampler asked for by name, not a stand-in (type, not isinstance: no subclass swap)
    assert type(study.sampler) is cls
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 5
    assert math.isfinite(study.best_value) and study.best_value < init_loss
    for t in done:
        assert 1e-3 <= t.params["lr"] <= 5.0 and 0.0 <= t.params["momentum"] <= 0.95
        assert t.user_attrs["inner_steps"] == task.steps


def test_grid_covers_and_stops():
    obj = task_objective(tiny_task(steps=10))
    space = Space({"lr": Real(0.1, low=1e-3, high=1.0, log=True)})
    study = search(obj, space, sampler="grid", n_trials=20, grid_points=4)
    assert sorted(t.params["lr"] for t in study.trials) == pytest.approx([1e-3, 1e-2, 1e-1, 1.0])


def test_seed_reproducible():
    def f(values, trial):
        return (math.log10(values["lr"]) + 1.0) ** 2 + (values["momentum"] - 0.3) ** 2

    def params(seed):
        return [t.params for t in search(f, SPACE2, sampler="tpe", n_trials=12, seed=seed,
                                         sampler_kwargs={"n_startup_trials": 4}).trials]

    assert params(3) == params(3)
    assert params(3) != params(4)


def test_direction_categorical_int_and_logging_restored():
    space = Space({"x": Int(2, low=0, high=5), "c": Categorical(["a", "b", "c"])})
    before = optuna.logging.get_verbosity()
    study = search(lambda v, t: v["x"] + {"a": 0, "b": 10, "c": 5}[v["c"]], space,
                   sampler="grid", n_trials=None, direction="maximize")
    assert optuna.logging.get_verbosity() == before
    # Int 0..5 on a 5-point grid: round(linspace(0, 5, 5)) = {0, 1, 2, 4, 5}; x 3 choices
    assert len(study.trials) == 15 and study.best_value == 15
    assert study.best_params == {"x": 5, "c": "b"}


def test_unknown_sampler_and_pruner():
    f = lambda v, t: v["lr"]  # noqa: E731
    with pytest.raises(ConfigError, match="'annealing'.*'tpe'"):
        search(f, SPACE2, sampler="annealing", n_trials=1)
    with pytest.raises(ValueError, match="'asha'.*'hyperband'"):
        search(f, SPACE2, pruner="asha", n_trials=1)


# -- pruners -----------------------------------------------------------------------------
@pytest.mark.parametrize("pruner", ["median", "successive_halving", "hyperband"])
def test_pruners_prune(pruner):
    # 60 steps, a report every 5; lr spans 1e-5 (learns nothing) .. 3 (fast), so many trials
    # are clearly behind the others at the first rungs.
    task = tiny_task(steps=60)
    space = Space({"lr": Real(0.1, low=1e-5, high=3.0, log=True)})
    study = search(task_objective(task, eval_every=5), space, sampler="random", n_trials=24,
                   pruner=pruner, seed=1)
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned, f"{pruner} pruned nothing"
    for t in pruned:
        assert t.user_attrs["pruned_by"] == "pruner"
        assert 0 < t.user_attrs["inner_steps"] < 60
        assert t.user_attrs["curve"][-1][0] == t.user_attrs["inner_steps"]
        assert "test_loss" not in t.user_attrs
    assert any(t.state == TrialState.COMPLETE for t in study.trials)


def test_hyperband_search_is_reproducible_from_the_seed():
    # HyperbandPruner puts each trial in a bracket by a hash of the study name; an unnamed
    # in-memory study is named after the seed, so a seeded search prunes the same trials
    task = tiny_task(steps=60)
    space = Space({"lr": Real(0.1, low=1e-5, high=3.0, log=True)})

    def outcome():
        study = search(task_objective(task, eval_every=5), space, sampler="tpe", n_trials=16,
                       pruner="hyperband", seed=2)
        return [(t.state, t.user_attrs["inner_steps"]) for t in study.trials]

    first = outcome()
    assert any(state == TrialState.PRUNED for state, _ in first)
    assert outcome() == first


def test_hyperband_with_threads_and_sqlite(tmp_path):
    # Optuna's HyperbandPruner sets its brackets up lazily; unguarded, parallel threads on a
    # slow storage race there ("This line should be unreachable"). search() guards it.
    task = tiny_task(steps=20)
    space = Space({"lr": Real(0.1, low=1e-5, high=1.0, log=True)})
    study = search(task_objective(task, eval_every=4), space, sampler="tpe", n_trials=10,
                   n_jobs=3, pruner="hyperband", storage=f"sqlite:///{tmp_path}/h.db")
    assert isinstance(study.pruner, optuna.pruners.HyperbandPruner)
    assert len(study.trials) == 10
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)


# -- the task objective ------------------------------------------------------------------
def test_task_objective_user_attrs():
    task = tiny_task(steps=25)  # 10 steps per epoch -> reports at 10, 20 and the final 25
    trial = FixedTrial({})
    val = task_objective(task)({"lr": 0.5, "weight_decay": 1e-4, "momentum": 0.9}, trial)
    a = trial.user_attrs
    assert a["inner_steps"] == 25 and a["diverged"] is False and a["pruned_by"] is None
    assert [p[0] for p in a["curve"]] == [0, 10, 20, 25]
    assert a["curve"][-1][1] == pytest.approx(val) and val < a["curve"][0][1]
    assert a["wall_time"] > 0 and all(p[2] <= a["wall_time"] for p in a["curve"])
    assert 0.0 <= a["val_acc"] <= 1.0 and 0.0 <= a["test_acc"] <= 1.0
    assert math.isfinite(a["test_loss"])


def test_trial_trains_on_the_batches_of_a_gradient_run():
    # same seed, same batch size: batch t of a trial is hd.Problem's train_batch(t), across
    # epoch boundaries, so a side-by-side comparison differs only in the method
    from hyperdescent import Problem

    seen = []

    class Recording(torch.nn.Linear):
        def forward(self, x):
            if self.training:
                seen.append(x.clone())
            return super().forward(x)

    def make_model(s=0):
        torch.manual_seed(s)
        return Recording(8, 3)

    task = tiny_task(steps=23, batch_size=30)  # 6 batches an epoch, ragged rest dropped
    task.make_model = make_model
    task_objective(task, seed=3)({"lr": 0.1})
    problem = Problem(make_model(3), train=task.train, val=task.val, batch_size=30, seed=3)
    assert len(seen) == 23
    for t, x in enumerate(seen):
        assert torch.equal(x, problem.train_batch(t)[0]), t
    # another seed, another order
    assert not torch.equal(seen[0], Problem(make_model(4), train=task.train, val=task.val,
                                            batch_size=30, seed=4).train_batch(0)[0])


def test_trial_equals_a_gradient_run_with_the_same_seed():
    # torch.optim in the trial, hd.optim in the problem: the same batches, so the same run
    import hyperdescent as hd

    task = tiny_task(steps=25, batch_size=30).to(dtype=torch.float64)
    trial = task_objective(task, seed=2)({"lr": 0.2, "dampening": 0.5})
    problem = hd.Problem(task.make_model(2).double(), loss=task.loss,
                         optimizer=hd.optim.SGD(momentum=task.momentum, dampening=0.5),
                         space=Space({"lr": Real(0.2, low=1e-3, high=1.0, log=True)}),
                         train=task.train, val=task.val, batch_size=30, val_batch_size=100,
                         seed=2)
    assert hd.hypergrad(problem, steps=25, method="reverse").value == pytest.approx(
        trial, rel=1e-10)
    assert task_objective(task, seed=2)({"lr": 0.2}) != pytest.approx(trial, rel=1e-6)


def test_trial_and_problem_share_one_accuracy_rule():
    from hyperdescent import Problem
    from hyperdescent.blackbox import evaluate

    task = tiny_task()
    model = task.make_model(0)
    problem = Problem(model, train=task.train, val=task.val, batch_size=20)
    ev = problem.evaluate(problem.params0, problem.buffers0, "val")
    assert evaluate(model, task.loss, *task.val) == (ev["loss"], ev["acc"])


def test_schedule_and_per_layer_values():
    task = tiny_task(steps=40)
    full = task_objective(task)
    half = task_objective(task, steps=20)
    # lr 0 in the second block of a Piecewise(2) schedule == stopping after 20 steps
    assert full({"lr": [0.3, 0.0], "momentum": 0.0}) == pytest.approx(
        half({"lr": 0.3, "momentum": 0.0}), rel=1e-6)
    # a per-layer dict with equal values == the global value
    assert full({"lr": {"weight": 0.3, "bias": 0.3}}) == pytest.approx(full({"lr": 0.3}))
    # per-layer values are applied per parameter tensor: freezing the weight changes the run
    assert full({"lr": {"weight": 0.0, "bias": 0.3}}) != pytest.approx(full({"lr": 0.3}))
    # tensors in the API shapes are accepted too
    assert full({"lr": torch.tensor([0.3, 0.0])}) == pytest.approx(
        full({"lr": [0.3, 0.0]}))


def test_per_layer_space_binds_from_the_objective():
    task = tiny_task(steps=10)
    space = Space({"lr": Real(0.1, low=1e-3, high=1.0, log=True, per="layer"),
                   "weight_decay": Real(1e-4, low=1e-6, high=1e-2, log=True,
                                        schedule=Piecewise(2))})
    study = search(task_objective(task), space, sampler="random", n_trials=3)
    assert set(study.trials[0].params) == {"lr/weight", "lr/bias", "weight_decay[0]",
                                           "weight_decay[1]"}


def test_adam_and_divergence():
    task = tiny_task(steps=20, regression=True)
    task.optimizer = "adam"
    obj = task_objective(task)
    assert math.isfinite(obj({"lr": 0.05, "beta1": 0.8, "beta2": 0.99}))
    with pytest.raises(HyperparameterError, match="momentum"):
        obj({"lr": 0.05, "momentum": 0.9})
    with pytest.raises(HyperparameterError, match="'width'"):
        obj({"lr": 0.05, "width": 3})
    task.optimizer = "sgd"
    trial = FixedTrial({})
    with pytest.raises(optuna.TrialPruned, match="diverged"):
        task_objective(task)({"lr": 1e4, "momentum": 0.9}, trial)
    assert trial.user_attrs["diverged"] is True
    assert trial.user_attrs["pruned_by"] == "divergence"
    assert trial.user_attrs["inner_steps"] < 20
    assert trial.user_attrs["val_acc"] is None  # regression: no accuracy


def test_bundled_task_runs_a_search():
    from hyperdescent.tasks import get

    task = get("digits_logreg")  # bundled (scikit-learn's digits): no skip, a failure is a bug
    space = Space({"lr": Real(0.1, low=1e-3, high=1.0, log=True)})
    study = search(task_objective(task, steps=20), space, sampler="random", n_trials=2)
    assert all(math.isfinite(t.value) for t in study.trials)


# -- storage -----------------------------------------------------------------------------
_WORKER = textwrap.dedent("""
    import math, sys
    from hyperdescent.blackbox import search
    from hyperdescent.space import Space, Real
    space = Space({"lr": Real(0.1, low=1e-4, high=1.0, log=True),
                   "m": Real(0.5, low=0.0, high=0.99)})
    f = lambda v, t: (math.log10(v["lr"]) + 2) ** 2 + (v["m"] - 0.5) ** 2
    study = search(f, space, sampler="tpe", n_trials=int(sys.argv[1]), seed=0,
                   storage=sys.argv[2], study_name="shared")
    print(len(study.trials))
""")


def test_sqlite_storage_continues_across_processes(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    src = str(Path(sys.modules["hyperdescent"].__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [src] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    outs = []
    for n in (3, 2):
        r = subprocess.run([sys.executable, "-c", _WORKER, str(n), url], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout.split()[-1])
    assert outs == ["3", "5"]
    study = optuna.load_study(study_name="shared", storage=url)
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    # the second process continued the sampler rather than replaying the first trials
    first = [t.params for t in study.trials[:3]]
    assert all(t.params not in first for t in study.trials[3:])


def test_divergence_is_a_penalty_for_samplers_that_ignore_pruned_trials():
    space = Space({"lr": Real(1e4, low=1e4, high=1e5, log=True),
                   "momentum": Real(0.9, low=0.85, high=0.95)})
    study = search(task_objective(tiny_task(steps=20, regression=True)), space, sampler="gp",
                   n_trials=2, seed=0)
    assert {t.state for t in study.trials} == {TrialState.COMPLETE}
    assert all(t.user_attrs["diverged"] for t in study.trials)
    assert all(math.isfinite(t.value) for t in study.trials)
