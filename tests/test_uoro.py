"""tangent="uoro": an unbiased rank-one estimate of the forward tangent (Tallec & Ollivier 2018)."""

import math

import pytest
import torch
from helpers import data, logreg, mlp, problem

import hyperdescent as hd
from hyperdescent.hypergrad.uoro import UOROTangent

STEPS = 5


def _space(per="global"):
    return hd.Space({"lr": hd.Real(0.1, low=1e-4, high=1.0, log=True, per=per),
                     "weight_decay": hd.Real(1e-2, low=1e-6, high=1.0, log=True),
                     "momentum": hd.Real(0.8, low=0.0, high=0.99)})


def _per_sample_estimates(p, samples, seed=0, **kw):
    """Each UORO sample's own hypergradient estimate (samples, scalar hyperparameters)."""
    engine = UOROTangent(p, STEPS, samples=samples, seed=seed, **kw)
    leaves = {k: v.detach() for k, v in hd.space.flatten(p.real_hparams()).items()}
    state, carry = p.init_state(), engine.init()
    for t in range(STEPS):
        state, carry, _ = engine.step(carry, state, p.train_batch(t), leaves, t)
    _, c, _ = p.val_grad(state.params, state.buffers, p.val_batch(STEPS))
    return engine.sample_estimates(carry, c), engine


@pytest.mark.parametrize("per,kw,samples", [("global", {}, 1500), ("layer", {}, 1500),
                                            ("layer", {"blocks": "layer"}, 250),
                                            ("layer", {"centred": True}, 400)])
def test_uoro_is_unbiased_for_the_exact_forward_hypergradient(per, kw, samples):
    p = problem(mlp(), _space(per), hd.optim.SGD())
    exact = hd.hypergrad(p, STEPS, "forward")
    est, engine = _per_sample_estimates(p, samples=samples, **kw)
    mean, se = est.mean(0), est.std(0) / est.shape[0] ** 0.5
    flat = hd.space.flatten(exact.grad)
    want = torch.zeros_like(mean)
    for j, col in enumerate(engine.columns):
        m = col.members[0]
        want[j] = flat[m.leaf].reshape(-1)[m.index]
    # each component within 4 standard errors of the exact value, and the errors are small
    assert ((mean - want).abs() <= 4 * se + 1e-12).all(), (mean, want, se)
    assert float((mean - want).norm() / want.norm()) < 0.15
    # a single sample is far from exact: the estimate is random, not a copy of the exact one
    assert float((est[0] - want).norm() / want.norm()) > 1e-3
    if kw.get("centred"):
        # the global values (groups of one) are exact in every sample, and each name's mean
        # over its layers too: the signs only move the deviations from it
        for j, col in enumerate(engine.columns):
            if col.members[0].per == "global":
                assert torch.allclose(est[:, j], want[j].expand(est.shape[0]), rtol=1e-9,
                                      atol=1e-15)
        lr = [j for j, col in enumerate(engine.columns) if col.members[0].leaf.startswith("lr/")]
        assert torch.allclose(est[:, lr].mean(1), want[lr].mean().expand(est.shape[0]),
                              rtol=1e-9, atol=1e-15)


def test_uoro_readout_is_the_mean_of_its_samples_and_hvps_do_not_grow_with_hyperparameters():
    p = problem(mlp(), _space("layer"), hd.optim.SGD())
    res = hd.hypergrad(p, STEPS, "forward", tangent="uoro", uoro_samples=3, seed=7)
    est, _ = _per_sample_estimates(p, samples=3, seed=7)
    got = torch.cat([v.reshape(-1) for v in hd.space.flatten(res.grad).values()])
    assert torch.allclose(got.sort().values, est.mean(0).sort().values, rtol=1e-12, atol=1e-15)
    q = problem(mlp(), _space("global"), hd.optim.SGD())
    res_global = hd.hypergrad(q, STEPS, "forward", tangent="uoro", uoro_samples=3)
    exact = hd.hypergrad(p, STEPS, "forward")
    # one Hessian-vector product per sample and step after the first, whatever |λ|
    assert res.stats["hvps"] == res_global.stats["hvps"] == 3 * (STEPS - 1)
    assert exact.stats["hvps"] > res.stats["hvps"]


def test_uoro_signs_follow_the_seed():
    p = problem(logreg(), _space(), hd.optim.SGD())
    a = hd.hypergrad(p, STEPS, "forward", tangent="uoro", seed=1).grad
    b = hd.hypergrad(p, STEPS, "forward", tangent="uoro", seed=1).grad
    c = hd.hypergrad(p, STEPS, "forward", tangent="uoro", seed=2).grad
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_online_tuner_with_uoro_tunes_and_resumes_bit_identically(tmp_path):
    x, y = data(n=64)

    def make():
        return hd.Problem(mlp(), optimizer=hd.optim.SGD(momentum=0.9),
                          space=hd.Space({"lr": hd.Real(0.05, low=1e-4, high=1.0, log=True,
                                                        per="layer")}),
                          train=(x, y), val=(x[:24] + 0.1, y[:24]), batch_size=16, seed=1)

    full = hd.OnlineTuner(make(), tangent="uoro", uoro_samples=2, meta_lr=0.05).run(12)
    assert all("hypergrad" in r for r in full.history)
    assert any(r["hparams"]["lr"] != full.history[0]["hparams"]["lr"] for r in full.history)
    half = hd.OnlineTuner(make(), tangent="uoro", uoro_samples=2, meta_lr=0.05).run(6)
    half.save(tmp_path / "uoro.pt")
    resumed = hd.OnlineTuner.load(tmp_path / "uoro.pt", make()).run(12)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]
    assert all(torch.equal(resumed.state.params[n], full.state.params[n]) for n in full.state.params)


def test_uoro_options_are_checked():
    p = problem(logreg(), _space(), hd.optim.SGD())
    with pytest.raises(hd.HyperparameterError, match="uoro_samples"):
        hd.hypergrad(p, 2, "forward", tangent="uoro", uoro_samples=0)
    with pytest.raises(hd.HyperparameterError, match="needs tangent='uoro'"):
        hd.hypergrad(p, 2, "forward", uoro_samples=2)
    with pytest.raises(hd.HyperparameterError, match="uoro_centred=True needs tangent='uoro'"):
        hd.OnlineTuner(p, uoro_centred=True)
    with pytest.raises(hd.HyperparameterError, match="uoro_blocks='row' is not one of"):
        hd.hypergrad(p, 2, "forward", tangent="uoro", uoro_blocks="row")
    with pytest.raises(hd.HyperparameterError, match="needs uoro_blocks='all'"):
        hd.hypergrad(p, 2, "forward", tangent="uoro", uoro_blocks="name", uoro_centred=True)
    with pytest.raises(hd.HyperparameterError, match="uoro_centred must be True or False"):
        hd.hypergrad(p, 2, "forward", tangent="uoro", uoro_centred=1)


def test_centred_uoro_costs_one_product_per_group_more_and_tunes_online():
    p = problem(mlp(), _space("layer"), hd.optim.SGD())
    plain = hd.hypergrad(p, STEPS, "forward", tangent="uoro", uoro_samples=2)
    centred = hd.hypergrad(p, STEPS, "forward", tangent="uoro", uoro_samples=2,
                           uoro_centred=True)
    groups = 3  # per-layer lr; global weight decay and momentum (groups of one)
    assert centred.stats["hvps"] == plain.stats["hvps"] + groups * (STEPS - 1)
    tuner = hd.OnlineTuner(problem(mlp(), _space("layer"), hd.optim.SGD()), tangent="uoro",
                           uoro_centred=True, meta_lr=0.05).run(8)
    assert all(math.isfinite(r["tangent_norm"]) and r["tangent_norm"] > 0
               for r in tuner.history[1:])
    assert tuner.history[-1]["hparams"] != tuner.history[0]["hparams"]


@pytest.mark.parametrize("per", ["global", "layer"])
def test_batched_rows_equal_one_backward_per_row(per):
    """All Hessian-vector rows of a step in one vmapped backward give the rows of the loop
    (and so the same hypergradient), with the same count of products."""
    reg = lambda params, hp: hp["l2"] * sum((w ** 2).sum() for w in params.values())  # noqa: E731
    space = hd.Space({"lr": hd.Real(0.1, low=1e-4, high=1.0, log=True, per=per),
                      "l2": hd.Real(1e-2, low=1e-6, high=1.0, log=True),
                      "momentum": hd.Real(0.8, low=0.0, high=0.99)})
    p = problem(mlp(), space, hd.optim.SGD(), regularizer=reg)
    loop = hd.hypergrad(p, STEPS, "forward", batched_rows=False)
    batched = hd.hypergrad(p, STEPS, "forward", batched_rows=True)
    for k, v in hd.space.flatten(loop.grad).items():
        assert torch.allclose(hd.space.flatten(batched.grad)[k], v, rtol=1e-10, atol=1e-14), k
    assert batched.stats["hvps"] == loop.stats["hvps"]
