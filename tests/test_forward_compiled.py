"""forward mode with compile=True: the same exact step as the eager engine, as one compiled
function (float64, against the eager engine and reverse mode on the same trajectory)."""

import pytest
import torch
from helpers import bn_convnet, data, image_data, mlp, problem

import hyperdescent as hd

STEPS = 6


def l2_reg(params, hp):
    return hp["l2"] * sum((p * p).sum() for p in params.values())


def flat(grad):
    return torch.cat([t.reshape(-1) for v in grad.values()
                      for t in (v.values() if isinstance(v, dict) else [v])])


@pytest.fixture(scope="module")
def sgd_problem():
    """Momentum SGD; a two-block lr schedule (eager until block 1 starts at step 3, compiled
    after) and a regularizer hyperparameter (the mixed term ∂²L/∂θ∂λ)."""
    x, y = data()
    space = hd.Space({"lr": hd.Real(0.05, low=1e-4, high=1.0, log=True,
                                    schedule=hd.Piecewise(2)),
                      "weight_decay": hd.Real(1e-2, low=1e-6, high=1.0, log=True),
                      "l2": hd.Real(1e-2, low=1e-6, high=1.0, log=True)})
    return problem(mlp(), space, hd.optim.SGD(momentum=0.9), x=x, y=y, regularizer=l2_reg)


def adam_problem():
    x, y = data()
    space = hd.Space({"lr": hd.Real(0.01, low=1e-4, high=1.0, log=True),
                      "beta1": hd.Real(0.9, low=0.0, high=0.999),
                      "weight_decay": hd.Real(1e-2, low=1e-6, high=1.0, log=True)})
    return problem(mlp(), space, hd.optim.Adam(), x=x, y=y)


def check_against_eager_and_reverse(p):
    compiled = hd.hypergrad(p, steps=STEPS, method="forward", compile=True)
    eager = hd.hypergrad(p, steps=STEPS, method="forward")
    rev = hd.hypergrad(p, steps=STEPS, method="reverse")
    ref = flat(rev.grad)
    assert ref.abs().max() > 0
    assert compiled.value == pytest.approx(rev.value, rel=1e-12)
    for res in (compiled, eager):
        assert ((flat(res.grad) - ref).norm() / ref.norm()).item() < 1e-9
    assert compiled.stats["hvps"] == eager.stats["hvps"]
    return compiled


def test_compiled_forward_equals_eager_and_reverse_with_schedule_and_regularizer(sgd_problem):
    check_against_eager_and_reverse(sgd_problem)
    assert len(sgd_problem.compiled_steps) == 1


def test_compiled_forward_with_adam_counts_steps():
    check_against_eager_and_reverse(adam_problem())


def test_online_tuner_compiled_follows_the_eager_tuner(sgd_problem):
    runs = []
    start = sgd_problem.hparams
    for compile in (False, True):
        sgd_problem.set_hparams(start)  # a finished tuner leaves its values on the problem
        tuner = hd.OnlineTuner(sgd_problem, compile=compile, reset_every=None)
        tuner.run(8)
        runs.append(tuner)
    for a, b in zip(runs[0].history, runs[1].history):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-9)
        assert ("hypergrad_norm" in b) == ("hypergrad_norm" in a)
        if "hypergrad_norm" in a:
            assert b["hypergrad_norm"] == pytest.approx(a["hypergrad_norm"], rel=1e-6)
        assert b["tangent_norm"] == pytest.approx(a["tangent_norm"], rel=1e-6)
    assert len(sgd_problem.compiled_steps) == 1  # the engine of the tuner reused it


def test_compiled_forward_with_batchnorm_buffers():
    """Running statistics: None inside the transforms, updated by a separate forward."""
    x, y = image_data()
    p = problem(bn_convnet(), hd.Space({"lr": hd.Real(0.05, low=1e-4, high=1.0, log=True),
                                        "weight_decay": hd.Real(1e-2, low=1e-6, high=1.0,
                                                                log=True)}),
                hd.optim.SGD(momentum=0.9), x=x, y=y, eval_mode=False)
    check_against_eager_and_reverse(p)
    from hyperdescent.hypergrad.forward import ForwardTangent

    states = []
    for compile in (False, True):
        engine = ForwardTangent(p, STEPS, compile=compile)
        leaves = {k: v.detach() for k, v in hd.space.flatten(p.real_hparams()).items()}
        state, carry = p.init_state(), engine.init()
        for t in range(STEPS):
            state, carry, _ = engine.step(carry, state, p.train_batch(t), leaves, t)
        states.append(state.buffers)
    assert any("running_mean" in n for n in states[1])
    for n, b in states[0].items():
        assert torch.allclose(states[1][n], b, rtol=1e-12, atol=1e-14), n
        assert not torch.equal(b, p.buffers0[n]), n  # the statistics did move
