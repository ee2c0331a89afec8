"""The divergence guard's validation veto: a training loss that climbs back while the tuner's
validation loss falls (weight decay raised on a net that had fitted its training set) is not
rolled back for by the trend rules; a spike still is, and so is a climb that the validation
loss does not pay for."""

import math

import pytest
import torch
from helpers import data, mlp

import hyperdescent as hd
from hyperdescent.tuners.guard import DivergenceGuard, ema_sd, noise_sd

# the training loss falls from 2.3 to 0.01 in 40 steps, then climbs 0.01 a step: no spike,
# only the trend rules see it (at step 71, the loss at 0.32: measured)
FALL = [2.3 * (0.01 / 2.3) ** (t / 39) for t in range(40)]
CLIMB = [0.01 + 0.01 * k for k in range(1, 61)]


def first_alarm(train, val=None, guard=None):
    """The 1-based step of the first alarm on `train` (None if none) and its reason; `val[t]`,
    when given, is observed before step t's training loss, as the tuner's meta-step does."""
    g = guard or DivergenceGuard()
    for t, loss in enumerate(train, 1):
        if val is not None:
            g.observe_val(val[t - 1])
        if g.diverged(t, loss):
            return t, g.reason
    return None, None


def falling_from(v0, drop):
    """A validation loss flat at v0 while the training loss falls, then falling linearly by
    the fraction `drop` over the climb."""
    return [v0] * len(FALL) + [v0 * (1 - drop * k / len(CLIMB)) for k in range(1, len(CLIMB) + 1)]


def test_without_validation_losses_the_climb_is_a_trend_alarm():
    assert first_alarm(FALL + CLIMB) == (71, "running training loss climbing back")


def test_a_flat_or_rising_validation_loss_does_not_veto():
    """Validation losses that do not fall leave the alarm where it was without them."""
    plain, _ = first_alarm(FALL + CLIMB)
    assert first_alarm(FALL + CLIMB, [1.0] * 100)[0] == plain
    rising = [1.0] * len(FALL) + [1.0 + 0.01 * k for k in range(1, 61)]
    assert first_alarm(FALL + CLIMB, rising)[0] == plain


def test_a_validation_loss_halving_over_the_climb_vetoes_the_trend_rules():
    assert first_alarm(FALL + CLIMB, falling_from(1.0, 0.5)) == (None, None)
    assert first_alarm(FALL + CLIMB, falling_from(3.0, 0.5)) == (None, None)  # any scale


def test_the_veto_needs_a_fall_of_more_than_a_tenth():
    """By step 71 a fall of 5% or 20% over the climb has taken the validation average less
    than a tenth below its value at the training loss's best (the average lags, and the best
    was set a few steps into the climb, as the training average lags too): the alarm goes off
    as without validation losses. A fall of 50% vetoes it (above)."""
    assert first_alarm(FALL + CLIMB, falling_from(1.0, 0.05))[0] == 71
    assert first_alarm(FALL + CLIMB, falling_from(1.0, 0.2))[0] == 71


def test_the_veto_is_judged_beyond_the_validation_noise():
    """The vetoing 50% fall with validation noise of +-0.2 around it: the average's upper
    bound (z = 4 noise sds of the average) stays above 0.9 of its value at the best, so the
    alarm goes off as without validation losses; with +-0.05 it is still vetoed."""
    def noisy(amp):
        base = falling_from(1.0, 0.5)
        return [v + (amp if t % 2 else -amp) for t, v in enumerate(base)]
    assert first_alarm(FALL + CLIMB, noisy(0.2))[0] == 71
    assert first_alarm(FALL + CLIMB, noisy(0.05)) == (None, None)


def test_validation_improved_is_the_upper_bound_of_the_average_against_the_margin():
    g = DivergenceGuard(noise_tolerance=2.0)
    vals = [1.0, 0.9, 1.0, 0.9, 1.0, 0.9]
    for v in vals:
        g.observe_val(v)
    smooth = 1.0
    for v in vals[1:]:
        smooth = 0.9 * smooth + 0.1 * v
    assert g.val_smooth == pytest.approx(smooth, rel=1e-12)
    assert g.val_count == 6 and list(g.val_diffs) == pytest.approx([-0.1, 0.1] * 2 + [-0.1])
    upper = smooth + 2.0 * noise_sd(list(g.val_diffs)) * ema_sd(6)
    for at_best in (upper / 0.9 - 1e-9, upper / 0.9 + 1e-9):
        g.val_at_best = at_best
        assert g._validation_improved() == (upper < 0.9 * at_best)
    g.val_at_best = None
    assert not g._validation_improved()
    # "more than a tenth": exactly a tenth below is not enough (no noise after one loss)
    one = DivergenceGuard()
    one.observe_val(0.9)
    one.val_at_best = 1.0
    assert not one._validation_improved()
    one.val_at_best = 1.0 + 1e-12
    assert one._validation_improved()


def test_the_reference_is_set_only_when_the_training_loss_sets_its_best():
    """Validation losses alone leave it unset (no veto); the first healthy training loss sets
    its best, and with it the reference, to the validation average of that moment."""
    g = DivergenceGuard()
    g.observe_val(2.0)
    g.observe_val(1.0)
    assert g.val_at_best is None and not g._validation_improved()
    assert not g.diverged(1, 1.0)  # the first loss starts the statistics, no best update
    assert g.val_at_best is None
    assert not g.diverged(2, 0.5)
    assert g.val_at_best == g.val_smooth == pytest.approx(0.9 * 2.0 + 0.1 * 1.0)


def test_a_non_finite_validation_loss_is_left_out():
    g = DivergenceGuard()
    g.observe_val(1.0)
    g.observe_val(math.nan)
    g.observe_val(math.inf)
    assert g.val_smooth == 1.0 and g.val_count == 1 and list(g.val_diffs) == []


def test_spikes_are_not_vetoed():
    """Three losses of 4x the running average in a row roll back whatever the validation
    loss does."""
    falling = [1.0, 0.6, 0.3] + [0.2] * 12
    train = falling + [1.5] * 3 + [0.2] * 3
    step, why = first_alarm(train, [1.0] * 3 + [0.5] * 18)
    assert step == 18 and why.startswith("training loss spike")


def test_the_validation_statistics_go_with_snapshots_and_records():
    g = DivergenceGuard()
    for t, (loss, v) in enumerate(zip(FALL, falling_from(1.0, 0.5)), 1):
        g.observe_val(v)
        assert not g.diverged(t, loss)
    g.snapshot({"step": 1})
    saved = (g.val_smooth, g.val_at_best, g.val_last, g.val_count, list(g.val_diffs))
    for v in (0.1, 0.2, 0.3):
        g.observe_val(v)
    assert g.val_count == saved[3] + 3
    g.rollback()
    assert (g.val_smooth, g.val_at_best, g.val_last, g.val_count, list(g.val_diffs)) == saved
    back = DivergenceGuard()
    back.load_state_dict(g.state_dict())
    assert (back.val_smooth, back.val_at_best, back.val_count) == saved[:2] + saved[3:4]
    assert list(back.val_diffs) == saved[4]
    # a record from before the guard watched validation losses loads with none
    old = DivergenceGuard()
    old.load_state_dict({"rollbacks": 0, "smooth": [1.0, 1.2, 0.9], "snapshots": []})
    assert old.val_smooth is None and old.val_at_best is None and old.val_count == 0
    assert not old._validation_improved()


@pytest.mark.parametrize("tune_on", ["val", "train"])
def test_the_online_tuner_hands_its_validation_losses_to_the_guard(tune_on):
    """Every meta-step's validation loss with tune_on="val"; none when it tunes on training
    batches, whose loss is the one the guard already watches."""
    x, y = data(n=64)
    space = hd.Space({"lr": hd.Real(0.05, low=1e-4, high=1.0, log=True)})
    p = hd.Problem(mlp(), optimizer=hd.optim.SGD(), space=space, train=(x, y),
                   val=(x[:24], y[:24]), batch_size=16, seed=0)
    tuner = hd.OnlineTuner(p, tune_on=tune_on, hyper_every=2)
    tuner.run(10)
    if tune_on == "val":
        vals = [r["val_loss"] for r in tuner.history if "val_loss" in r]
        assert tuner.guard.val_count == len(vals) == 5
        assert tuner.guard.val_last == vals[-1]
        smooth = vals[0]
        for v in vals[1:]:
            smooth = 0.9 * smooth + 0.1 * v
        assert tuner.guard.val_smooth == pytest.approx(smooth, rel=1e-12)
    else:
        assert tuner.guard.val_count == 0 and tuner.guard.val_smooth is None
    assert torch.isfinite(torch.as_tensor(tuner.hparams["lr"]))
