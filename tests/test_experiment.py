"""Experiment configs, run directories, runners under a budget, compare and report."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import hyperdescent as hd
from hyperdescent.errors import ConfigError
from hyperdescent.experiment import (
    RunDir,
    compare,
    dump_config,
    load_config,
    read_records,
    run_method,
    validate_config,
)
from hyperdescent.report import build_report

BASE = {
    "name": "tiny", "task": "cancer_logreg", "seeds": [0], "steps": 60,
    "budget": {"wall_clock_s": 1.5},
    "methods": [{"label": "OHO", "kind": "oho"}, {"label": "random", "kind": "random"},
                {"label": "TPE-hb", "kind": "tpe", "pruner": "hyperband"}],
}


def cfg_with(**kw):
    return validate_config({**BASE, **kw})


# -- config validation ----------------------------------------------------------------------------
@pytest.mark.parametrize("change, key", [
    ({"colour": "red"}, "'colour': unknown key"),
    ({"task": "imagenet"}, "'task'"),
    ({"methods": [{"label": "a", "kind": "sgd"}]}, "'methods[0].kind'"),
    ({"methods": [{"label": "a", "kind": "oho", "pruner": "median"}]}, "'methods[0].pruner'"),
    ({"methods": []}, "'methods'"),
    ({"budget": {}}, "'budget'"),
    ({"budget": {"wall_clock_s": 3, "minutes": 2}}, "'budget.minutes'"),
    ({"methods": [{"label": "a", "kind": "oho", "settings": {"meta_rate": 1}}]},
     "'methods[0].settings.meta_rate'"),
    ({"methods": [{"label": "a", "kind": "tpe", "colour": 1}]}, "'methods[0].colour'"),
    ({"space": {"learning_rate": {"init": 0.1}}}, "'space.learning_rate'"),
    ({"seeds": ["zero"]}, "'seeds[0]'"),
    ({"target_val_loss": "nobody"}, "'target_val_loss'"),
    ({"methods": [{"label": "a", "kind": "oho"}, {"label": "a", "kind": "tpe"}]}, "'methods'"),
])
def test_config_errors_name_the_key(change, key):
    with pytest.raises(ConfigError) as e:
        validate_config({**BASE, **change})
    assert key in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_budget_names_the_key():
    data = {k: v for k, v in BASE.items() if k != "budget"}
    with pytest.raises(ConfigError, match="'budget': required"):
        validate_config(data)


def test_unknown_kind_lists_the_kinds():
    with pytest.raises(ConfigError, match="'oho'.*'tpe'.*got 'bogus'"):
        cfg_with(methods=[{"label": "a", "kind": "bogus"}])


def test_toml_round_trip(tmp_path):
    cfg = cfg_with(space={"lr": {"init": 5e-4}, "weight_decay": {"per": "layer"}},
                   target_val_loss=0.25,
                   methods=[{"label": "OHO", "kind": "oho",
                             "settings": {"meta_lr": 0.05, "reset_every": 20}},
                            {"label": "grid", "kind": "grid", "settings": {"grid_points": 3},
                             "space": {"lr": {"low": 1e-3, "high": 1.0}}}])
    p = tmp_path / "c.toml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


def test_load_config_errors(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('task = "cancer_logreg"\n[budget]\nwall_clock_s = 1\n[[methods]]\nlabel = "x"\n'
                 'kind = "oho"\npruner = "hyperband"\n')
    with pytest.raises(ConfigError, match=r"methods\[0\]\.pruner"):
        load_config(p)
    p.write_text("task = [unclosed")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_bad_space_override_is_a_config_error(tmp_path):
    cfg = cfg_with(space={"lr": {"init": 5.0}})  # outside the task's [1e-5, 2]
    with pytest.raises(ConfigError, match="'space.lr'"):
        compare(cfg, out=tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_hyperparameter_names_come_from_the_optimizers():
    # configs, runners, the black-box objective and Schedule read one list, off the classes
    from hyperdescent.blackbox import KNOWN_HPARAMS
    from hyperdescent.experiment.config import HPARAM_NAMES
    from hyperdescent.experiment.runners import build_space

    sgd, adam = hd.optim.SGD().hyperparameter_names, hd.optim.Adam().hyperparameter_names
    assert set(HPARAM_NAMES) == set(sgd) | set(adam) and set(HPARAM_NAMES) < set(KNOWN_HPARAMS)
    task = hd.tasks.get(BASE["task"])
    space = {"dampening": {"init": 0.1, "low": 0.0, "high": 0.5}}
    cfg = cfg_with(space=space)
    assert "dampening" in build_space(task, cfg, cfg.methods[0])
    assert task.optimizer == "sgd"  # which takes no beta1
    cfg = cfg_with(space={"beta1": {"init": 0.9, "low": 0.5, "high": 0.99}})
    with pytest.raises(ConfigError, match="'space.beta1'.*'sgd'"):
        build_space(task, cfg, cfg.methods[0])


def test_examples_validate():
    root = os.path.join(os.path.dirname(__file__), "..", "examples")
    names = set(hd.tasks.names())
    found = {f[:-5] for f in os.listdir(root) if f.endswith(".toml")}
    assert names <= found
    for f in sorted(found):
        cfg = load_config(os.path.join(root, f + ".toml"))
        assert cfg.task in names


# -- run directories ------------------------------------------------------------------------------
def test_rundir_layout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = RunDir.create("x")
    b = RunDir.create("x")
    assert a.path.parent == tmp_path / "runs" and a.path != b.path
    assert a.path.name.endswith("-x") and len(a.path.name.split("-")[0]) == 8
    a.log({"v": float("nan"), "w": 1.5})
    with open(a.metrics_path, "a") as f:
        f.write('{"torn": ')  # a record cut short by a kill
    assert a.records() == [{"v": None, "w": 1.5}]
    a.close()
    a.write_config(cfg_with())
    assert a.config() == cfg_with()
    with pytest.raises(ConfigError, match="already holds a run"):
        RunDir.create("x", out=a.path)


def test_metrics_written_as_the_run_goes(tmp_path):
    """Each record is on disk (complete lines) before the next one is produced."""
    cfg = cfg_with(budget={"inner_steps": 300})
    task = hd.tasks.get(cfg.task)
    rd = RunDir(tmp_path)
    seen = []

    def log(rec):
        rd.log(rec)
        on_disk = read_records(rd.metrics_path)
        seen.append(len(on_disk))
        assert on_disk[-1]["kind"] == rec["kind"]

    for m in cfg.methods[:2]:
        run_method(task, cfg, m, 0, log)
    rd.close()
    assert seen == list(range(1, len(seen) + 1))
    kinds = [r["kind"] for r in rd.records()]
    assert "oho_step" in kinds and "trial" in kinds and kinds.count("run_end") == 2


def test_killed_run_keeps_its_records_and_reports(tmp_path):
    cfg_path = tmp_path / "slow.toml"
    cfg_path.write_text(textwrap.dedent("""
        task = "cancer_logreg"
        steps = 200
        [budget]
        wall_clock_s = 60
        [[methods]]
        label = "random"
        kind = "random"
    """))
    out = tmp_path / "run"
    code = ("import sys; from hyperdescent.cli import main; "
            f"sys.exit(main(['compare', {str(cfg_path)!r}, '--out', {str(out)!r}, "
            "'--no-progress']))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120  # a loaded machine: waiting ends at the 4th record
        while time.time() < deadline:
            if len(read_records(out / "metrics.jsonl")) >= 4:
                break
            time.sleep(0.1)
        else:
            pytest.fail("no records appeared")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    records = read_records(out / "metrics.jsonl")
    assert len(records) >= 4 and records[0]["kind"] == "run_start"
    assert (out / "config.toml").is_file() and not (out / "summary.json").exists()
    summary = build_report(out)
    assert not summary["complete"]
    assert summary["methods"]["random"]["best_val_loss"] is not None
    assert "Incomplete run" in (out / "report.md").read_text()
    assert (out / "best_val_vs_time.png").is_file()


# -- a tiny compare -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "run"
    cfg = cfg_with()
    path = compare(cfg, out=out, progress=False)
    return cfg, path


def test_compare_writes_the_run_directory(tiny_run):
    cfg, path = tiny_run
    for f in ("config.toml", "metrics.jsonl", "summary.json", "report.md",
              "best_val_vs_time.png", "best_val_vs_steps.png", "hparam_trajectories.png",
              "blackbox_samples.png"):
        assert (path / f).is_file(), f
    assert load_config(path / "config.toml") == cfg
    summary = json.loads((path / "summary.json").read_text())
    assert summary["complete"] and set(summary["methods"]) == {"OHO", "random", "TPE-hb"}
    assert summary["target_from"] == "random"  # the first black-box method
    for s in summary["methods"].values():
        assert s["best_val_loss"] is not None and s["test_loss"] is not None
        assert 0 <= s["test_acc"] <= 1
    report = (path / "report.md").read_text()
    assert "| OHO |" in report and "![best_val_vs_time](best_val_vs_time.png)" in report


def test_report_rebuilds_from_metrics_and_config(tiny_run):
    _, path = tiny_run
    before = json.loads((path / "summary.json").read_text())
    for f in ("summary.json", "report.md", "best_val_vs_time.png"):
        (path / f).unlink()
    after = build_report(path)
    assert (path / "report.md").is_file() and (path / "best_val_vs_time.png").is_file()
    assert after["methods"]["OHO"]["best_val_loss"] == before["methods"]["OHO"]["best_val_loss"]


def test_equal_wall_clock_budget(tiny_run):
    cfg, path = tiny_run
    records = read_records(path / "metrics.jsonl")
    ends = {r["method"]: r for r in records if r["kind"] == "run_end"}
    slack = 0.75  # one evaluation interval / one test evaluation at the end
    for label, end in ends.items():
        assert end["elapsed_s"] <= cfg.budget.wall_clock_s + slack, label
    for label in ("random", "TPE-hb"):
        trials = [r for r in records if r["kind"] == "trial" and r["method"] == label]
        assert trials and ends[label]["inner_steps"] == sum(t["trial_inner_steps"]
                                                            for t in trials)
        assert all(t["elapsed_s"] <= cfg.budget.wall_clock_s + slack for t in trials)


def test_inner_step_budget_counts_pruned_trials(tmp_path):
    cfg = cfg_with(task="digits_logreg", budget={"inner_steps": 700}, steps=100,
                   methods=[{"label": "OHO", "kind": "oho"},
                            {"label": "TPE-hb", "kind": "tpe", "pruner": "hyperband",
                             "settings": {"eval_every": 10}}])
    path = compare(cfg, out=tmp_path / "r", progress=False)
    records = read_records(path / "metrics.jsonl")
    ends = {r["method"]: r for r in records if r["kind"] == "run_end"}
    assert ends["OHO"]["inner_steps"] <= 700
    if ends["OHO"]["rollbacks"] == 0:
        assert ends["OHO"]["inner_steps"] == 100  # one training run of `steps`
    trials = [r for r in records if r["kind"] == "trial"]
    pruned = [t for t in trials if t["state"] == "pruned"]
    assert pruned and all(t["trial_inner_steps"] > 0 for t in pruned)
    total = sum(t["trial_inner_steps"] for t in trials)
    assert ends["TPE-hb"]["inner_steps"] == total
    assert 700 <= total <= 700 + 10  # stops at the budget, within one evaluation interval
    assert ends["TPE-hb"]["stopped_by"] == "inner_steps"
