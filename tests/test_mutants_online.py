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


def test_step_trains_on_the_batch_and_tunes_on_the_validation_batch_it_is_given():
    """step(batch, val_batch): the training loss is that batch's at the pre-step weights and
    the meta-step's validation loss is the given batch's at the post-step weights."""
    tuner = hd.OnlineTuner(_problem(), meta_lr=0.1)
    tuner.step()
    p = tuner.problem
    x, y = data(n=48, seed=7)
    b, vb = (x[:16], y[:16]), (x[16:30], y[16:30])
    hp = p.hp_at(tuner.hparams, 1, tuner.horizon)
    want_train, _ = p.train_loss(tuner.state.params, tuner.state.buffers, b, hp)
    rec = tuner.step(batch=b, val_batch=vb)
    assert rec["train_loss"] == pytest.approx(want_train.item(), rel=1e-12)
    want_val = p.val_loss(tuner.state.params, tuner.state.buffers, vb)
    assert rec["val_loss"] == pytest.approx(want_val.item(), rel=1e-12)
    assert rec["val_loss"] != pytest.approx(
        p.val_loss(tuner.state.params, tuner.state.buffers, p.val_batch(2)).item(), rel=1e-6)


def test_the_rollback_event_names_the_step_and_the_loss_that_caused_it():
    loss = InfAt(5)
    p = _problem(loss)
    loss.model = p.model
    tuner = hd.OnlineTuner(p, meta_lr=0.1, snapshot_every=2)
    while not tuner.events:
        loss.t = tuner.t
        rec = tuner.step()
    ev = tuner.events[0]
    assert ev == {"step": 5, "event": "rollback", "to_step": 2, "train_loss": math.inf,
                  "meta_lr": 0.05, "why": "non-finite training loss", "halved": ["lr"]}
    assert {k: rec[k] for k in ev} == ev


def test_run_hands_the_callback_each_steps_record():
    seen = []
    tuner = hd.OnlineTuner(_problem(), meta_lr=0.1).run(
        3, callback=lambda tu, r: seen.append((tu.t, r)))
    assert [t for t, _ in seen] == [1, 2, 3]
    assert [r for _, r in seen] == tuner.history
    with pytest.raises(hd.HyperparameterError, match="callback"):
        hd.OnlineTuner(_problem()).run(2, callback=3)


def test_guard_settings_are_kept_in_the_config_and_reach_the_guard(tmp_path):
    kw = dict(spike_factor=5.0, trend_factor=1.5, giveback=0.7, snapshot_every=3,
              max_rollbacks=4, noise_tolerance=2.0, meta_lr_floor=0.2)
    tuner = hd.OnlineTuner(_problem(), **kw)
    tuner.save(tmp_path / "t.pt")
    back = hd.OnlineTuner.load(tmp_path / "t.pt", _problem())
    for t in (tuner, back):
        assert {k: t.config[k] for k in kw} == kw
        g = t.guard
        assert (g.spike_factor, g.trend_factor, g.giveback, g.snapshot_every, g.max_rollbacks,
                g.noise_tolerance, g.meta_lr_floor) == tuple(kw.values())


def test_a_space_with_an_int_is_refused_naming_the_tuner():
    x, y = data(n=48)
    space = hd.Space({"lr": hd.Real(0.05, low=1e-4, high=1.0, log=True),
                      "width": hd.Int(4, low=2, high=8)})
    p = hd.Problem(mlp(), optimizer=hd.optim.SGD(), space=space, train=(x, y),
                   val=(x[:20], y[:20]), batch_size=16, regularizer=lambda prm, hp: 0.0)
    with pytest.raises(hd.HyperparameterError, match=r"OnlineTuner\(method='greedy'\)"):
        hd.OnlineTuner(p, method="greedy")


def test_tune_on_train_and_meta_betas_are_accepted_and_kept():
    tuner = hd.OnlineTuner(_problem(), tune_on="train", meta_betas=[0.9, 0.97], meta_lr=0.1)
    assert tuner.config["tune_on"] == "train" and tuner.config["meta_betas"] == (0.9, 0.97)
    rec = tuner.step()
    p = tuner.problem
    want = p.val_loss(tuner.state.params, tuner.state.buffers, p.train_batch(1))
    assert rec["val_loss"] == pytest.approx(want.item(), rel=1e-12)  # tuned on train batch 1


def test_the_inner_state_counts_the_steps_taken():
    tuner = hd.OnlineTuner(_problem(), meta_lr=0.1).run(3)
    assert tuner.state.t == tuner.t == 3


def test_a_skipped_step_that_is_due_takes_a_snapshot_of_the_restored_state():
    tuner = hd.OnlineTuner(_problem(), meta_lr=0.1, snapshot_every=2)
    tuner.step()
    x, y = tuner.problem.train_batch(1)
    x = x.clone()
    x[0, 0] = math.nan
    tuner.step(batch=(x, y))  # skipped, and step count 2 is due
    snap = tuner.guard._snapshots[-1]["record"]
    assert snap["t"] == 2 and torch.equal(snap["state"]["params"]["0.weight"],
                                          tuner.state.params["0.weight"])


def test_the_meta_lr_floor_event_counts_the_rollbacks_so_far():
    loss = InfAt(5)
    p = _problem(loss)
    loss.model = p.model
    tuner = hd.OnlineTuner(p, meta_lr=0.1, snapshot_every=2, meta_lr_floor=1.0)
    while len(tuner.events) < 2:
        loss.t = tuner.t
        tuner.step()
    assert tuner.events[1] == {"step": 5, "event": "meta_lr_floor", "meta_lr": 0.1,
                               "rollbacks": 1}


def test_a_horizon_of_one_step_is_accepted():
    assert hd.OnlineTuner(_problem(), horizon=1).horizon == 1


def test_a_saved_truncated_tuner_keeps_its_window(tmp_path):
    tuner = hd.OnlineTuner(_problem(), method="truncated", window=3)
    tuner.run(4)
    tuner.save(tmp_path / "t.pt")
    back = hd.OnlineTuner.load(tmp_path / "t.pt", _problem())
    assert back.config["window"] == 3 and back.engine.window == 3
    tuner.run(8)
    back.run(8)
    assert _same(tuner.state.params, back.state.params)


def test_a_non_finite_hypergradient_is_skipped_with_its_reason():
    p = _problem()
    tuner = hd.OnlineTuner(p)
    tuner.step()
    raw = {k: v.clone() for k, v in tuner.raw.items()}
    # a validation set whose loss is infinite: the meta-step of the next step is skipped
    p.val_data.x[:] = math.inf
    tuner.step()
    skips = [e for e in tuner.events if e["event"] == "skipped_meta_step"]
    assert skips and skips[0]["why"] == "non-finite hypergradient or validation loss"
    assert all(torch.equal(raw[k], tuner.raw[k]) for k in raw)  # λ did not move
