"""forward == reverse == truncated(window >= T) == checkpointed reverse, and == central FD."""

import pytest
import torch
from helpers import (
    bn_convnet,
    data,
    dot,
    fd_directional,
    image_data,
    logreg,
    mlp,
    problem,
    random_direction,
)

import hyperdescent as hd

LR = hd.Real(0.05, low=1e-4, high=1.0, log=True)
WD = hd.Real(1e-2, low=1e-6, high=1.0, log=True)


def l2_reg(params, hp):
    return hp["l2"] * sum((p * p).sum() for p in params.values())


def case(name):
    """(model factory, space, optimizer, extra Problem kwargs, data) for each test case."""
    x, y = data()
    xi, yi = image_data()
    cases = {
        "logreg-sgd-lr-wd": (logreg, {"lr": LR, "weight_decay": WD}, hd.optim.SGD(), {}, (x, y)),
        "mlp-momentum-global": (mlp, {"lr": LR, "weight_decay": WD, "momentum":
                                      hd.Real(0.8, low=0.0, high=0.99)},
                                hd.optim.SGD(momentum=0.9), {}, (x, y)),
        "mlp-nesterov-per-layer": (mlp, {"lr": hd.Real(0.05, low=1e-4, high=1.0, log=True,
                                                       per="layer"),
                                         "weight_decay": WD},
                                   hd.optim.SGD(momentum=0.9, nesterov=True), {}, (x, y)),
        "mlp-momentum-per-parameter": (logreg, {"weight_decay": hd.Real(
            1e-2, low=1e-6, high=1.0, log=True, per="parameter")},
            hd.optim.SGD(lr=0.1, momentum=0.5), {}, (x, y)),
        "mlp-sgd-piecewise": (mlp, {"lr": hd.Real(0.05, low=1e-4, high=1.0, log=True,
                                                  schedule=hd.Piecewise(3))},
                              hd.optim.SGD(momentum=0.9), {}, (x, y)),
        "mlp-adam-betas": (mlp, {"lr": hd.Real(0.01, low=1e-4, high=1.0, log=True),
                                 "beta1": hd.Real(0.9, low=0.0, high=0.999),
                                 "beta2": hd.Real(0.99, low=0.0, high=0.9999),
                                 "weight_decay": WD}, hd.optim.Adam(), {}, (x, y)),
        "mlp-adamw": (mlp, {"lr": hd.Real(0.01, low=1e-4, high=1.0, log=True),
                            "weight_decay": WD}, hd.optim.AdamW(), {}, (x, y)),
        "mlp-rmsprop": (mlp, {"lr": hd.Real(0.01, low=1e-4, high=1.0, log=True),
                              "alpha": hd.Real(0.9, low=0.5, high=0.999)},
                        hd.optim.RMSprop(momentum=0.5), {}, (x, y)),
        "mlp-regularizer": (mlp, {"l2": hd.Real(1e-2, low=1e-6, high=1.0, log=True),
                                  "lr": LR}, hd.optim.SGD(momentum=0.9),
                            {"regularizer": l2_reg}, (x, y)),
        "bn-convnet": (bn_convnet, {"lr": LR, "weight_decay": WD}, hd.optim.SGD(momentum=0.9),
                       {"eval_mode": False}, (xi, yi)),
    }
    return cases[name]


CASES = ["logreg-sgd-lr-wd", "mlp-momentum-global", "mlp-nesterov-per-layer",
         "mlp-momentum-per-parameter", "mlp-sgd-piecewise", "mlp-adam-betas", "mlp-adamw",
         "mlp-rmsprop", "mlp-regularizer", "bn-convnet"]
STEPS = 6


def build(name):
    make, space, opt, kw, (x, y) = case(name)
    return problem(make(), hd.Space(space), opt, x=x, y=y, **kw)


def flat(grad):
    out = []
    for v in grad.values():
        out += [t.reshape(-1) for t in (v.values() if isinstance(v, dict) else [v])]
    return torch.cat(out)


@pytest.mark.parametrize("name", CASES)
def test_methods_agree_and_match_finite_differences(name):
    p = build(name)
    rev = hd.hypergrad(p, steps=STEPS, method="reverse")
    results = {
        "forward": hd.hypergrad(p, steps=STEPS, method="forward"),
        "truncated": hd.hypergrad(p, steps=STEPS, method="truncated", window=STEPS),
        "checkpointed": hd.hypergrad(p, steps=STEPS, method="reverse", checkpoint_every=2),
    }
    ref = flat(rev.grad)
    assert ref.abs().max() > 0
    for method, res in results.items():
        assert res.value == pytest.approx(rev.value, rel=1e-12)
        err = ((flat(res.grad) - ref).norm() / ref.norm()).item()
        assert err < 1e-9, (method, err)
    direction = random_direction(p.real_hparams())
    fd = fd_directional(p, direction, steps=STEPS)
    assert dot(rev.grad, direction) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_raw_grad_is_chain_rule_of_natural():
    p = build("logreg-sgd-lr-wd")
    res = hd.hypergrad(p, steps=4, method="forward")
    for name in ("lr", "weight_decay"):
        # log transform: d value / d raw = value
        assert torch.allclose(res.raw_grad[name], res.grad[name] * p.hparams[name])


def test_bn_buffers_are_carried_not_differentiated():
    p = build("bn-convnet")
    p.eval_mode = True
    rev = hd.hypergrad(p, steps=4, method="reverse")
    fwd = hd.hypergrad(p, steps=4, method="forward")
    assert torch.allclose(flat(rev.grad), flat(fwd.grad), rtol=1e-9)
    state = p.init_state()
    state, _ = p.step(state, p.train_batch(0), p.hparams)
    assert not torch.equal(state.buffers["1.running_mean"], p.buffers0["1.running_mean"])
    assert state.buffers["1.num_batches_tracked"].item() == 1


def test_stats_are_reported():
    p = build("mlp-momentum-global")
    res = hd.hypergrad(p, steps=4, method="forward")
    assert res.stats["wall_time_s"] > 0
    assert res.stats["hvps"] > 0
    # reverse-type methods: one vector-Hessian product per step backpropagated through
    # one vector-Hessian product per step backpropagated through, but the first step's:
    # its start is held constant
    assert hd.hypergrad(p, steps=4, method="reverse").stats["hvps"] == 3
    assert hd.hypergrad(p, steps=4, method="reverse", checkpoint_every=2).stats["hvps"] == 3
    assert hd.hypergrad(p, steps=4, method="truncated", window=3).stats["hvps"] == 2
    assert hd.hypergrad(p, steps=4, method="greedy").stats["hvps"] == 0
    assert "peak_memory_mb" in res.stats


def test_greedy_equals_analytic_one_step_formula():
    x, y = data()
    space = hd.Space({"lr": LR, "weight_decay": WD})
    p = problem(logreg(), space, hd.optim.SGD(), x=x, y=y)
    T = 5
    res = hd.hypergrad(p, steps=T, method="greedy")
    lr, wd = p.hparams["lr"], p.hparams["weight_decay"]
    state = p.init_state()
    for t in range(T - 1):
        state, _ = p.step(state, p.train_batch(t), p.hparams)
    prev = {n: v.detach().requires_grad_(True) for n, v in state.params.items()}
    loss, _ = p.train_loss(prev, state.buffers, p.train_batch(T - 1), {})
    g = dict(zip(prev, torch.autograd.grad(loss, list(prev.values()))))
    new = {n: (prev[n] - lr * (g[n] + wd * prev[n])).detach().requires_grad_(True) for n in prev}
    e = p.val_loss(new, state.buffers, p.val_batch(T))
    c = dict(zip(new, torch.autograd.grad(e, list(new.values()))))
    d_lr = -sum((c[n] * (g[n] + wd * prev[n])).sum() for n in c)
    d_wd = -lr * sum((c[n] * prev[n]).sum() for n in c)
    assert res.grad["lr"].item() == pytest.approx(d_lr.item(), rel=1e-10)
    assert res.grad["weight_decay"].item() == pytest.approx(d_wd.item(), rel=1e-10)


def test_forward_does_not_compute_unstarted_blocks():
    p = build("mlp-sgd-piecewise")
    from hyperdescent.hypergrad.forward import ForwardTangent

    engine = ForwardTangent(p, 6)
    leaves = {k: v.detach() for k, v in hd.space.flatten(p.real_hparams()).items()}
    state = p.init_state()
    state, carry, _ = engine.step(engine.init(), state, p.train_batch(0), leaves, 0)
    assert carry["started"].tolist() == [True, False, False]
    assert all((z[1:] == 0).all() for d in carry["Z"].values() for z in d.values())


@pytest.mark.parametrize("name", ["mlp-momentum-global", "mlp-nesterov-per-layer", "mlp-adam-betas",
                                  "mlp-adamw", "mlp-rmsprop"])
def test_hand_written_tangent_rules_equal_torch_func_jvp(name):
    from hyperdescent.hypergrad.forward import ForwardTangent

    p = build(name)
    out = []
    for use_rule in (True, False):
        engine = ForwardTangent(p, STEPS, tangent_rule=use_rule)
        leaves = {k: v.detach() for k, v in hd.space.flatten(p.real_hparams()).items()}
        state, carry = p.init_state(), engine.init()
        for t in range(STEPS):
            state, carry, _ = engine.step(carry, state, p.train_batch(t), leaves, t)
        out.append(torch.cat([z.reshape(-1) for d in carry["Z"].values() for z in d.values()]))
    assert torch.allclose(out[0], out[1], rtol=1e-10, atol=1e-14)


def test_cpu_peak_memory_is_read_where_the_unrolled_graph_peaks(monkeypatch):
    """The RSS is read at the start, just before each segment's backward (sample_memory) and at
    the end; the peak is the largest reading minus the start."""
    import importlib

    common = importlib.import_module("hyperdescent.hypergrad.common")
    monkeypatch.setattr(common.CostMeter, "interval_s", 3600.0)  # no background readings
    readings = iter([100 * 2 ** 20, 164 * 2 ** 20] + [101 * 2 ** 20] * 10)
    monkeypatch.setattr(common, "rss_bytes", lambda: next(readings))
    res = hd.hypergrad(build("mlp-momentum-global"), steps=3, method="reverse")
    assert res.stats["memory_source"] == "rss_sampled"
    assert res.stats["peak_memory_mb"] == pytest.approx(64.0)


@pytest.mark.parametrize("name", ["bn-convnet", "mlp-nesterov-per-layer"])
def test_sgd_heavy_ball_fast_tangent_is_the_generic_rule(name, monkeypatch):
    """SGD's fast tangent rule (momentum, lr and weight decay tuned) gives exactly the generic
    rule's tangent; cases outside it (Nesterov) keep the generic rule."""
    from hyperdescent.hypergrad.forward import ForwardTangent
    from hyperdescent.optim import SGD

    used = []
    fast = SGD._heavy_ball_tangent
    monkeypatch.setattr(SGD, "_heavy_ball_tangent",
                        lambda self, *a: used.append(1) or fast(self, *a))
    out = []
    for on in (True, False):
        p = build(name)
        if not on:  # the reference rule: an optimizer no problem has specialized
            p.optimizer = SGD(**p.optimizer.fixed)
        engine = ForwardTangent(p, STEPS)
        leaves = {k: v.detach() for k, v in hd.space.flatten(p.real_hparams()).items()}
        state, carry = p.init_state(), engine.init()
        for t in range(STEPS):
            state, carry, _ = engine.step(carry, state, p.train_batch(t), leaves, t)
        out.append(torch.cat([z.reshape(-1) for d in carry["Z"].values() for z in d.values()] +
                             [x.reshape(-1) for x in state.params.values()]))
    assert torch.equal(out[0], out[1])
    assert len(used) == (STEPS - 1 if name == "bn-convnet" else 0)
