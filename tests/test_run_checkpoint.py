"""A gradient compare run that dies resumes from its last checkpoint, not from step 0.

The run is killed (an exception out of its log) right after the record of step 20 and run again
with the same DirCheckpoint: it must start from the checkpoint of step 10 (the last one saved),
log each record once across both attempts (inner steps charged once) and end bit-identical to
an uninterrupted run.
"""

import math

import pytest

from hyperdescent import tasks
from hyperdescent.errors import InputTypeError
from hyperdescent.experiment import validate_config
from hyperdescent.experiment.run_checkpoint import DirCheckpoint, read_runner
from hyperdescent.experiment.runners import resumable, run_gradient

CFG = {"name": "ckpt", "task": "cancer_logreg", "seeds": [0], "steps": 30, "budget": {"trials": 2},
       "methods": [{"label": "OHO", "kind": "oho", "settings": {"eval_every": 10}},
                   {"label": "random", "kind": "random"}]}


class Died(Exception):
    pass


def _run(log, checkpoint=None):
    cfg = validate_config(CFG)
    return run_gradient(tasks.get(cfg.task), cfg, cfg.methods[0], 0, log, checkpoint)


def _strip(rec):
    return {k: v for k, v in rec.items() if k not in ("elapsed_s", "time")}


def test_a_killed_gradient_run_resumes_from_its_checkpoint(tmp_path):
    want = []
    _run(want.append)
    ck = DirCheckpoint(tmp_path / "ck")
    assert ck.latest() is None
    got = []

    def dies_after_step_20(rec):
        got.append(rec)
        if rec["kind"] == "oho_step" and rec["step"] == 20:
            raise Died

    with pytest.raises(Died):
        _run(dies_after_step_20, ck)
    # the checkpoint of step 10 is the last one written: the log raised before step 20's save
    assert read_runner(ck.latest())["step"] == 10
    n_first = len(got)
    second = []
    _run(second.append, ck)
    # resumed at step 10: the second attempt starts with step 20's record again, no run_start
    assert second[0]["kind"] == "oho_step" and second[0]["step"] == 20
    assert all(r["kind"] != "run_start" for r in second)
    records = got[:n_first - 1] + second  # step 20's record of the dead attempt: dropped
    assert [_strip(r) for r in records] == [_strip(r) for r in want]
    end, want_end = records[-1], want[-1]
    assert end["final_hparams"] == want_end["final_hparams"]
    assert end["final_val_loss"] == want_end["final_val_loss"]
    assert end["inner_steps"] == want_end["inner_steps"] == 30
    assert math.isfinite(end["elapsed_s"]) and end["elapsed_s"] > 0
    # the hyperparameters moved, so the equality above means something
    first = next(r for r in want if r["kind"] == "oho_step")
    assert first["hparams"] != want_end["final_hparams"]


def test_only_the_gradient_kinds_resume():
    cfg = validate_config(CFG)
    assert resumable(cfg.methods[0]) and not resumable(cfg.methods[1])
    with pytest.raises(InputTypeError, match="checkpoint"):
        DirCheckpoint(3)


def test_dir_checkpoint_replaces_atomically_and_survives_a_death_between_renames(tmp_path):
    from hyperdescent.experiment.run_checkpoint import RUNNER_FILE, TUNER_FILE, write_runner

    def writer(step):
        def write(d):
            (d / TUNER_FILE).write_bytes(b"t%d" % step)
            write_runner(d, {"step": step})
        return write

    ck = DirCheckpoint(tmp_path / "ck")
    ck.save(writer(1))
    ck.save(writer(2))
    assert read_runner(ck.latest())["step"] == 2
    assert (ck.latest() / TUNER_FILE).read_bytes() == b"t2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no leftovers

    def dies(d):
        (d / TUNER_FILE).write_bytes(b"torn")
        raise OSError("disk full")

    with pytest.raises(OSError):
        ck.save(dies)  # a save that fails half-way leaves the previous checkpoint in place
    assert read_runner(ck.latest())["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    # a process killed after moving the old checkpoint aside, before renaming the new one in
    (tmp_path / "ck").rename(tmp_path / "ck.old")
    assert read_runner(ck.latest())["step"] == 2
    assert (ck.latest() / RUNNER_FILE).is_file()
