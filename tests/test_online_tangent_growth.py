"""OnlineTuner's `tangent_growth`: the forward tangent is reset once its norm outgrows what a
stable inner step can carry (more than tangent_growth x k x its norm after the window's first
step, k steps into the window)."""

import pytest
import torch
from helpers import data, mlp

import hyperdescent as hd
from hyperdescent.errors import HyperparameterError


def make_problem():
    x, y = data(n=64)
    space = hd.Space({"lr": hd.Real(0.05, low=1e-4, high=1.0, log=True),
                      "weight_decay": hd.Real(1e-3, low=1e-6, high=0.1, log=True)})
    return hd.Problem(mlp(), loss=torch.nn.functional.cross_entropy,
                      optimizer=hd.optim.SGD(momentum=0.9), space=space, train=(x, y),
                      val=(x[:24] + 0.1, y[:24]), test=(x[24:], y[24:]), batch_size=16, seed=1)


def _run(steps, **kw):
    # meta_lr 0 and no backtracking: every tuner walks the same weights, so their tangents can
    # be compared
    kw = {"backtrack": (), **kw}
    tuner = hd.OnlineTuner(make_problem(), meta_optimizer="sgd", meta_lr=0.0, **kw)
    tuner.run(steps)
    return tuner


def test_the_tangent_is_reset_after_a_step_where_it_outgrew_the_rule():
    growth, steps = 1.1, 30
    tuner = _run(steps, tangent_growth=growth, reset_every=None)
    one_step = [r["tangent_norm"] for r in _run(steps, method="greedy").history]
    hist = tuner.history
    start, first, resets = 0, None, 0
    for t, rec in enumerate(hist):
        k, norm = t + 1 - start, rec["tangent_norm"]
        if first is None:
            first = norm
            assert "tangent_reset" not in rec
            continue
        blown = norm > growth * k * first
        assert rec.get("tangent_reset") == (k if blown else None), t
        if blown:
            resets += 1
            if t + 1 < steps:  # the next step starts a fresh tangent: greedy's one-step one
                assert hist[t + 1]["tangent_norm"] == pytest.approx(one_step[t + 1], rel=1e-10)
            start, first = t + 1, None
    assert resets >= 2


def test_without_growth_resets_the_tangent_follows_reset_every_alone():
    a = [r["tangent_norm"] for r in _run(12, tangent_growth=None, reset_every=5).history]
    b = [r["tangent_norm"] for r in _run(12, tangent_growth=1e9, reset_every=5).history]
    assert a == b
    assert not any("tangent_reset" in r for r in _run(12, tangent_growth=None).history)


def test_periodic_resets_count_from_the_last_growth_reset():
    tuner = _run(30, tangent_growth=1.1, reset_every=4)
    one_step = [r["tangent_norm"] for r in _run(30, method="greedy").history]
    start = 0
    for t, rec in enumerate(tuner.history):
        if (t - start) % 4 == 0:
            start = t
            assert rec["tangent_norm"] == pytest.approx(one_step[t], rel=1e-10), t
        if "tangent_reset" in rec:
            start = t + 1


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), True, "10"])
def test_tangent_growth_must_be_a_positive_finite_number_or_none(bad):
    with pytest.raises(HyperparameterError, match="tangent_growth"):
        hd.OnlineTuner(make_problem(), tangent_growth=bad)


def test_a_resumed_run_resets_where_an_uninterrupted_one_does(tmp_path):
    straight = _run(24, tangent_growth=1.1)
    first = hd.OnlineTuner(make_problem(), meta_optimizer="sgd", meta_lr=0.0, tangent_growth=1.1,
                           backtrack=())
    first.run(11)
    first.save(tmp_path / "t.pt")
    resumed = hd.OnlineTuner.load(tmp_path / "t.pt", make_problem()).run(24)
    assert [r.get("tangent_reset") for r in resumed.history] == \
        [r.get("tangent_reset") for r in straight.history]
    assert [r["tangent_norm"] for r in resumed.history] == \
        [r["tangent_norm"] for r in straight.history]


def test_a_record_saved_before_windows_resets_on_multiples_of_reset_every():
    tuner = _run(13, reset_every=5)
    snap = tuner._snapshot()
    del snap["window"]
    tuner._restore_snapshot(snap)
    assert tuner._window == {"start": 10, "first": None, "blown": False}


def test_a_growth_reset_halves_the_learning_rate_as_a_rollback_would():
    tuner = _run(30, tangent_growth=1.1, backtrack=("lr",))
    hist = tuner.history
    blown = [t for t, r in enumerate(hist) if "tangent_reset" in r]
    assert blown
    for t in range(1, len(hist)):
        ratio = hist[t]["hparams"]["lr"] / hist[t - 1]["hparams"]["lr"]
        # meta_lr 0: the learning rate moves only by the halving after a blown step
        assert ratio == pytest.approx(0.5 if t - 1 in blown else 1.0, rel=1e-6), t
    assert hist[0]["hparams"]["weight_decay"] == hist[-1]["hparams"]["weight_decay"]
