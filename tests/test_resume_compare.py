"""`hyperdescent compare CONFIG --resume RUN_DIR`: a killed compare run continues, keeps its
finished runs and writes every record exactly once."""

import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

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


def _interrupt_at(step_of, at):
    """A callback that sends this process SIGINT once `step_of(tuner)` reaches `at`."""
    import os

    def callback(tuner, record):
        if step_of(tuner) == at:
            os.kill(os.getpid(), signal.SIGINT)
    return callback


def test_offline_tuner_saves_on_sigint_and_resumes_bit_identically(tmp_path):
    from test_offline_tuner import make_problem

    import hyperdescent as hd

    ck = tmp_path / "off.pt"
    full = hd.OfflineTuner(make_problem(), steps=6, meta_steps=3).run()
    part = hd.OfflineTuner(make_problem(), steps=6, meta_steps=3)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            part.run(checkpoint=ck, checkpoint_every=10, callback=_interrupt_at(lambda t: t.m, 1))
    finally:
        signal.signal(signal.SIGINT, old)
    assert part.m == 1  # the meta-step under way finished, then the run stopped
    back = hd.OfflineTuner.load(ck, make_problem())
    assert back.m == 1
    back.run()
    assert all(torch.equal(full.values[k], back.values[k]) for k in full.values)


def test_stn_trainer_saves_on_sigint_and_resumes_bit_identically(tmp_path):
    from test_stn import SPACE, _trainer

    from hyperdescent import stn

    model, train, val, opts = _trainer()
    full = stn.STNTrainer(model, SPACE, train, val, **opts).run(12)
    ck = tmp_path / "stn.pt"
    m1, *_ = _trainer()
    part = stn.STNTrainer(m1, SPACE, train, val, **opts)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            part.run(12, checkpoint=ck, checkpoint_every=100,
                     callback=_interrupt_at(lambda t: t.t, 7))
    finally:
        signal.signal(signal.SIGINT, old)
    assert part.t == 7
    m2, *_ = _trainer()
    resumed = stn.STNTrainer.load(ck, m2, SPACE, train, val, **opts)
    assert resumed.t == 7
    resumed.run(12)
    assert full.hparams == resumed.hparams and full.history == resumed.history
