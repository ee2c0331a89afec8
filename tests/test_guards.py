"""The online tuner's stability guards, driven through the public loop (`step()` / `run()`).

Each test controls the training loss the guard sees (a loss function that spikes at a chosen
step, or returns a chosen sequence of values) and would fail if its rule were unhooked from
`step()`: spikes, the first-loss rule, slow trends, the give-back rule, learning-rate
backtracking, the snapshot a rollback lands on, `max_rollbacks` exhaustion both ways,
hypergradient clipping, projection to the bounds, `reset_every` and greedy's per-step reset.
"""

import math

import pytest
import torch
from helpers import data, mlp

import hyperdescent as hd

LR0, WD0 = 0.05, 1e-3


def space():
    return hd.Space({"lr": hd.Real(LR0, low=1e-4, high=1.0, log=True),
                     "weight_decay": hd.Real(WD0, low=1e-6, high=0.1, log=True)})


def make_problem(loss, sp=None):
    x, y = data(n=64)
    return hd.Problem(mlp(), loss=loss, optimizer=hd.optim.SGD(momentum=0.9),
                      space=sp or space(), train=(x, y), val=(x[:24] + 0.1, y[:24]),
                      batch_size=16, seed=1)


class Spiking:
    """cross_entropy, times `factor` on the training loss of the steps in `at` (once each).

    The training loss is told from the validation loss by the module's mode (the validation
    loss is evaluated in eval mode)."""

    def __init__(self, at=(), factor=50.0, value=None):
        self.at, self.factor, self.value = set(at), factor, value
        self.t, self.model = 0, None

    def __call__(self, out, y):
        loss = torch.nn.functional.cross_entropy(out, y)
        if not self.model.training:
            return loss
        if self.value is not None:  # a scripted training loss (zero gradient)
            return loss * 0 + self.value[self.t]
        if self.t in self.at:
            return loss * self.factor
        return loss


def tuner_with(loss: Spiking, **kw):
    p = make_problem(loss)
    loss.model = p.model
    return hd.OnlineTuner(p, **kw)


def drive(tuner, loss, steps, stop_at_event=False):
    """Call `step()` until `tuner.t == steps`, telling the loss function the step index;
    a spike fires only the first time its step is reached."""
    records = []
    while tuner.t < steps:
        loss.t = tuner.t
        rec = tuner.step()
        records.append(rec)
        if rec.get("event") in ("rollback", "guard_exhausted"):
            loss.at.discard(rec["step"])
            if stop_at_event:
                break
    return records


# -- spikes and rollbacks -----------------------------------------------------------------
def test_a_finite_50x_spike_rolls_back_to_the_older_snapshot():
    loss = Spiking(at={10})
    tuner = tuner_with(loss, meta_lr=0.1, snapshot_every=4)
    saved = {}

    def run_to(n):
        while tuner.t < n:
            loss.t = tuner.t
            tuner.step()
            if tuner.t == 4 and not tuner.events:
                saved["params"] = {k: v.clone() for k, v in tuner.state.params.items()}
                saved["hparams"] = {k: v.clone() for k, v in tuner.hparams.items()}

    run_to(10)
    before = [dict(r) for r in tuner.history]
    loss.t = tuner.t
    rec = tuner.step()  # step 10: the train loss is 50x
    assert rec["event"] == "rollback" and rec["step"] == 10
    assert rec["train_loss"] > 10 * before[-1]["train_loss"]
    assert tuner.rollbacks == 1
    # snapshots were taken after 4 and 8 healthy steps: the rollback lands on the older one
    assert rec["to_step"] == 4 and tuner.t == 4
    assert len(tuner.history) == 4
    assert [r["train_loss"] for r in tuner.history] == [r["train_loss"] for r in before[:4]]
    for k, v in saved["params"].items():
        assert torch.equal(tuner.state.params[k], v), k
    # the meta learning rate is halved, and so is the learning rate (backtracking); weight
    # decay, not in `backtrack`, comes back as it was
    assert tuner.meta_lr == pytest.approx(0.05) and rec["meta_lr"] == pytest.approx(0.05)
    assert tuner.hparams["lr"].item() == pytest.approx(0.5 * saved["hparams"]["lr"].item(),
                                                       rel=1e-12)
    assert tuner.hparams["weight_decay"].item() == pytest.approx(
        saved["hparams"]["weight_decay"].item(), rel=1e-12)
    loss.at.clear()
    run_to(12)
    assert [r["step"] for r in tuner.history] == list(range(12))
    assert tuner.history[4]["hparams"]["lr"] == pytest.approx(
        0.5 * saved["hparams"]["lr"].item(), rel=1e-12)


def test_without_backtrack_the_learning_rate_comes_back_unhalved():
    loss = Spiking(at={10})
    tuner = tuner_with(loss, meta_lr=0.1, snapshot_every=4, backtrack=())
    recs = drive(tuner, loss, 11, stop_at_event=True)
    assert recs[-1]["event"] == "rollback" and recs[-1]["to_step"] == 4
    # the record of step 4 holds the lr step 4 used, which the snapshot after step 3 kept
    assert tuner.hparams["lr"].item() == pytest.approx(recs[4]["hparams"]["lr"], rel=1e-12)


def test_no_spike_no_rollback_on_the_same_run():
    loss = Spiking(at=())
    tuner = tuner_with(loss, meta_lr=0.1, snapshot_every=4)
    drive(tuner, loss, 14)
    assert tuner.rollbacks == 0 and not tuner.events


def test_max_rollbacks_exhausted_on_a_finite_loss_logs_once_and_runs_on():
    loss = Spiking(at={7, 9, 11})
    tuner = tuner_with(loss, meta_lr=0.1, snapshot_every=2, max_rollbacks=1)
    drive(tuner, loss, 14)
    kinds = [e["event"] for e in tuner.events]
    assert kinds == ["rollback", "guard_exhausted"]
    assert tuner.rollbacks == 1
    exhausted = tuner.events[1]
    # past the limit the spiked step is kept: its record is in the history, the run goes on
    rec = next(r for r in tuner.history if r["step"] == exhausted["step"])
    assert rec["train_loss"] == exhausted["train_loss"]
    assert "wall_time" in rec
    assert [r["step"] for r in tuner.history] == list(range(14))


def test_max_rollbacks_counts_every_rollback():
    """max_rollbacks=2: two rollbacks, then the guard stands aside at the third spike."""
    loss = Spiking(at={7, 9, 11})
    tuner = tuner_with(loss, meta_lr=0.1, snapshot_every=2, max_rollbacks=2)
    drive(tuner, loss, 14)
    assert [e["event"] for e in tuner.events] == ["rollback", "rollback", "guard_exhausted"]
    assert tuner.rollbacks == 2
    # each rollback halves the meta learning rate again
    assert [e["meta_lr"] for e in tuner.events[:2]] == pytest.approx([0.05, 0.025])


def test_max_rollbacks_exhausted_on_a_non_finite_loss_raises():
    loss = Spiking(at={6}, factor=math.nan)
    tuner = tuner_with(loss, meta_lr=0.1, snapshot_every=2, max_rollbacks=0)
    with pytest.raises(FloatingPointError, match="diverged"):
        drive(tuner, loss, 8)


def test_a_non_finite_loss_within_the_limit_rolls_back():
    loss = Spiking(at={6}, factor=math.inf)
    tuner = tuner_with(loss, meta_lr=0.1, snapshot_every=2, max_rollbacks=3)
    drive(tuner, loss, 8)
    assert [e["event"] for e in tuner.events] == ["rollback"]
    assert all(math.isfinite(r["train_loss"]) for r in tuner.history)


# -- the rules, each alone ----------------------------------------------------------------
def first_alarm(values, steps=None, **kw):
    """Drive a tuner whose training loss is the scripted `values` (step t sees values[t]);
    returns (step of the first rollback or None, the tuner)."""
    loss = Spiking(value=values)
    tuner = tuner_with(loss, meta_lr=0.1, snapshot_every=1000, **kw)
    recs = drive(tuner, loss, steps or len(values), stop_at_event=True)
    alarms = [r["step"] for r in recs if r.get("event") == "rollback"]
    return (alarms[0] if alarms else None), tuner


def test_first_loss_rule_catches_a_loss_three_times_the_first():
    """A loss that rose steadily (so 3x the running average is out of reach) and then stays
    above 3x the first loss: only the first-loss rule sees it, at its third step up there
    (a lone loss that high, 8 noise sds above the average, could be heavy-tailed noise)."""
    rising = [1.0, 1.35, 1.7, 2.05, 2.4, 2.75, 2.8, 2.85, 2.9, 2.9]
    step, _ = first_alarm(rising + [3.2] * 3 + [2.9] * 5)
    assert step == 12
    assert first_alarm(rising + [3.2, 3.2, 2.9] + [2.9] * 5)[0] is None
    assert first_alarm(rising + [2.95] * 3 + [2.9] * 5)[0] is None


def test_spike_rule_catches_a_jump_over_three_times_the_running_average():
    """Falling loss, then a jump to ~4x the running average (below 3x the first loss) that
    lasts three steps; a lone jump as high is held out of the statistics and passes."""
    falling = [1.0, 0.6, 0.3] + [0.2] * 12  # running average ~0.4 after 15 steps
    step, tuner = first_alarm(falling + [1.5] * 3 + [0.2] * 3)
    assert step == 17
    assert tuner.events[0]["why"] == "training loss spike, 3 steps in a row"
    assert first_alarm(falling + [1.5] + [0.2] * 3)[0] is None
    # the same jump with spike_factor 5: not a spike (below 5x the average, below 3x first)
    assert first_alarm(falling + [1.5] * 3 + [0.2] * 3, spike_factor=5.0)[0] is None


def test_a_lone_loss_beyond_any_noise_rolls_back_at_once():
    """The jump of the test above, 50x instead of 4x the average: no waiting."""
    falling = [1.0, 0.6, 0.3] + [0.2] * 12
    step, tuner = first_alarm(falling + [20.0] + [0.2] * 3)
    assert step == 15 and tuner.events[0]["why"] == "training loss spike"


def test_spike_rule_waits_for_five_steps():
    assert first_alarm([1.0, 0.5, 2.9, 0.5, 0.5, 0.5, 0.5])[0] is None


@pytest.mark.parametrize("scale", [1.0, 20.0])
def test_slow_trend_is_caught_without_any_spike(scale):
    """1.0 -> 0.5 over 30 steps, then creeping up 1% a step: no single spike; the running
    average passes its best by more than trend_factor-1 of it (the give-back rule is off).
    The rules are relative: the same losses times 20 raise the alarm at the same step."""
    down = [scale * (1.0 - 0.5 * t / 30) for t in range(31)]
    up = [scale * (0.5 + 0.01 * t) for t in range(1, 40)]
    step, _ = first_alarm(down + up, giveback=math.inf)
    assert step == 67  # measured at scale 1
    assert first_alarm(down + up, giveback=math.inf, trend_factor=math.inf)[0] is None


@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_give_back_rule_catches_a_stall_back_at_chance(scale):
    """2.3 -> 1.9 -> 2.3 (dead ReLUs): under trend_factor's 20% of the best, but it gives back
    more than `giveback` of the progress made (plus a floor of 5% of the first loss); the same
    at a tenth of the scale."""
    losses = ([2.3 - 0.4 * t / 30 for t in range(31)] +
              [1.9 + 0.4 * t / 30 for t in range(1, 31)] + [2.3] * 10)
    step, _ = first_alarm([scale * v for v in losses])
    assert step is not None and 31 < step
    assert losses[step] > 1.9 + 0.3 * 0.4 + 0.05 * 2.3
    assert step == first_alarm(losses)[0]
    assert first_alarm([scale * v for v in losses], giveback=math.inf)[0] is None


# -- meta-step safeguards -------------------------------------------------------------------
def _raw(hparams):
    return torch.stack([hparams["lr"].log(), hparams["weight_decay"].log()])


def test_clipping_bounds_the_raw_meta_step():
    """SGD meta-optimizer: the raw step is meta_lr * clip in norm once the hypergradient's
    norm exceeds `clip`, and meta_lr * the norm without clipping."""
    for clip in (1e-4, None):
        loss = Spiking()
        tuner = tuner_with(loss, meta_optimizer="sgd", meta_lr=1e-3, clip=clip)
        before = _raw(tuner.hparams)
        rec = drive(tuner, loss, 1)[0]
        assert rec["hypergrad_norm"] > 1e-3
        step = (_raw(tuner.hparams) - before).norm().item()
        expected = 1e-3 * (clip if clip is not None else rec["hypergrad_norm"])
        assert step == pytest.approx(expected, rel=1e-9)


def test_meta_steps_are_projected_onto_the_bounds():
    """A sign meta-step of 5 in log space from lr 0.01 with bounds [1e-3, 0.1] overshoots
    either way; the projection puts it on a bound."""
    sp = hd.Space({"lr": hd.Real(0.01, low=1e-3, high=0.1, log=True),
                   "weight_decay": hd.Real(1e-3, low=1e-4, high=1e-2, log=True)})
    loss = Spiking()
    p = make_problem(loss, sp)
    loss.model = p.model
    tuner = hd.OnlineTuner(p, meta_optimizer="sign", meta_lr=5.0)
    drive(tuner, loss, 1)
    lr, wd = tuner.hparams["lr"].item(), tuner.hparams["weight_decay"].item()
    assert lr == pytest.approx(1e-3, rel=1e-9) or lr == pytest.approx(0.1, rel=1e-9)
    assert wd == pytest.approx(1e-4, rel=1e-9) or wd == pytest.approx(1e-2, rel=1e-9)
    # natural values are clamped anyway; the projection keeps the raw coordinates on the
    # bound, so that a step back leaves the bound at once (unprojected: log(0.01) +- 5)
    for name, value in (("lr", lr), ("weight_decay", wd)):
        assert tuner.raw[name].item() == pytest.approx(math.log(value), abs=1e-12), name
    # and the next step's record uses the projected value
    rec = drive(tuner, loss, 2)[0]
    assert 1e-3 <= rec["hparams"]["lr"] <= 0.1


def _tangent_norms(steps, **kw):
    loss = Spiking()
    tuner = tuner_with(loss, meta_optimizer="sgd", meta_lr=0.0, **kw)
    drive(tuner, loss, steps)
    return [r["tangent_norm"] for r in tuner.history]


def test_reset_every_restarts_the_tangent():
    """meta_lr 0, so every tuner sees the same trajectory: with reset_every=3 the tangent
    after steps 0, 3, 6 is the one-step tangent (greedy's), in between it is not."""
    greedy = _tangent_norms(8, method="greedy")
    reset3 = _tangent_norms(8, reset_every=3)
    never = _tangent_norms(8, reset_every=None)
    for t in range(8):
        if t % 3 == 0:
            assert reset3[t] == pytest.approx(greedy[t], rel=1e-12), t
        else:
            assert abs(reset3[t] - greedy[t]) > 1e-6 * greedy[t], t
    assert reset3[1:3] == pytest.approx(never[1:3], rel=1e-12)  # no reset yet
    assert all(abs(never[t] - reset3[t]) > 1e-6 * reset3[t] for t in (3, 4, 6))


def test_greedy_resets_the_tangent_every_step():
    greedy = _tangent_norms(5, method="greedy", reset_every=None)
    one = _tangent_norms(5, reset_every=1)
    never = _tangent_norms(5, reset_every=None)
    assert greedy == pytest.approx(one, rel=1e-12)
    assert all(abs(g - n) > 1e-6 * g for g, n in zip(greedy[1:], never[1:]))


def test_a_non_finite_validation_loss_skips_the_meta_step_of_that_step():
    """An inf in the validation data: the inner step is kept, the meta-step is skipped and
    logged at the step it belongs to, the hyperparameters stay."""
    x, y = data(n=64)
    xv = x[:24].clone()
    xv[0, 0] = math.inf
    loss = Spiking()
    p = hd.Problem(mlp(), loss=loss, optimizer=hd.optim.SGD(momentum=0.9), space=space(),
                   train=(x, y), val=(xv, y[:24]), batch_size=16, seed=1)
    loss.model = p.model
    tuner = hd.OnlineTuner(p, meta_lr=0.1)
    before = tuner.hparams
    recs = drive(tuner, loss, 3)
    assert [e["event"] for e in tuner.events] == ["skipped_meta_step"] * 3
    assert [e["step"] for e in tuner.events] == [r["step"] for r in recs] == [0, 1, 2]
    assert all(r.get("event") == "skipped_meta_step" for r in recs)
    assert all(math.isfinite(r["train_loss"]) for r in recs)
    assert {k: float(v) for k, v in tuner.hparams.items()} == {
        k: float(v) for k, v in before.items()}


def test_a_loaded_tuner_keeps_its_guard_settings(tmp_path):
    """max_rollbacks=0 survives save/load: a NaN after loading raises instead of rolling
    back (the default would allow 20 rollbacks)."""
    loss = Spiking(at={8}, factor=math.nan)
    tuner = tuner_with(loss, meta_lr=0.1, snapshot_every=2, max_rollbacks=0)
    drive(tuner, loss, 4)
    tuner.save(tmp_path / "t.pt")
    p = make_problem(loss)
    loss.model = p.model
    loaded = hd.OnlineTuner.load(tmp_path / "t.pt", p)
    assert loaded.t == 4
    with pytest.raises(FloatingPointError):
        drive(loaded, loss, 10)


@pytest.mark.parametrize("method", ["greedy", "truncated"])
def test_rollback_restores_every_method_and_the_run_goes_on(method):
    """A spike rolls back greedy and truncated tuners too (truncated restores its window of
    past states), and the run continues with finite hypergradients."""
    loss = Spiking(at={10})
    tuner = tuner_with(loss, method=method, window=3, meta_lr=0.1, snapshot_every=4)
    drive(tuner, loss, 14)
    assert [e["event"] for e in tuner.events] == ["rollback"]
    assert tuner.events[0]["to_step"] == 4
    assert [r["step"] for r in tuner.history] == list(range(14))
    assert all(math.isfinite(r["hypergrad_norm"]) and r["hypergrad_norm"] > 0
               for r in tuner.history[4:])


def test_backtracking_halves_a_per_layer_learning_rate_layer_by_layer():
    sp = hd.Space({"lr": hd.Real(LR0, low=1e-4, high=1.0, log=True, per="layer"),
                   "weight_decay": hd.Real(WD0, low=1e-6, high=0.1, log=True)})
    loss = Spiking(at={10})
    p = make_problem(loss, sp)
    loss.model = p.model
    tuner = hd.OnlineTuner(p, meta_lr=0.1, snapshot_every=4)
    recs = drive(tuner, loss, 11, stop_at_event=True)
    assert recs[-1]["event"] == "rollback" and recs[-1]["to_step"] == 4
    at_snapshot = recs[4]["hparams"]["lr"]  # what step 4 used: the snapshot's values
    assert len(set(at_snapshot.values())) > 1  # the layers moved apart
    for name, v in tuner.hparams["lr"].items():
        assert v.item() == pytest.approx(0.5 * at_snapshot[name], rel=1e-12), name


def test_after_a_rollback_the_meta_step_is_taken_at_the_halved_meta_lr():
    """SGD meta-optimizer, no clip: the first meta-step after a rollback moves raw λ by
    -(meta_lr / 2) · dE/draw, with dE/dλ from that step's record."""
    loss = Spiking(at={10})
    tuner = tuner_with(loss, meta_optimizer="sgd", meta_lr=0.1, clip=None, snapshot_every=4)
    drive(tuner, loss, 11, stop_at_event=True)
    assert tuner.events[-1]["event"] == "rollback" and tuner.t == 4
    before = {k: float(v) for k, v in tuner.hparams.items()}
    loss.t = tuner.t
    rec = tuner.step()
    for n, v in before.items():
        raw_grad = float(rec["hypergrad"][n]) * v  # log coordinates: d nat / d raw = value
        moved = math.log(float(tuner.hparams[n])) - math.log(v)
        assert moved == pytest.approx(-0.05 * raw_grad, rel=1e-9), n
