"""The `hyperdescent` command: run, compare, report, demo, and clean config errors."""

import json
import textwrap

import pytest

from hyperdescent.cli import demo_config, main

CONFIG = textwrap.dedent("""
    name = "cli"
    task = "digits_logreg"
    steps = 40
    [budget]
    wall_clock_s = 1.0
    inner_steps = 400
    [[methods]]
    label = "OHO"
    kind = "oho"
    [[methods]]
    label = "random"
    kind = "random"
""")


def last_line(text):
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.fixture
def config(tmp_path):
    p = tmp_path / "cli.toml"
    p.write_text(CONFIG)
    return p


def test_run_compare_report(config, tmp_path, capsys):
    out = tmp_path / "run1"
    assert main(["run", str(config), "--out", str(out), "--no-progress"]) == 0
    assert last_line(capsys.readouterr().out) == str(out)
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == ["OHO"]  # `run` is the first method only

    out2 = tmp_path / "run2"
    assert main(["compare", str(config), "--out", str(out2)]) == 0
    captured = capsys.readouterr()
    assert last_line(captured.out) == str(out2)
    assert "best val loss" in captured.out  # the results table
    summary = json.loads((out2 / "summary.json").read_text())
    assert set(summary["methods"]) == {"OHO", "random"}
    assert (out2 / "report.md").is_file() and (out2 / "best_val_vs_time.png").is_file()

    (out2 / "report.md").unlink()
    assert main(["report", str(out2)]) == 0
    assert last_line(capsys.readouterr().out) == str(out2)
    assert (out2 / "report.md").is_file()


def test_run_picks_method_by_label(config, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", str(config), "--method", "random", "--out", str(out),
                 "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == ["random"]


def test_default_run_dir_under_cwd(config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = config.read_text().replace("wall_clock_s = 1.0", "wall_clock_s = 0.3")
    config.write_text(cfg)
    assert main(["run", str(config), "--no-progress"]) == 0
    path = last_line(capsys.readouterr().out)
    assert path.startswith(str(tmp_path / "runs")) and path.endswith("-cli")


@pytest.mark.parametrize("edit, key", [
    (lambda s: s.replace('kind = "oho"', 'kind = "adamw"'), "methods[0].kind"),
    (lambda s: s + 'colour = "red"\n', "methods[1].colour"),
    (lambda s: s.replace('task = "digits_logreg"', 'task = "imagenet"'), "task"),
    (lambda s: s.replace('kind = "oho"', 'kind = "oho"\npruner = "hyperband"'),
     "methods[0].pruner"),
])
def test_config_errors_exit_2_with_one_line(config, tmp_path, capsys, edit, key):
    config.write_text(edit(CONFIG))
    assert main(["compare", str(config), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_missing_files_exit_2(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nope.toml")]) == 2
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "not a run directory" in err


def test_demo_config_matches_the_issue():
    cfg = demo_config()
    assert cfg.task == "digits_mlp"
    assert [m.kind for m in cfg.methods] == ["oho", "random", "tpe"]
    assert cfg.budget.wall_clock_s and cfg.space["lr"].init == 5e-4
    assert (cfg.space["lr"].low, cfg.space["lr"].high) == (1e-5, 2.0)
    assert (cfg.space["weight_decay"].low, cfg.space["weight_decay"].high) == (1e-7, 1e-1)


def test_demo_smoke(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--budget", "2", "--steps", "200", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert last_line(captured.out) == str(out)
    assert "time to target" in captured.out
    for f in ("report.md", "metrics.jsonl", "best_val_vs_time.png", "hparam_trajectories.png"):
        assert (out / f).is_file(), f
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"OHO", "random search", "TPE"}
    for s in summary["methods"].values():
        assert s["wall_time_s"] <= 2 + 1.0
