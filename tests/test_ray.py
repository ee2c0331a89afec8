"""Compare runs through Ray Tune (executor = "ray") against the same runs in this process.

A local Ray with 2 CPUs is started once per test session; skipped when Ray Tune is not installed
(the `ray` extra, which .ci/run installs).
"""

import json
import os

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


@pytest.fixture(scope="session")
def local_ray():
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _by(records, kind, method):
    return [r for r in records if kind in (None, r["kind"]) and r["method"] == method]


def dies_once(marker: str, step: int):
    """A gradient-run trainable whose worker process dies (os._exit) right after the record of
    `step` has gone to the driver, the first time only (a marker file remembers)."""
    from hyperdescent.experiment.executors import run_trainable

    def die(rec):
        if rec.get("kind") == "oho_step" and rec["step"] == step and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)

    def trainable(config):
        run_trainable(config, after_report=die)

    return trainable


class Starts:
    """A Tune callback collecting the inner step each attempt of a trial started from."""

    def __new__(cls):
        from ray.tune import Callback

        class Collect(Callback):
            def __init__(self):
                self.seen = set()

            def on_trial_result(self, iteration, trials, trial, result, **info):
                if "resumed_at" in result:
                    self.seen.add(int(result["resumed_at"]))

        return Collect()


@pytest.fixture(scope="module")
def local_records():
    """The records of the same runs in this process, as a run directory stores them (JSON);
    run_all without compare's report, which the PBT test covers."""
    from hyperdescent import tasks
    from hyperdescent.experiment.executors import run_all
    from hyperdescent.experiment.rundir import jsonable
    cfg = validate_config(BASE)
    got = []
    run_all(tasks.get(cfg.task), cfg, got.append)
    return [json.loads(json.dumps(jsonable(r))) for r in got]


def test_ray_runs_equal_local_runs_through_a_preemption(local_ray, local_records, tmp_path):
    from hyperdescent import tasks
    from hyperdescent.experiment.executors import RayExecutor
    cfg = validate_config({**BASE, "executor": "ray", "ray": {"max_failures": 1}})
    marker = str(tmp_path / "died")
    starts = Starts()
    got = []
    RayExecutor(cfg, [starts], trainable=dies_once(marker, 20)).run(tasks.get(cfg.task),
                                                                   got.append)
    assert os.path.exists(marker)
    # the worker died after step 20's record, before step 20's checkpoint: the restarted
    # attempt resumed from step 10's checkpoint, not from step 0
    assert starts.seen == {0, 10}
    # every record once, in order, bit-identical to the local run (the steps the dead attempt
    # took after its checkpoint are not charged twice)
    want = _by(local_records, None, "OHO")
    strip = ("elapsed_s", "time")
    assert [{k: v for k, v in r.items() if k not in strip} for r in _by(got, None, "OHO")] == \
        [{k: v for k, v in r.items() if k not in strip} for r in want]
    end = _by(got, "run_end", "OHO")[0]
    assert end["inner_steps"] == 40 and end["final_hparams"] == want[-1]["final_hparams"]
    assert end["final_val_loss"] == want[-1]["final_val_loss"]
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
        "budget": {"inner_steps": 80},
        "methods": [{"label": "OHO", "kind": "oho", "settings": {"eval_every": 10}},
                    {"label": "PBT", "kind": "pbt",
                     "settings": {"population": 4, "interval": 10}}]})
    path = compare(cfg, out=tmp_path / "r", progress=False)
    records = read_records(path / "metrics.jsonl")
    steps = _by(records, "pbt_step", "PBT")
    end = _by(records, "run_end", "PBT")[0]
    # every member's reports, 10 inner steps each, charged until the budget of 80 is spent (two
    # synchronous rounds of the 4 members: the first explore/exploit comes after the first)
    assert end["inner_steps"] == 10 * len(steps) and 80 <= end["inner_steps"] <= 80 + 4 * 10
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


def test_a_killed_ray_compare_resumes_its_unfinished_runs_only(local_ray, tmp_path):
    """--resume under executor = 'ray': finished (method, seed) runs are kept as written, an
    unfinished one (here: the driver died before random's run_end) runs again from its seed."""
    cfg = validate_config({**BASE, "executor": "ray",
                           "methods": [BASE["methods"][0], BASE["methods"][1]]})
    path = compare(cfg, out=tmp_path / "r", progress=False)
    before = read_records(path / "metrics.jsonl")
    lines = (path / "metrics.jsonl").read_text().splitlines(keepends=True)
    cut = next(i for i, r in enumerate(before) if r.get("kind") == "trial")
    # as if killed after random's first trial record: its later trials and run_end are gone
    kept = [line for i, (line, r) in enumerate(zip(lines, before))
            if r.get("method") != "random" or i <= cut]
    (path / "metrics.jsonl").write_text("".join(kept))
    (path / "summary.json").unlink()
    again = compare(cfg, progress=False, resume=path)
    after = read_records(again / "metrics.jsonl")
    assert _by(after, None, "OHO") == _by(before, None, "OHO")  # not rerun
    strip = ("elapsed_s", "time", "trial_wall_s")
    rerun = [{k: v for k, v in r.items() if k not in strip} for r in _by(after, None, "random")]
    first = [{k: v for k, v in r.items() if k not in strip} for r in _by(before, None, "random")]
    assert [r["kind"] for r in rerun].count("run_start") == 1  # the partial run's records went
    assert sorted(r["trial"] for r in rerun if r["kind"] == "trial") == [0, 1, 2, 3]
    # seeded: the rerun proposes and scores what the killed run did
    key = lambda r: r["trial"]  # noqa: E731
    for a, b in zip(sorted([r for r in rerun if r["kind"] == "trial"], key=key),
                    sorted([r for r in first if r["kind"] == "trial"], key=key)):
        assert a["params"] == pytest.approx(b["params"], rel=1e-12)
        assert a["value"] == pytest.approx(b["value"], rel=1e-9)
    assert (again / "summary.json").is_file()
