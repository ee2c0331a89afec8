"""OfflineTuner (Micaelli & Storkey 2021) details the broader tests do not pin: the paper's
space, the clamps reaching the hypergradient, the outer step's projection and records, the
divergence threshold relative to the first meta-step, a callable fresh_init, streaming data,
and the step_decay check."""

import math

import pytest
import torch
from helpers import data, mlp

import hyperdescent as hd
from hyperdescent.tuners.meta import HalvingSign
from hyperdescent.tuners.offline import OfflineTuner, fds_space


def _problem(space, train=None, val=None, **kw):
    x, y = data(n=48)
    return hd.Problem(mlp(), optimizer=hd.optim.SGD(), space=space,
                      train=(x, y) if train is None else train,
                      val=(x[:20] + 0.1, y[:20]) if val is None else val,
                      test=(x[20:] - 0.1, y[20:]), batch_size=12, seed=3, **kw)


def _space(K=2, lr=0.1):
    return hd.Space({"lr": hd.Real(lr, low=0.0, high=1.0, schedule=hd.Piecewise(K)),
                     "momentum": hd.Real(0.5, low=0.0, high=0.99),
                     "weight_decay": hd.Real(1e-3, low=0.0, high=0.1)})


def _loader(x, y, bs=12):
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=False)


def test_fds_space_is_the_papers_space():
    s = fds_space()
    assert s["lr"].schedule.K == 5 and s["momentum"].schedule is None
    assert (s["lr"].low, s["lr"].high) == (0.0, 1.0)
    assert (s["momentum"].low, s["momentum"].high) == (0.0, 0.99)
    assert (s["weight_decay"].low, s["weight_decay"].high) == (0.0, 0.01)
    assert not any(s[n].log for n in ("lr", "momentum", "weight_decay"))
    assert s["lr"].init == s["momentum"].init == s["weight_decay"].init == 0.0
    t = fds_space(K=2, lr=0.2, momentum=0.3, weight_decay=1e-3, lr_high=0.5,
                  momentum_high=0.9, wd_high=0.1)
    assert t["lr"].schedule.K == 2 and t["lr"].high == 0.5 and t["lr"].init == 0.2
    assert (t["momentum"].init, t["momentum"].high) == (0.3, 0.9)
    assert (t["weight_decay"].init, t["weight_decay"].high) == (1e-3, 0.1)


@pytest.mark.parametrize("clamp", ["clamp_grad", "clamp_hz"])
def test_the_clamps_reach_the_meta_steps_hypergradient(clamp):
    """The recorded hypergradient is hd.hypergrad(forward, clamp) of the meta-step's own
    problem, block-averaged, and differs from the unclamped one."""
    c = {"clamp_grad": 0.05, "clamp_hz": 1e-3}[clamp]
    off = OfflineTuner(_problem(_space()), steps=6, meta_steps=1, **{clamp: c})
    sub = off._inner_problem(0)
    rec = off.step()
    ref = hd.hypergrad(sub, steps=6, method="forward", **{clamp: c})
    plain = hd.hypergrad(sub, steps=6, method="forward")
    widths = torch.tensor([3.0, 3.0], dtype=torch.float64)
    got = torch.tensor(rec["hypergrad"]["lr"], dtype=torch.float64)
    assert torch.allclose(got, ref.grad["lr"] / widths, rtol=1e-12, atol=0)
    assert not torch.allclose(got, plain.grad["lr"] / widths, rtol=1e-6, atol=0)
    assert off.config[clamp] == c


def test_an_outer_step_past_the_upper_bound_lands_on_it():
    """FDS step sizes larger than the range: the sign step is projected onto [low, high]."""
    off = OfflineTuner(_problem(_space(lr=0.05)), steps=6, meta_steps=1,
                       meta_lr={"lr": 5.0, "momentum": 5.0, "weight_decay": 5.0})
    rec = off.step()
    g = torch.tensor(rec["hypergrad"]["lr"], dtype=torch.float64)
    assert bool((g < 0).all())  # a larger learning rate helps: the step goes up
    assert torch.equal(off.hparams["lr"], torch.tensor([1.0, 1.0], dtype=torch.float64))
    for name, hi in (("momentum", 0.99), ("weight_decay", 0.1)):
        want = hi if rec["hypergrad"][name] < 0 else 0.0
        assert off.hparams[name].item() == want, name
    # the record keeps the step sizes after the step (none flipped yet: unchanged)
    assert rec["step_sizes"] == {"lr": [5.0, 5.0], "momentum": 5.0, "weight_decay": 5.0}


def test_adam_outer_step_is_projected_into_the_bounds():
    """Raw-coordinate steps (adam) on a linear bound: projected back inside it."""
    space = hd.Space({"lr": hd.Real(0.9, low=0.0, high=1.0)})
    off = OfflineTuner(_problem(space), method="reverse", steps=4, meta_steps=1,
                       meta_optimizer="sgd", meta_lr=1e6)
    rec = off.step()
    assert "step_sizes" not in rec
    assert off.hparams["lr"].item() == (1.0 if rec["hypergrad"]["lr"] < 0 else 0.0)


def test_divergence_is_judged_against_diverge_factor_times_the_first_loss():
    """A meta-step ending below diverge_factor x the first meta-step's val loss is kept; one
    ending above it is undone (backtrack), though every number is finite."""
    # a small learning-rate step improves the run (1.10 -> 1.005): kept even with a factor
    # just above 1
    kept = OfflineTuner(_problem(_space(K=1, lr=0.05)), steps=6, meta_steps=2,
                        diverge_factor=1.0 + 1e-9, meta_lr={"lr": 0.2}).run()
    v = [r["val_loss"] for r in kept.history]
    assert v[1] < v[0] < 1.2 and not kept.events
    assert kept.hparams["lr"].item() == pytest.approx(0.45, rel=1e-12)
    # a learning rate of 2.55 makes the (finite) loss climb past twice the first: undone
    space = hd.Space({"lr": hd.Real(0.05, low=0.0, high=100.0, schedule=hd.Piecewise(1))})
    undone = OfflineTuner(_problem(space), steps=6, meta_steps=2, diverge_factor=2.0,
                          meta_lr={"lr": 5.0}).run()
    v = [r["val_loss"] for r in undone.history]
    assert 2 * v[0] < v[1] < 1e3
    assert [e["event"] for e in undone.events] == ["backtrack"]
    assert undone.history[1]["event"] == "backtrack"
    assert undone.hparams["lr"].item() == pytest.approx(0.05, rel=1e-12)
    assert undone.meta.step_sizes["lr"].item() == pytest.approx(2.5, rel=1e-12)


def test_a_callable_fresh_init_is_cast_to_the_problems_dtype():
    def make(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(),
                                   torch.nn.Linear(8, 3))  # float32

    off = OfflineTuner(_problem(_space()), steps=4, meta_steps=1, fresh_init=make)
    a, b = off._inner_problem(0), off._inner_problem(1)
    assert a.dtype == torch.float64
    assert torch.equal(a.params0["0.weight"],
                       make(off.meta_seed(0))[0].weight.detach().double())
    assert not torch.equal(a.params0["0.weight"], b.params0["0.weight"])
    assert off.config["fresh_init"] == "callable"


def test_fds_runs_on_a_streaming_training_set():
    """train= as a DataLoader: FDS (forward mode) needs no replay, and each meta-step's
    problem reads the same stream."""
    x, y = data(n=48)
    off = OfflineTuner(_problem(_space(), train=_loader(x, y)), steps=4, meta_steps=2)
    assert not off._inner_problem(0).replayable
    off.run()
    assert len(off.history) == 2
    assert all(v == v for v in off.history[1]["hypergrad"]["lr"])


def test_retrain_on_train_only_does_not_need_validation_tensors():
    x, y = data(n=48)
    off = OfflineTuner(_problem(_space(), val=_loader(x[:20] + 0.1, y[:20], bs=20)),
                       steps=4, meta_steps=1)
    out = off.retrain(steps=4, on="train")
    assert out["on"] == "train" and out["steps"] == 4 and 0.0 <= out["test_acc"] <= 1.0
    with pytest.raises(hd.DataError, match="on='train\\+val'"):
        off.retrain(steps=4, on="train+val")


@pytest.mark.parametrize("decay", [0, 0.0, 1, 1.0, -0.5, True, "0.5"])
def test_step_decay_outside_the_open_unit_interval_is_refused_by_name(decay):
    with pytest.raises(hd.HyperparameterError, match="step_decay"):
        OfflineTuner(_problem(_space()), steps=4, step_decay=decay)


def test_step_decay_is_the_factor_a_sign_flip_multiplies_a_step_size_by():
    off = OfflineTuner(_problem(_space()), steps=4, step_decay=0.25)
    assert off.meta._sign_rule.decay == 0.25
    rule = HalvingSign({"x": torch.tensor([0.4, 0.4])}, 0.25)
    v = rule.step({"x": torch.zeros(2)}, {"x": torch.tensor([1.0, -1.0])})
    v = rule.step(v, {"x": torch.tensor([-1.0, -1.0])})  # the first element flips
    assert torch.equal(rule.step_sizes["x"], torch.tensor([0.1, 0.4]))
    assert torch.allclose(v["x"], torch.tensor([-0.3, 0.8]))


def test_zero_meta_steps_is_a_tuner_that_only_retrains():
    off = OfflineTuner(_problem(_space()), steps=4, meta_steps=0).run()
    assert off.m == 0 and off.history == [] and off.best_hparams is None
    assert 0.0 <= off.retrain(steps=4)["test_acc"] <= 1.0
    with pytest.raises(hd.HyperparameterError, match="meta_steps"):
        OfflineTuner(_problem(_space()), steps=4, meta_steps=-1)


def test_a_meta_lr_dict_is_copied_into_the_config():
    sizes = {"lr": 0.2}
    off = OfflineTuner(_problem(_space()), steps=4, meta_lr=sizes)
    sizes["lr"] = 99.0
    assert off.config["meta_lr"] == {"lr": 0.2} and off.config["meta_lr"] is not sizes
    assert torch.equal(off.meta.step_sizes["lr"], torch.tensor([0.2, 0.2], dtype=torch.float64))


def test_run_writes_a_checkpoint_every_checkpoint_every_meta_steps(tmp_path):
    ck = tmp_path / "off.pt"
    written = []

    def seen(tuner, record):  # called before the checkpoint of this meta-step is written
        written.append(ck.is_file())

    OfflineTuner(_problem(_space()), steps=4, meta_steps=3).run(
        checkpoint=ck, checkpoint_every=1, callback=seen)
    assert written == [False, True, True]
    assert OfflineTuner.load(ck, _problem(_space())).m == 3


def test_retrain_with_the_best_values_is_not_a_retrain_with_the_last():
    """values='best' trains with the best meta-step's values (never the last outer step's,
    which no run has used); before any meta-step both are the current values."""
    off = OfflineTuner(_problem(_space()), steps=6, meta_steps=2)
    assert off.retrain(steps=6, seed=0) == off.retrain(steps=6, seed=0, values="last")
    off.run()
    best, last = off.best_hparams, off.hparams
    assert not torch.equal(best["lr"], last["lr"])
    r_best = off.retrain(steps=6, seed=0, values="best")
    r_last = off.retrain(steps=6, seed=0, values="last")
    assert r_best["test_loss"] != r_last["test_loss"]
    # and "best" is that of the meta-step with the lowest validation loss
    m = min(range(2), key=lambda i: off.history[i]["val_loss"])
    assert torch.allclose(best["lr"], torch.tensor(off.history[m]["hparams"]["lr"],
                                                   dtype=torch.float64), rtol=0, atol=0)


def test_the_seed_given_sets_the_meta_steps_seeds():
    a = OfflineTuner(_problem(_space()), steps=4, seed=5)
    b = OfflineTuner(_problem(_space()), steps=4)
    assert a.config["seed"] == 5 and b.config["seed"] == 3  # the problem's seed
    assert a.meta_seed(0) != b.meta_seed(0)
    assert a.meta_seed(0) == OfflineTuner(_problem(_space()), steps=4, seed=5).meta_seed(0)


def test_the_record_holds_the_hypergradients_cost():
    rec = OfflineTuner(_problem(_space()), steps=4).step()
    assert isinstance(rec["hypergrad_wall_s"], float) and rec["hypergrad_wall_s"] > 0
    assert rec["hvps"] > 0 and rec["inner_steps"] == 4


def test_an_unbounded_hyperparameter_gets_a_tenth_of_its_start_as_step_size():
    reg = lambda params, hp: hp["l2"] * sum((w ** 2).sum() for w in params.values())  # noqa: E731
    space = hd.Space({"lr": hd.Real(0.1, low=0.0, high=1.0),
                      "l2": hd.Real(0.5, low=0.0, high=math.inf)})
    off = OfflineTuner(_problem(space, regularizer=reg), steps=4)
    assert off.meta.step_sizes["l2"].item() == pytest.approx(0.05, rel=1e-12)
    assert off.meta.step_sizes["lr"].item() == pytest.approx(0.1, rel=1e-12)


def test_a_zero_gradient_after_a_negative_one_does_not_halve_the_step():
    rule = HalvingSign({"x": torch.tensor([0.4])})
    v = rule.step({"x": torch.zeros(1)}, {"x": torch.tensor([-1.0])})
    rule.step(v, {"x": torch.tensor([0.0])})
    assert torch.equal(rule.step_sizes["x"], torch.tensor([0.4]))


def test_an_int_in_the_space_is_refused_naming_the_offline_method():
    space = hd.Space({"lr": hd.Real(0.1, low=0.0, high=1.0), "width": hd.Int(4, low=2, high=8)})
    p = _problem(space, regularizer=lambda prm, hp: 0.0)
    with pytest.raises(hd.HyperparameterError, match=r"OfflineTuner\(method='fds'\)"):
        OfflineTuner(p, steps=4)
