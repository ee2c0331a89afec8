import math

import pytest
import torch
from helpers import data, mlp

import hyperdescent as hd


def make_problem(opt=None, space=None, loss=torch.nn.functional.cross_entropy, **kw):
    x, y = data(n=64)
    space = space or hd.Space({"lr": hd.Real(0.05, low=1e-4, high=1.0, log=True),
                               "weight_decay": hd.Real(1e-3, low=1e-6, high=0.1, log=True)})
    return hd.Problem(mlp(), loss=loss, optimizer=opt or hd.optim.SGD(momentum=0.9), space=space,
                      train=(x, y), val=(x[:24] + 0.1, y[:24]), test=(x[24:], y[24:]),
                      batch_size=16, seed=1, **kw)


def test_history_records_and_bounds():
    p = make_problem()
    tuner = hd.OnlineTuner(p, meta_lr=0.1)
    tuner.run(12)
    assert len(tuner.history) == 12
    rec = tuner.history[-1]
    for key in ("train_loss", "val_loss", "hparams", "hypergrad_norm", "tangent_norm",
                "wall_time"):
        assert key in rec
    assert rec["hparams"]["lr"] != tuner.history[0]["hparams"]["lr"]
    lr = tuner.hparams["lr"].item()
    assert 1e-4 <= lr <= 1.0 and math.isfinite(lr)
    assert isinstance(tuner.model, torch.nn.Module)


def test_online_hypergradient_is_the_forward_engine_when_meta_lr_is_zero():
    p = make_problem()
    tuner = hd.OnlineTuner(p, meta_optimizer="sgd", meta_lr=0.0, clip=None)
    tuner.run(8)
    res = hd.hypergrad(p, steps=8, method="forward")
    rec = tuner.history[-1]
    raw_norm = math.sqrt(sum(float(v) ** 2 for v in res.raw_grad.values()))
    assert rec["hypergrad_norm"] == pytest.approx(raw_norm, rel=1e-10)


@pytest.mark.parametrize("method", ["forward", "greedy", "truncated"])
@pytest.mark.parametrize("meta", ["adam", "sgd", "sign", "normalized"])
def test_methods_and_meta_optimizers_run(method, meta):
    p = make_problem()
    tuner = hd.OnlineTuner(p, method=method, meta_optimizer=meta, meta_lr=0.05, window=3,
                           hyper_every=2)
    tuner.run(6)
    meta_steps = [r for r in tuner.history if "val_loss" in r]
    # hyper_every=2: a meta-step after inner steps 2, 4 and 6
    assert [r["step"] for r in meta_steps] == [1, 3, 5]
    assert all(math.isfinite(r["val_loss"]) and math.isfinite(r["hypergrad_norm"])
               for r in meta_steps)
    assert all("tangent_norm" in r and "train_loss" in r for r in tuner.history)


def test_per_layer_adam_beta1_and_summed_tangent():
    space = hd.Space({"lr": hd.Real(0.01, low=1e-4, high=1.0, log=True, per="layer"),
                      "beta1": hd.Real(0.9, low=0.0, high=0.99)})
    p = make_problem(opt=hd.optim.Adam(), space=space)
    for tangent in ("exact", "summed"):
        tuner = hd.OnlineTuner(p, tangent=tangent, meta_lr=0.05)
        tuner.run(5)
        assert set(tuner.hparams["lr"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert len(tuner.engine.columns) == 2  # summed: one tangent per hyperparameter name


def test_schedule_replays_the_trajectory_in_plain_torch():
    p = make_problem()
    tuner = hd.OnlineTuner(p, meta_lr=0.2)
    tuner.run(15)
    sched = tuner.schedule()
    assert len(sched) == 15
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    sched.attach(opt)
    for t in range(15):
        x, y = p.train_batch(t)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for n, prm in model.named_parameters():
        assert torch.allclose(prm, tuner.state.params[n], rtol=1e-9, atol=1e-12)


def test_per_layer_schedule_needs_model_and_groups():
    space = hd.Space({"lr": hd.Real(0.05, low=1e-4, high=1.0, log=True, per="layer")})
    p = make_problem(space=space)
    tuner = hd.OnlineTuner(p, meta_lr=0.1).run(3)
    model = mlp()
    sched = tuner.schedule()
    model(torch.zeros(1, 5, dtype=torch.float64)).sum().backward()
    bad = torch.optim.SGD(model.parameters(), lr=0.1)
    sched.attach(bad)
    with pytest.raises(ValueError, match="pass model="):
        bad.step()
    one_group = torch.optim.SGD(model.parameters(), lr=0.1)
    sched.attach(one_group, model=model)
    with pytest.raises(ValueError, match="one param group per parameter"):
        for _ in range(3):  # step 0 uses the shared initial value; later ones differ
            one_group.step()
    opt = torch.optim.SGD([{"params": [q]} for q in model.parameters()], lr=1.0)
    sched.attach(opt, model=model)
    opt.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(tuner.history[0]["hparams"]["lr"]["0.weight"])


def test_non_finite_hypergradient_skips_the_meta_step(monkeypatch):
    p = make_problem()
    tuner = hd.OnlineTuner(p, meta_lr=0.1, hyper_every=1)
    before = {k: v.clone() for k, v in tuner.raw.items()}
    monkeypatch.setattr(tuner.engine, "readout",
                        lambda carry, state, vb: (1.0, {k: torch.full_like(v, math.nan)
                                                        for k, v in before.items()}))
    rec = tuner.step()
    assert rec["event"] == "skipped_meta_step"
    assert all(torch.equal(before[k], tuner.raw[k].detach()) for k in before)
    assert tuner.events[0]["event"] == "skipped_meta_step"


def test_diverging_loss_rolls_back_and_halves_meta_lr():
    calls = {"n": 0}

    def flaky_loss(out, y):
        calls["n"] += 1
        loss = torch.nn.functional.cross_entropy(out, y)
        return loss * math.nan if calls["n"] == 19 else loss  # train loss of step 9

    p = make_problem(loss=flaky_loss)
    tuner = hd.OnlineTuner(p, meta_lr=0.1, snapshot_every=4, hyper_every=1)
    tuner.run(12)
    assert tuner.rollbacks == 1
    assert tuner.meta_lr == pytest.approx(0.05)
    assert tuner.events[0]["event"] == "rollback"
    assert [r["step"] for r in tuner.history] == list(range(12))
    assert all(math.isfinite(v.item()) for v in tuner.hparams.values())


def test_a_run_that_stalls_back_at_chance_is_caught_early():
    """Loss 2.3 -> 1.9 over 30 steps, then drifting back to chance, 2.3 (dead ReLUs at too
    large a learning rate): no spike, and under trend_factor's 20% of the best, but it gives
    back more than `giveback` of the progress made."""
    losses = ([2.3 - 0.4 * t / 30 for t in range(31)] + [1.9 + 0.4 * t / 30 for t in range(1, 31)]
              + [2.3] * 20)

    def first_alarm(giveback):
        tuner = hd.OnlineTuner(make_problem(), giveback=giveback)
        for t, loss in enumerate(losses):
            if tuner.guard.diverged(t + 1, loss):
                return t
        return None

    assert first_alarm(float("inf")) is None
    alarm = first_alarm(0.3)
    assert alarm is not None and 31 < alarm < len(losses)
    # the EMA must have given back more than 0.3 of the 0.4 gained, plus the 5% floor
    assert losses[alarm] > 1.9 + 0.3 * 0.4 + 0.05 * 2.3


def test_save_and_load_mid_run_continues_exactly(tmp_path):
    full = hd.OnlineTuner(make_problem(), meta_lr=0.1, snapshot_every=4)
    full.run(10)
    half = hd.OnlineTuner(make_problem(), meta_lr=0.1, snapshot_every=4)
    half.run(5)
    half.save(tmp_path / "tuner.pt")
    resumed = hd.OnlineTuner.load(tmp_path / "tuner.pt", make_problem())
    resumed.run(10)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]
    for n in full.state.params:
        assert torch.equal(full.state.params[n], resumed.state.params[n])


def test_bad_arguments():
    p = make_problem()
    with pytest.raises(ValueError, match="method='bogus'"):
        hd.OnlineTuner(p, method="bogus")
    with pytest.raises(ValueError, match="meta_optimizer='rmsprop'"):
        hd.OnlineTuner(p, meta_optimizer="rmsprop")
    space = hd.Space({"lr": hd.Real(0.05, low=1e-4, high=1.0, log=True),
                      "width": hd.Int(8, low=4, high=16)})
    x, y = data()
    q = hd.Problem(mlp(), optimizer=hd.optim.SGD(), space=space, train=(x, y), val=(x, y))
    with pytest.raises(hd.HyperparameterError, match="width"):
        hd.OnlineTuner(q)
