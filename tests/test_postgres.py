"""A black-box study on a real PostgreSQL server shared by 4 worker processes.

Needs HD_TEST_POSTGRES_URL (`.ci/run` installs and starts Debian's postgresql and sets it) and
psycopg2 (the `postgres` extra); skipped without them.
"""

import json
import math
import multiprocessing
import os
import time
import uuid

import pytest

import hyperdescent as hd
from hyperdescent.blackbox.storage import is_database_url, shared_storage

URL = os.environ.get("HD_TEST_POSTGRES_URL")
needs_postgres = pytest.mark.skipif(
    URL is None, reason="HD_TEST_POSTGRES_URL is not set (no PostgreSQL server; .ci/run starts one)")
SPACE = hd.Space({"lr": hd.Real(0.1, low=1e-4, high=1.0, log=True)})


def _objective(out_path: str, crash: bool, pause: float):
    def objective(values, trial):
        if crash:
            os._exit(3)  # killed mid-trial: the trial is left RUNNING in the database
        time.sleep(pause)
        value = (math.log10(float(values["lr"])) + 2.0) ** 2
        with open(out_path, "a") as f:
            f.write(json.dumps({"number": trial.number, "lr": float(values["lr"]),
                                "value": value}) + "\n")
        return value
    return objective


def _worker(name: str, seed: int, n_trials: int, out_path: str, crash: bool = False,
            pause: float = 0.0):
    storage = shared_storage(URL, heartbeat_interval=1, grace_period=2)
    hd.blackbox.search(_objective(out_path, crash, pause), SPACE, sampler="random",
                       n_trials=n_trials, storage=storage, study_name=name, seed=seed)


def _run_workers(name, tmp_path, specs):
    pytest.importorskip("psycopg2", reason="the postgres extra (psycopg2) is not installed")
    import optuna
    optuna.create_study(storage=shared_storage(URL), study_name=name)  # created once, before the workers race
    ctx = multiprocessing.get_context("fork")
    procs = []
    for i, (n, crash, pause, delay) in enumerate(specs):
        p = ctx.Process(target=_worker, args=(name, i, n, str(tmp_path / f"w{i}.jsonl"), crash,
                                              pause))
        p.start()
        procs.append(p)
        time.sleep(delay)
    for p in procs:
        p.join(120)
    ran = [json.loads(line) for i in range(len(specs)) if (tmp_path / f"w{i}.jsonl").exists()
           for line in (tmp_path / f"w{i}.jsonl").read_text().splitlines()]
    storage = shared_storage(URL)
    trials = optuna.load_study(storage=storage, study_name=name).get_trials(deepcopy=False)
    optuna.delete_study(storage=storage, study_name=name)
    return procs, ran, trials


@needs_postgres
def test_four_workers_share_one_study_without_losing_or_duplicating_a_trial(tmp_path):
    name = f"hd-test-{uuid.uuid4().hex[:12]}"
    procs, ran, trials = _run_workers(name, tmp_path, [(6, False, 0.0, 0.0)] * 4)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    import optuna
    assert len(trials) == 24
    assert sorted(t.number for t in trials) == list(range(24))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    # every trial a worker ran is in the study once, with the value that worker computed
    by_number = {t.number: t for t in trials}
    assert sorted(r["number"] for r in ran) == list(range(24))
    for r in ran:
        assert by_number[r["number"]].value == pytest.approx(r["value"], rel=1e-12)
        assert by_number[r["number"]].params["lr"] == pytest.approx(r["lr"], rel=1e-12)
    # workers seeded apart propose different values
    assert len({round(r["lr"], 12) for r in ran}) == 24


@needs_postgres
def test_a_dead_workers_trial_is_failed_and_run_again(tmp_path):
    name = f"hd-test-{uuid.uuid4().hex[:12]}"
    # worker 0 dies inside its first trial; the others outlive the 2 s grace period
    procs, ran, trials = _run_workers(
        name, tmp_path, [(1, True, 0.0, 0.5), (10, False, 0.4, 0.0), (10, False, 0.4, 0.0)])
    import optuna
    assert procs[0].exitcode == 3 and procs[1].exitcode == procs[2].exitcode == 0
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retried) == 1 and retried[0].state == optuna.trial.TrialState.COMPLETE
    assert retried[0].params == failed[0].params


def test_only_database_urls_get_a_heartbeat_storage():
    assert is_database_url("postgresql+psycopg2://u:p@h/db") and is_database_url("postgres://h/d")
    assert not is_database_url("sqlite:///x.db") and not is_database_url(None)
    assert shared_storage("sqlite:///x.db") == "sqlite:///x.db"
