"""`hyperdescent compare CONFIG --resume RUN_DIR`: a killed compare run continues, keeps its
finished runs and writes every record exactly once."""

import signal
import subprocess
import sys
import textwrap

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


def _killed_compare(tmp_path, config: str, child: str):
    """Run `child` (a compare that SIGKILLs itself) on `config`: (config path, run directory)."""
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(config)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", child, str(cfg), str(out)],
                          capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    return cfg, out


KILLED = textwrap.dedent("""
    task = "cancer_logreg"
    steps = 40
    seeds = [0, 1]
    [budget]
    trials = 5
    [[methods]]
    label = "oho"
    kind = "oho"
    [[methods]]
    label = "random"
    kind = "random"
    settings = {eval_every = 10}
""")
# the child SIGKILLs itself inside trial 3 of (random, seed 0), right after its second
# report: a kill in the middle of a black-box study, with one trial left running in it
_DIE_IN_TRIAL = """
import os, signal, sys
from hyperdescent.blackbox import objective
from hyperdescent.cli import main
real = objective.TaskObjective.__call__
def dying(self, values, trial):
    if trial.number == 3 and self.seed == 0:
        report, n = trial.report, []
        def killing(value, step):
            report(value, step)
            n.append(step)
            if len(n) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        trial.report = killing
    return real(self, values, trial)
objective.TaskObjective.__call__ = dying
sys.exit(main(["compare", sys.argv[1], "--out", sys.argv[2], "--no-progress"]))
"""


def test_a_compare_killed_inside_a_study_continues_that_study(tmp_path):
    import optuna

    from hyperdescent.blackbox.resume import study_file
    cfg, out = _killed_compare(tmp_path, KILLED, _DIE_IN_TRIAL)
    before = read_records(out / "metrics.jsonl")
    assert sorted(_runs(before)) == [("oho", 0), ("oho", 1)]
    trials = [r for r in before if r.get("kind") == "trial"]
    assert [r["trial"] for r in trials] == [0, 1, 2]
    # as if the kill had also fallen between the study's tell and the record's write: the
    # study holds trial 2 finished, metrics.jsonl lacks its record
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:-1]))
    kept = before[:-1]

    assert main(["compare", str(cfg), "--resume", str(out), "--no-progress"]) == 0
    after = read_records(out / "metrics.jsonl")
    assert after[:len(kept)] == kept  # nothing written before the kill is rewritten
    assert sorted(_runs(after)) == [(m, s) for m in ("oho", "random") for s in (0, 1)]
    starts = [(r["method"], r["seed"]) for r in after if r.get("kind") == "run_start"]
    assert sorted(starts) == sorted(set(starts)) and len(starts) == 4  # no run began again
    # the finished gradient runs were not rerun: their records are the ones from before
    assert [r for r in after if r["method"] == "oho"] == [r for r in kept if r["method"] == "oho"]

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(study_file(out, 1, "random", 0))))
    study = optuna.load_study(study_name="hyperdescent-seed0", storage=storage)
    by_state = {}
    for t in study.trials:
        by_state.setdefault(t.state.name, []).append(t)
    assert len(by_state["COMPLETE"]) + len(by_state.get("PRUNED", [])) == 5
    (killed,) = by_state["FAIL"]
    assert killed.number == 3 and "RUNNING" not in by_state
    rerun = [t for t in study.trials if t.user_attrs.get("retry_of") == 3]
    assert len(rerun) == 1 and rerun[0].params == killed.params  # run again, same values
    for r in trials:  # the trials finished before the kill: same numbers, same values
        t = study.trials[r["trial"]]
        assert t.params == r["params"] and t.value == r["value"]
    recs = [r for r in after if r.get("kind") == "trial" and r["method"] == "random"
            and r["seed"] == 0]
    numbers = [r["trial"] for r in recs]
    finished = [t.number for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert sorted(numbers) == finished  # each finished trial recorded exactly once
    assert [r["trial"] for r in recs][:3] == [0, 1, 2]
    assert [r["trial"] for r in after if r.get("kind") == "trial_killed"] == [3]
    end = next(r for r in after if r.get("kind") == "run_end" and r["method"] == "random"
               and r["seed"] == 0)
    assert end["n_trials"] == 5 and end["n_killed"] == 1 and end["stopped_by"] == "trials"
    assert end["inner_steps"] == sum(r["trial_inner_steps"] for r in recs)
    assert end["best_val_loss"] == min(r["value"] for r in recs if r["value"] is not None)
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

    # killed after its last trial, before its run_end: only the run_end is written; killed
    # with its study file lost: that run starts again from its seed
    from hyperdescent.blackbox.resume import study_file
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(
        line for line, r in zip(lines, before) if not (
            r.get("kind") == "run_end" and r["method"] == "tpe")))
    study_file(out, 1, "tpe", 1).unlink()
    assert main(["compare", str(cfg), "--resume", str(out), "--no-progress"]) == 0
    after = read_records(out / "metrics.jsonl")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("elapsed_s", "time", "trial_wall_s")}  # noqa: E731
                        for r in rs]
    for seed in (0, 1):
        old = [r for r in before if (r.get("method"), r.get("seed")) == ("tpe", seed)]
        new = [r for r in after if (r.get("method"), r.get("seed")) == ("tpe", seed)]
        assert [r["kind"] for r in new] == ["run_start"] + ["trial"] * 3 + ["run_end"]
        if seed == 0:
            assert new[:-1] == old[:-1]
        assert strip(new) == strip(old)  # seeded: the rerun draws what the first run drew


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


GRADIENT = textwrap.dedent("""
    task = "cancer_logreg"
    steps = 40
    seeds = [0, 1]
    [budget]
    trials = 1
    [[methods]]
    label = "oho"
    kind = "oho"
    settings = {eval_every = 10}
""")
# the child SIGKILLs itself inside (oho, seed 0) while saving the checkpoint of step 20, after
# that step's record went to metrics.jsonl: the newest checkpoint is step 10's
_DIE_IN_CHECKPOINT = """
import json, os, signal, sys
from hyperdescent.cli import main
from hyperdescent.experiment import run_checkpoint
real = run_checkpoint.DirCheckpoint.save
def dying(self, write):
    def write_then_die(directory):
        write(directory)
        if json.loads((directory / run_checkpoint.RUNNER_FILE).read_text())["step"] == 20:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(self, write_then_die)
run_checkpoint.DirCheckpoint.save = dying
sys.exit(main(["compare", sys.argv[1], "--out", sys.argv[2], "--no-progress"]))
"""


def test_a_killed_gradient_run_continues_from_its_checkpoint(tmp_path):
    from hyperdescent.experiment.run_checkpoint import run_checkpoint_dir
    cfg, out = _killed_compare(tmp_path, GRADIENT, _DIE_IN_CHECKPOINT)
    before = read_records(out / "metrics.jsonl")
    assert [r["step"] for r in before if r.get("kind") == "oho_step"] == [0, 10, 20]
    assert run_checkpoint_dir(out, 0, "oho", 0).is_dir()

    assert main(["compare", str(cfg), "--resume", str(out), "--no-progress"]) == 0
    after = read_records(out / "metrics.jsonl")
    assert after[:3] == before[:3]  # run_start and the records of steps 0 and 10 are kept
    assert not (out / "checkpoints" / "0-oho-seed0").exists()  # removed once finished
    assert main(["compare", str(cfg), "--out", str(tmp_path / "whole"), "--no-progress"]) == 0
    whole = read_records(tmp_path / "whole" / "metrics.jsonl")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("elapsed_s", "time")}  # noqa: E731
                        for r in rs if "method" in r]
    # step 20's record is written once, from the resumed run, and everything equals the
    # uninterrupted run's records (the tuner resumes bit for bit; steps charged once)
    assert strip(after) == strip(whole)
    ends = [r for r in after if r.get("kind") == "run_end"]
    assert [r["inner_steps"] for r in ends] == [40, 40]
