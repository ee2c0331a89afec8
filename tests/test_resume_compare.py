"""`hyperdescent compare CONFIG --resume RUN_DIR`: a killed compare run continues, keeps its
finished runs and writes every record exactly once."""

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from hyperdescent.cli import main
from hyperdescent.experiment.rundir import read_records

CONFIG = textwrap.dedent("""
    task = "cancer_logreg"
    steps = 60
    seeds = [0, 1]
    [budget]
    trials = 3
    [[methods]]
    label = "random"
    kind = "random"
    [[methods]]
    label = "tpe"
    kind = "tpe"
""")


def _runs(records):
    return [(r["method"], r["seed"]) for r in records if r.get("kind") == "run_end"]


def test_a_killed_compare_resumes_without_rerunning_or_duplicating(tmp_path):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(CONFIG)
    out = tmp_path / "run"
    code = ("import sys; from hyperdescent.cli import main; "
            f"sys.exit(main(['compare', {str(cfg)!r}, '--out', {str(out)!r}, '--no-progress']))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(_runs(read_records(out / "metrics.jsonl"))) < 1:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = read_records(out / "metrics.jsonl")
    finished = _runs(before)
    assert finished, "no run finished before the kill"
    if len(finished) == 4:
        pytest.skip("the whole compare finished before the kill; nothing to resume")
    kept = [r for r in before if (r["method"], r["seed"]) in set(finished)]
    assert main(["compare", str(cfg), "--resume", str(out), "--no-progress"]) == 0
    after = read_records(out / "metrics.jsonl")
    assert sorted(_runs(after)) == sorted([(m, s) for m in ("random", "tpe") for s in (0, 1)])
    starts = [(r["method"], r["seed"]) for r in after if r.get("kind") == "run_start"]
    assert sorted(starts) == sorted(set(starts))  # one run_start per run: nothing duplicated
    assert after[:len(kept)] == kept  # the finished runs' records are kept as they were
    trials = [(r["method"], r["seed"], r["trial"]) for r in after if r.get("kind") == "trial"]
    assert len(trials) == len(set(trials)) == 4 * 3
    assert (out / "summary.json").is_file()


def test_resume_refuses_another_config_and_a_missing_directory(tmp_path, capsys):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(CONFIG)
    out = tmp_path / "run"
    assert main(["compare", str(cfg), "--out", str(out), "--no-progress"]) == 0
    other = tmp_path / "other.toml"
    other.write_text(CONFIG.replace("steps = 60", "steps = 61"))
    assert main(["compare", str(other), "--resume", str(out), "--no-progress"]) == 2
    assert "another config" in capsys.readouterr().err
    assert main(["compare", str(cfg), "--resume", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    # resuming a finished run reruns nothing and keeps its records
    before = read_records(out / "metrics.jsonl")
    assert main(["compare", str(cfg), "--resume", str(out), "--no-progress"]) == 0
    assert read_records(out / "metrics.jsonl") == before
