"""OfflineTuner (FDS and the other offline methods) on tiny float64 problems."""

import math

import pytest
import torch
from helpers import data, mlp

import hyperdescent as hd
from hyperdescent.hypergrad import METHODS as HG_METHODS
from hyperdescent.tuners.meta import HalvingSign, MetaOptimizer
from hyperdescent.tuners.offline import OfflineTuner, fds_space


def make_problem(space=None, n=48, test=True, optimizer=None, **kw):
    x, y = data(n=n)
    space = space if space is not None else fds_space(K=3)
    return hd.Problem(mlp(), optimizer=optimizer or hd.optim.SGD(), space=space, train=(x, y),
                      val=(x[:20] + 0.1, y[:20]), test=(x[20:] - 0.1, y[20:]) if test else None,
                      batch_size=12, seed=3, **kw)


def blocks_space(K=3):
    return hd.Space({"lr": hd.Real(0.1, low=0.0, high=1.0, schedule=hd.Piecewise(K)),
                     "momentum": hd.Real(0.5, low=0.0, high=0.99),
                     "weight_decay": hd.Real(1e-3, low=0.0, high=0.1)})


def test_forward_over_blocks_equals_reverse():
    prob = make_problem(blocks_space(K=3))
    fwd = hd.hypergrad(prob, steps=10, method="forward")
    rev = hd.hypergrad(prob, steps=10, method="reverse")
    assert fwd.value == pytest.approx(rev.value, abs=1e-12)
    for k in fwd.grad:
        assert torch.allclose(fwd.grad[k], rev.grad[k], atol=1e-9, rtol=0), k
    assert fwd.grad["lr"].shape == (3,)


def test_fds_record_is_the_block_mean_of_the_reverse_hypergradient():
    prob = make_problem(blocks_space(K=3))
    off = OfflineTuner(prob, method="fds", steps=10, meta_steps=1)
    sub = off._inner_problem(0)
    rec = off.step()
    rev = hd.hypergrad(sub, steps=10, method="reverse")
    widths = torch.tensor([4.0, 3.0, 3.0], dtype=torch.float64)  # floor(t*3/10) blocks
    assert torch.allclose(torch.tensor(rec["hypergrad"]["lr"], dtype=torch.float64),
                          rev.grad["lr"] / widths, atol=1e-9, rtol=0)
    assert rec["hypergrad"]["momentum"] == pytest.approx(rev.grad["momentum"].item() / 10,
                                                         abs=1e-9)
    assert rec["val_loss"] == pytest.approx(rev.value, abs=1e-12)


def test_halving_sign_rule():
    rule = HalvingSign({"a": torch.tensor([0.1, 0.1, 0.1])})
    v = rule.step({"a": torch.zeros(3)}, {"a": torch.tensor([-2.0, 0.0, 3.0])})
    assert torch.equal(v["a"], torch.tensor([0.1, 0.0, -0.1]))
    v = rule.step(v, {"a": torch.tensor([1.0, 1.0, 1.0])})  # first element flips
    assert torch.allclose(rule.step_sizes["a"], torch.tensor([0.05, 0.1, 0.1]))
    assert torch.allclose(v["a"], torch.tensor([0.05, -0.1, -0.2]))


def test_meta_optimizer_fds_kind_projects_saves_and_scales():
    proj = lambda d: {k: v.clamp(0.0, 1.0) for k, v in d.items()}  # noqa: E731
    meta = MetaOptimizer({"a": torch.zeros(2)}, "fds", lr={"a": 0.3}, project=proj)
    meta.step({"a": torch.tensor([-1.0, 1.0])})
    assert torch.equal(meta.values()["a"], torch.tensor([0.3, 0.0]))
    sd = meta.state_dict()
    meta.set_lr(0.5)
    assert torch.allclose(meta.step_sizes["a"], torch.tensor([0.15, 0.15]))
    meta.load_state_dict(sd)
    assert torch.allclose(meta.step_sizes["a"], torch.tensor([0.3, 0.3]))
    with pytest.raises(hd.HyperparameterError, match="step_decay"):
        MetaOptimizer({"a": torch.zeros(2)}, "fds", lr=0.1, step_decay=1.5)


def test_clamps_are_exact_for_the_clamped_dynamics_and_off_by_default():
    prob = make_problem(blocks_space(K=2))
    base = hd.hypergrad(prob, steps=6, method="forward")
    loose = hd.hypergrad(prob, steps=6, method="forward", clamp_grad=1e9, clamp_hz=1e9)
    for k in base.grad:
        assert torch.equal(base.grad[k], loose.grad[k]), k
    c = 0.05  # small enough to clamp many gradient entries
    res = hd.hypergrad(prob, steps=6, method="forward", clamp_grad=c)
    assert not torch.allclose(res.grad["lr"], base.grad["lr"])
    h, d = 1e-6, torch.tensor([1.0, -0.5], dtype=torch.float64)
    lr = prob.hparams["lr"]
    vals = [hd.hypergrad(prob, 6, "forward", hparams={"lr": lr + s * h * d},
                         clamp_grad=c).value for s in (1, -1)]
    assert (vals[0] - vals[1]) / (2 * h) == pytest.approx(float(res.grad["lr"] @ d), abs=1e-7)
    hz = hd.hypergrad(prob, steps=6, method="forward", clamp_hz=1e-3)
    assert all(torch.isfinite(g).all() for g in hz.grad.values())
    assert not torch.allclose(hz.grad["lr"], base.grad["lr"])
    with pytest.raises(hd.HyperparameterError, match="clamp_hz"):
        hd.hypergrad(prob, steps=2, method="forward", clamp_hz=-1.0)
    with pytest.raises(hd.HyperparameterError, match="clamp_grad"):
        OfflineTuner(prob, method="reverse", steps=4, clamp_grad=3.0)


def test_fds_from_zero_follows_the_sign_rule_and_bounds():
    prob = make_problem(fds_space(K=3))
    off = OfflineTuner(prob, method="fds", steps=9, meta_steps=2)
    rec = off.step()
    lr = off.hparams["lr"]
    g = torch.tensor(rec["hypergrad"]["lr"], dtype=torch.float64)
    expect = (-0.1 * torch.sign(g)).clamp(0.0, 1.0)
    assert torch.equal(lr, expect)
    assert lr[0] == 0.1  # lower val loss wants a positive learning rate at the start
    # at lr = 0 the weights never move: momentum and weight decay have no effect yet
    assert rec["hypergrad"]["momentum"] == 0.0 and off.hparams["momentum"] == 0.0
    off.run()
    assert off.m == 2 and len(off.history) == 2
    assert torch.equal(prob.hparams["lr"], off.hparams["lr"])  # the problem shows them


def test_fresh_init_and_fresh_validation_split():
    prob = make_problem()
    off = OfflineTuner(prob, steps=4, val_fraction=0.25)
    a, b = off._inner_problem(0), off._inner_problem(1)
    assert not torch.equal(a.params0["0.weight"], b.params0["0.weight"])
    assert torch.equal(a.params0["0.weight"], off._inner_problem(0).params0["0.weight"])
    assert len(a.val_data.x) == 12 and len(a.train_data.x) == 36
    rows = torch.cat([a.train_data.x, a.val_data.x])
    assert torch.equal(rows.sort(0).values, prob.train_data.x.sort(0).values)
    assert not torch.equal(a.val_data.x, b.val_data.x)
    fixed = OfflineTuner(prob, steps=4, fresh_init=False)._inner_problem(1)
    assert torch.equal(fixed.params0["0.weight"], prob.params0["0.weight"])


def test_save_load_mid_run_ends_bit_identical(tmp_path):
    ck = tmp_path / "off.pt"
    full = OfflineTuner(make_problem(), steps=6, meta_steps=3, val_fraction=0.25).run()
    part = OfflineTuner(make_problem(), steps=6, meta_steps=3, val_fraction=0.25)
    part.run(meta_steps=1, checkpoint=ck)
    back = OfflineTuner.load(ck, make_problem()).run()
    for k in full.values:
        assert torch.equal(full.values[k], back.values[k]), k
    assert torch.equal(full.meta.step_sizes["lr"], back.meta.step_sizes["lr"])
    strip = [{k: v for k, v in r.items() if "wall" not in k and "memory" not in k}
             for r in full.history]
    assert strip == [{k: v for k, v in r.items() if "wall" not in k and "memory" not in k}
                     for r in back.history]
    assert torch.load(ck, weights_only=True)["m"] == 1 and back.m == 3
    assert back._best["meta_step"] == full._best["meta_step"]
    assert back.retrain(values="best") == full.retrain(values="best")


def test_schedule_and_retrain_stretch_blocks_by_fraction_of_training():
    space = hd.Space({"lr": hd.Real(0.1, low=0.0, high=1.0, schedule=hd.Piecewise(2))})
    prob = make_problem(space)
    off = OfflineTuner(prob, steps=4)
    off.values["lr"] = torch.tensor([0.2, 0.05], dtype=torch.float64)
    sched = off.schedule(steps=8)
    assert [s["lr"] for s in sched.values] == [0.2] * 4 + [0.05] * 4
    out = off.retrain(steps=8, on="train")
    assert out["steps"] == 8 and 0.0 <= out["test_acc"] <= 1.0 and math.isfinite(out["test_loss"])
    # default length: as many epochs as the tuning runs (train 48 + val 20 rows vs 48)
    assert off.retrain()["steps"] == round(4 * 68 / 48)
    assert isinstance(off.model, torch.nn.Module)
    with pytest.raises(hd.HyperparameterError, match="values="):
        off.retrain(values="first")
    off.run(meta_steps=2)
    best = min(off.history, key=lambda r: r["val_loss"])
    assert [float(x) for x in off.best_hparams["lr"]] == best["hparams"]["lr"]


def test_adam_on_raw_coordinates_for_reverse():
    space = hd.Space({"lr": hd.Real(0.05, low=1e-4, high=1.0, log=True),
                      "weight_decay": hd.Real(1e-3, low=1e-6, high=0.1, log=True)})
    off = OfflineTuner(make_problem(space), method="reverse", steps=3, meta_steps=2,
                       meta_lr=0.1)
    off.run()
    assert off.config["meta_optimizer"] == "adam"
    assert off.hparams["lr"].item() != 0.05 and 1e-4 <= off.hparams["lr"].item() <= 1.0


def test_implicit_tunes_a_regularizer():
    space = hd.Space({"l2": hd.Real(1e-2, low=1e-5, high=1.0, log=True)})

    def reg(params, hp):
        return hp["l2"] * sum((p * p).sum() for p in params.values())

    prob = make_problem(space, optimizer=hd.optim.SGD(lr=0.2), regularizer=reg)
    off = OfflineTuner(prob, method="implicit", steps=8, meta_steps=2, meta_lr=0.2)
    off.run()
    assert off.hparams["l2"].item() != 1e-2 and len(off.history) == 2


def test_divergence_backtracks_to_the_last_values_that_trained():
    space = hd.Space({"lr": hd.Real(0.0, low=0.0, high=1e300)})
    off = OfflineTuner(make_problem(space), steps=6, meta_steps=3, meta_lr=1e300,
                       max_backtracks=1)
    off.step()
    assert off.hparams["lr"].item() == 1e300
    off.step()
    assert off.events and off.events[0]["event"] == "backtrack"
    assert off.hparams["lr"].item() == 0.0 and off.meta.step_sizes["lr"].item() == 5e299
    with pytest.raises(hd.NonFiniteError):
        off.run(meta_steps=6)


def test_bad_input_names_it():
    prob = make_problem()
    with pytest.raises(hd.HyperparameterError, match="method"):
        OfflineTuner(prob, method="greedy", steps=4)
    with pytest.raises(hd.HyperparameterError, match="steps"):
        OfflineTuner(prob)
    with pytest.raises(hd.HyperparameterError, match="wd"):
        OfflineTuner(prob, steps=4, meta_lr={"wd": 0.1})
    with pytest.raises(hd.HyperparameterError, match="val_fraction"):
        OfflineTuner(prob, steps=4, val_fraction=1.5)
    with pytest.raises(hd.HyperparameterError, match="on="):
        OfflineTuner(prob, steps=4).retrain(on="test")
    if "reversible" not in HG_METHODS:
        with pytest.raises(hd.HyperparameterError, match="reversible"):
            OfflineTuner(prob, method="reversible", steps=4)


def test_compare_kind_fds_logs_meta_steps_and_plots_schedules(tmp_path):
    from hyperdescent.experiment import run_method, validate_config
    from hyperdescent.report.schedules import plot_offline_schedules
    cfg = validate_config({
        "name": "fds-tiny", "task": "cancer_logreg", "seeds": [0], "steps": 12,
        "budget": {"inner_steps": 100}, "space": {"lr": {"schedule": 3}},
        "methods": [{"label": "FDS", "kind": "fds", "settings": {"meta_steps": 2}}]})
    recs = []
    run_method(hd.tasks.get("cancer_logreg"), cfg, cfg.methods[0], 0, recs.append)
    metas = [r for r in recs if r["kind"] == "meta_step"]
    assert [r["meta_step"] for r in metas] == [0, 1] and len(metas[0]["hparams"]["lr"]) == 3
    end = recs[-1]
    assert end["kind"] == "run_end" and end["inner_steps"] == 3 * 12 and 0 <= end["test_acc"] <= 1
    assert plot_offline_schedules(tmp_path / "s.png", cfg, recs).is_file()
    with pytest.raises(hd.ConfigError, match="meta_rate"):
        validate_config({**cfg.model_dump(), "methods": [
            {"label": "F", "kind": "fds", "settings": {"meta_rate": 1}}]})


@pytest.mark.skipif("reversible" not in HG_METHODS, reason="hd.hypergrad has no 'reversible'")
def test_reversible_meta_steps_match_reverse():
    space = hd.Space({"lr": hd.Real(0.05, low=1e-4, high=1.0, log=True),
                      "weight_decay": hd.Real(1e-3, low=1e-6, high=0.1, log=True)})

    def tuner(method):
        prob = make_problem(space, optimizer=hd.optim.SGD(momentum=0.5))
        return OfflineTuner(prob, method=method, steps=4, meta_steps=1, meta_lr=0.1).run()

    rev, rvs = tuner("reverse"), tuner("reversible")
    g, h = rev.history[0]["hypergrad"], rvs.history[0]["hypergrad"]
    assert h["lr"] == pytest.approx(g["lr"], rel=1e-5)
    assert h["weight_decay"] == pytest.approx(g["weight_decay"], rel=1e-5)


def test_fds_per_layer_schedule_keeps_api_shapes():
    space = hd.Space({"lr": hd.Real(0.0, low=0.0, high=1.0, per="layer",
                                    schedule=hd.Piecewise(2))})
    off = OfflineTuner(make_problem(space), steps=4, meta_steps=1).run()
    lr = off.hparams["lr"]
    assert isinstance(lr, dict) and all(v.shape == (2,) for v in lr.values())
    assert all(bool((v >= 0).all()) for v in lr.values())
    assert any(bool((v > 0).any()) for v in lr.values())
    assert isinstance(off.history[0]["hypergrad"]["lr"], dict)
    assert len(off.schedule(steps=6)) == 6


def test_normalized_outer_steps_move_the_dominant_raw_coordinate_by_meta_lr():
    space = hd.Space({"lr": hd.Real(0.05, low=1e-4, high=1.0, log=True),
                      "weight_decay": hd.Real(1e-3, low=1e-6, high=0.1, log=True)})
    off = OfflineTuner(make_problem(space), method="reverse", steps=3, meta_steps=1,
                       meta_lr=0.1, meta_optimizer="normalized")
    off.run()
    moves = [abs(math.log(off.hparams["lr"].item() / 0.05)),
             abs(math.log(off.hparams["weight_decay"].item() / 1e-3))]
    assert max(moves) == pytest.approx(0.1, rel=1e-6)
