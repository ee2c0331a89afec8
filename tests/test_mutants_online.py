"""OnlineTuner (Im, Savin & Cho 2021) paths the guard tests do not drive: the fault-skip path
(a batch holding NaN, and a loss non-finite again after a rollback), the record of a step past
an exhausted guard, argument checks, and the stream positions in the state record."""

import math

import pytest
import torch
from helpers import data, mlp

import hyperdescent as hd
from hyperdescent.tuners.online import to_plain


def _space(with_lr=True):
    s = {"weight_decay": hd.Real(1e-3, low=1e-6, high=0.1, log=True)}
    if with_lr:
        s["lr"] = hd.Real(0.05, low=1e-4, high=1.0, log=True)
    return hd.Space(s)


def _problem(loss=torch.nn.functional.cross_entropy, train=None, sp=None):
    x, y = data(n=48)
    return hd.Problem(mlp(), loss=loss, optimizer=hd.optim.SGD(momentum=0.9),
                      space=sp or _space(), train=(x, y) if train is None else train,
                      val=(x[:20] + 0.1, y[:20]), batch_size=16, seed=3)


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and set(a) == set(b)


def test_an_explicit_batch_with_nan_is_skipped_from_the_pre_step_state():
    tuner = hd.OnlineTuner(_problem(), meta_lr=0.1)
    for _ in range(3):
        tuner.step()
    params, raw = dict(tuner.state.params), {k: v.clone() for k, v in tuner.raw.items()}
    used = to_plain(tuner.hparams)
    z = {n: v.clone() for n, v in tuner.carry["Z"]["params"].items()}
    x, y = tuner.problem.train_batch(3)
    x = x.clone()
    x[0, 0] = math.nan
    rec = tuner.step(batch=(x, y))
    assert rec["step"] == 3 and math.isnan(rec["train_loss"])
    assert rec["event"] == "skipped_step" and rec["why"] == "non-finite values in the training batch"
    assert rec["hparams"] == used  # the values the skipped step would have used
    assert rec["wall_time"] == tuner.elapsed > 0
    assert tuner.events == [{"step": 3, "event": "skipped_step",
                             "why": "non-finite values in the training batch"}]
    assert tuner.history[-1] is rec and tuner.t == 4 and tuner.rollbacks == 0
    # weights, tangent and hyperparameters are those before the step
    assert _same(tuner.state.params, params) and _same(tuner.raw, raw)
    assert _same(tuner.carry["Z"]["params"], z)
    # and the next healthy step trains on from there
    after = tuner.step()
    assert math.isfinite(after["train_loss"]) and "event" not in after
    assert not _same(tuner.state.params, params)


class InfAt:
    """cross_entropy, but +inf as the training loss of step `at`, every time it is taken."""

    def __init__(self, at):
        self.at, self.t, self.model = at, 0, None

    def __call__(self, out, y):
        loss = torch.nn.functional.cross_entropy(out, y)
        if self.model.training and self.t == self.at:
            return loss * math.inf
        return loss


def test_a_loss_non_finite_again_after_its_rollback_is_skipped_not_retried():
    """Step 5's loss is +inf whatever the weights: one rollback, the replay reaches step 5
    again, and that step is then skipped (its batch holds only finite values)."""
    loss = InfAt(5)
    p = _problem(loss)
    loss.model = p.model
    tuner = hd.OnlineTuner(p, meta_lr=0.1, snapshot_every=2)
    while tuner.t < 8:
        loss.t = tuner.t
        tuner.step()
    kinds = [(e["event"], e["step"]) for e in tuner.events]
    assert kinds == [("rollback", 5), ("skipped_step", 5)]
    assert tuner.events[0]["why"] == "non-finite training loss"
    skip = tuner.events[1]
    assert skip["why"] == "non-finite training loss again after a rollback"
    assert [r["step"] for r in tuner.history] == list(range(8))
    rec = tuner.history[5]
    assert rec["event"] == "skipped_step" and rec["train_loss"] == math.inf
    assert rec["wall_time"] <= tuner.history[6]["wall_time"]
    assert tuner.rollbacks == 1 and tuner._fault_step is None
    assert all(torch.isfinite(v).all() for v in tuner.state.params.values())


def test_past_an_exhausted_guard_a_finite_spike_is_recorded_with_its_wall_time():
    class Spike:
        def __init__(self):
            self.t, self.model = 0, None

        def __call__(self, out, y):
            loss = torch.nn.functional.cross_entropy(out, y)
            return loss * 50 if self.model.training and self.t == 7 else loss

    loss = Spike()
    p = _problem(loss)
    loss.model = p.model
    tuner = hd.OnlineTuner(p, meta_lr=0.1, max_rollbacks=0)
    while tuner.t < 9:
        loss.t = tuner.t
        rec = tuner.step()
        if tuner.t == 8:
            spiked = rec
    assert spiked["train_loss"] > 10 and spiked["wall_time"] == pytest.approx(
        tuner.history[7]["wall_time"])
    assert isinstance(spiked["wall_time"], float) and spiked["wall_time"] > 0
    assert [e["event"] for e in tuner.events] == ["guard_exhausted"]
    assert tuner.history[7] is spiked


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", True])
def test_a_bad_horizon_is_refused_by_name(bad):
    with pytest.raises(hd.HyperparameterError, match="horizon"):
        hd.OnlineTuner(_problem(), horizon=bad)


def test_backtrack_names_are_checked_against_the_space():
    with pytest.raises(hd.HyperparameterError, match="backtrack"):
        hd.OnlineTuner(_problem(), backtrack=("momentum",))
    with pytest.raises(hd.HyperparameterError, match="backtrack"):
        hd.OnlineTuner(_problem(), backtrack=("lr", "beta1"))
    # the default ("lr",) is accepted by a space without lr, and then backtracks nothing
    tuner = hd.OnlineTuner(_problem(sp=_space(with_lr=False)))
    assert tuner.config["backtrack"] == ("lr",)
    assert hd.OnlineTuner(_problem(), backtrack="lr").config["backtrack"] == ("lr",)


def test_the_state_record_counts_the_batches_a_stream_has_handed_out():
    x, y = data(n=48)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    tuner = hd.OnlineTuner(_problem(train=loader), meta_lr=0.1).run(4)
    sd = tuner.state_dict()
    assert sd["data"] == {"replayable": False, "position": 4, "train_consumed": 4}
    replay = hd.OnlineTuner(_problem(), meta_lr=0.1).run(2).state_dict()
    assert replay["data"] == {"replayable": True, "position": 2}
