"""Compare runs through Ray Tune (executor = "ray") against the same runs in this process.

A local Ray with 2 CPUs is started once for the module; skipped when Ray Tune is not installed
(the `ray` extra, which .ci/run installs).
"""

import os
import signal

import pytest

from hyperdescent.errors import ConfigError
from hyperdescent.experiment import compare, read_records, validate_config

ray = pytest.importorskip("ray", reason="Ray Tune is not installed (the `ray` extra)")
pytest.importorskip("ray.tune", reason="Ray Tune is not installed (the `ray` extra)")

pytestmark = pytest.mark.ray

BASE = {
    "name": "tiny", "task": "cancer_logreg", "seeds": [0], "steps": 40,
    "budget": {"trials": 4},
    "methods": [{"label": "OHO", "kind": "oho", "settings": {"eval_every": 10}},
                {"label": "random", "kind": "random", "settings": {"eval_every": 10}},
                {"label": "grid", "kind": "grid", "settings": {"grid_points": 1}}],
}


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _by(records, kind, method):
    return [r for r in records if kind in (None, r["kind"]) and r["method"] == method]


class KillOnce:
    """A Tune callback killing the gradient run's worker process after its third record."""

    def __new__(cls):
        from ray.tune import Callback

        class Kill(Callback):
            killed = False

            def on_trial_result(self, iteration, trials, trial, result, **info):
                if not self.killed and result.get("n_records") == 3:
                    self.killed = True
                    os.kill(result["pid"], signal.SIGKILL)

        return Kill()


@pytest.fixture(scope="module")
def local_records(tmp_path_factory):
    cfg = validate_config(BASE)
    path = compare(cfg, out=tmp_path_factory.mktemp("local") / "r", progress=False)
    return read_records(path / "metrics.jsonl")


def test_ray_runs_equal_local_runs_through_a_preemption(local_ray, local_records, tmp_path):
    from hyperdescent import tasks
    from hyperdescent.experiment.executors import RayExecutor
    cfg = validate_config({**BASE, "executor": "ray"})
    kill = KillOnce()
    got = []
    RayExecutor(cfg, [kill]).run(tasks.get(cfg.task), got.append)
    assert kill.killed
    # the gradient run, killed after 3 records and resumed: every record once, in order, with
    # the same validation losses at the same steps
    want = _by(local_records, None, "OHO")
    assert [(r["kind"], r.get("step")) for r in _by(got, None, "OHO")] == \
        [(r["kind"], r.get("step")) for r in want]
    want_steps = [(r["step"], r["val_loss"]) for r in _by(local_records, "oho_step", "OHO")]
    got_steps = [(r["step"], r["val_loss"]) for r in _by(got, "oho_step", "OHO")]
    assert len(want_steps) > 2
    for (s, v), (s2, v2) in zip(got_steps, want_steps):
        assert s == s2 and v == pytest.approx(v2, rel=1e-9)
    # black-box: the budget of 4 trials charged exactly, the same seeded proposals and values
    want = {r["trial"]: r for r in _by(local_records, "trial", "random")}
    trials = _by(got, "trial", "random")
    assert sorted(t["trial"] for t in trials) == sorted(want) == [0, 1, 2, 3]
    for t in trials:
        w = want[t["trial"]]
        assert t["params"] == pytest.approx(w["params"], rel=1e-12)
        assert t["value"] == pytest.approx(w["value"], rel=1e-9)
    end = _by(got, "run_end", "random")[0]
    assert end["n_trials"] == 4 and end["stopped_by"] == "trials"
    assert end["inner_steps"] == sum(t["trial_inner_steps"] for t in trials) == 4 * 40
    # a grid of one point, under a budget of 4 trials: tried once, although two could run
    want = [(r["trial"], r["value"]) for r in _by(local_records, "trial", "grid")]
    got_grid = [(r["trial"], r["value"]) for r in _by(got, "trial", "grid")]
    assert len(want) == 1 and got_grid[0][0] == want[0][0] and len(got_grid) == 1
    assert got_grid[0][1] == pytest.approx(want[0][1], rel=1e-9)
    local_end = _by(local_records, "run_end", "grid")[0]
    assert _by(got, "run_end", "grid")[0]["stopped_by"] == local_end["stopped_by"]


def test_ray_config_is_validated():
    with pytest.raises(ConfigError, match="executor"):
        validate_config({**BASE, "executor": "dask"})
    with pytest.raises(ConfigError, match="ray.num_cpus"):
        validate_config({**BASE, "executor": "ray", "ray": {"num_cpus": 0}})


def test_pbt_baseline_explores_and_exploits_under_the_inner_step_budget(local_ray, tmp_path):
    cfg = validate_config({
        "name": "pbt", "task": "cancer_logreg", "seeds": [0], "steps": 40,
        "budget": {"inner_steps": 150},
        "methods": [{"label": "OHO", "kind": "oho", "settings": {"eval_every": 10}},
                    {"label": "PBT", "kind": "pbt",
                     "settings": {"population": 4, "interval": 10}}]})
    path = compare(cfg, out=tmp_path / "r", progress=False)
    records = read_records(path / "metrics.jsonl")
    steps = _by(records, "pbt_step", "PBT")
    end = _by(records, "run_end", "PBT")[0]
    # every member's reports, 10 inner steps each, charged until the budget of 150 is spent
    assert end["inner_steps"] == 10 * len(steps) and 150 <= end["inner_steps"] <= 150 + 4 * 10
    assert end["stopped_by"] == "inner_steps" and end["n_members"] == 4
    assert sorted({r["member"] for r in steps}) == [0, 1, 2, 3]
    # synchronous PBT: the worst quarter copies a better member and moves its values
    exploits = [r for r in steps if r["event"] == "exploit"]
    assert exploits
    from hyperdescent import tasks
    space = tasks.get("cancer_logreg").space
    for r in steps:
        for name, v in r["hparams"].items():
            assert space[name].low <= v <= space[name].high
    assert end["best_val_loss"] == min(r["val_loss"] for r in steps)
    assert (path / "pbt_schedule.png").exists()
