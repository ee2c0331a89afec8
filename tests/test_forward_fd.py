"""hvp="finite_difference" / "central_difference": the forward tangent's Hessian-vector products
by differences of gradients (Liu, Simonyan & Yang 2019, Eq. 8), against double backward."""

import math

import pytest
import torch
from helpers import bn_convnet, data, image_data, mlp, problem

import hyperdescent as hd
from hyperdescent.hypergrad.forward import (
    ForwardTangent,
    fd_epsilon,
    finite_difference_hvp,
    forward_engine,
    rng_snapshot,
)
from hyperdescent.hypergrad.uoro import UOROTangent

STEPS = 4


def _lr_space(per="layer"):
    return hd.Space({"lr": hd.Real(0.1, low=1e-4, high=1.0, log=True, per=per),
                     "momentum": hd.Real(0.8, low=0.0, high=0.99)})


def _l2(params, hp):
    return hp["l2"] * sum((w ** 2).sum() for w in params.values())


def _dropout_mlp():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Dropout(0.5),
                               torch.nn.Linear(8, 3)).double()


def _bn_problem():
    x, y = image_data()
    return problem(bn_convnet(), _lr_space(), hd.optim.SGD(momentum=0.9), x=x, y=y)


def _at_step(p, t=2):
    """Weights after t plain steps (not the initial point), a batch, the hyperparameters and a
    random direction v."""
    state = p.init_state()
    hp = p.hp_at(p.real_hparams(), 0, 10)
    for i in range(t):
        state, _ = p.step(state, p.train_batch(i), hp)
    g = torch.Generator().manual_seed(5)
    v = {n: torch.randn(x.shape, generator=g, dtype=x.dtype) for n, x in state.params.items()}
    return state, p.train_batch(t), hp, v


def _autodiff_hvp(p, state, batch, hp, v):
    """H·v by double backward, the step's gradient and the generator states before it."""
    rng = rng_snapshot(p.device)
    params = {n: x.detach().requires_grad_(True) for n, x in state.params.items()}
    _, g, _, _ = p.train_grad(params, state.buffers, batch, hp, create_graph=True)
    hv = p.vjp(list(g.values()), list(params.values()), [v[n] for n in g])
    return dict(zip(params, hv)), {n: x.detach() for n, x in g.items()}, rng


def _rel(a, b):
    num = sum(float(((a[n] - b[n]) ** 2).sum()) for n in b)
    return math.sqrt(num / sum(float((b[n] ** 2).sum()) for n in b))


@pytest.mark.parametrize("central", [False, True])
def test_fd_products_converge_to_autodiff_at_their_order(central):
    # one-sided O(ε): the error falls ~10x for a 10x smaller ε; central O(ε²): ~100x
    p = _bn_problem()
    state, batch, hp, v = _at_step(p)
    want, g0, rng = _autodiff_hvp(p, state, batch, hp, v)
    errs = [_rel(finite_difference_hvp(p, state.params, state.buffers, batch, hp, v, g0,
                                       central, eps=e, rng=rng), want)
            for e in (1e-2, 1e-3)]
    ratio = errs[0] / errs[1]
    assert (50 < ratio < 200) if central else (5 < ratio < 20), errs
    # at the default ε (fd_epsilon) the products are close to exact in float64
    got = finite_difference_hvp(p, state.params, state.buffers, batch, hp, v, g0, central,
                                rng=rng)
    assert _rel(got, want) < (1e-8 if central else 1e-6)
    # linear in v: a direction 1000x larger gives a 1000x larger product (ε scales with 1/‖v‖)
    big = finite_difference_hvp(p, state.params, state.buffers, batch, hp,
                                {n: 1e3 * x for n, x in v.items()}, g0, central, rng=rng)
    assert _rel({n: x / 1e3 for n, x in big.items()}, want) < (1e-8 if central else 1e-6)


def test_fd_epsilon_follows_its_rule():
    params = {"a": torch.full((4,), 3.0, dtype=torch.float64)}  # ‖θ‖ = 6
    v = {"a": torch.full((4,), 0.5, dtype=torch.float64)}  # ‖v‖ = 1
    u64 = torch.finfo(torch.float64).eps
    assert fd_epsilon(params, v, False) == pytest.approx(u64 ** 0.5 * 7)
    assert fd_epsilon(params, v, True) == pytest.approx(u64 ** (1 / 3) * 7)
    assert fd_epsilon(params, {"a": 2 * v["a"]}, False) == pytest.approx(u64 ** 0.5 * 3.5)
    f32 = {"a": params["a"].float()}
    assert fd_epsilon(f32, {"a": v["a"].float()}, False) == pytest.approx(
        torch.finfo(torch.float32).eps ** 0.5 * 7, rel=1e-5)
    assert fd_epsilon(params, {"a": torch.zeros(4, dtype=torch.float64)}, False) == math.inf
    # v = 0: no product (None, read as zero); a NaN direction is not hidden as zero
    p = problem(mlp(), _lr_space(), hd.optim.SGD())
    state, batch, hp, v = _at_step(p, 1)
    zero = {n: torch.zeros_like(x) for n, x in v.items()}
    assert finite_difference_hvp(p, state.params, state.buffers, batch, hp, zero, v) is None
    nan = {n: torch.full_like(x, math.nan) for n, x in v.items()}
    got = finite_difference_hvp(p, state.params, state.buffers, batch, hp, nan, v, True)
    assert all(torch.isnan(x).all() for x in got.values())


def test_fd_product_mutates_no_state_and_replays_the_dropout_masks():
    p = problem(_dropout_mlp(), _lr_space(), hd.optim.SGD())
    bp = _bn_problem()
    for prob in (p, bp):
        state, batch, hp, v = _at_step(prob)
        saved = state.clone()
        want, g0, rng = _autodiff_hvp(prob, state, batch, hp, v)
        after = torch.random.get_rng_state()
        got = finite_difference_hvp(prob, state.params, state.buffers, batch, hp, v, g0,
                                    rng=rng)
        assert _rel(got, want) < 1e-6
        # the generators are where the step's own gradient left them; weights and BatchNorm
        # statistics untouched
        assert torch.equal(torch.random.get_rng_state(), after)
        for d, s in ((state.params, saved.params), (state.buffers, saved.buffers)):
            assert all(torch.equal(d[n], s[n]) for n in s)
    # without the replay the masks differ: far from H·v (what the replay is for)
    state, batch, hp, v = _at_step(p)
    want, g0, _ = _autodiff_hvp(p, state, batch, hp, v)
    assert _rel(finite_difference_hvp(p, state.params, state.buffers, batch, hp, v, g0),
                want) > 1e-2


def _flat(res):
    return torch.cat([t.reshape(-1) for t in hd.space.flatten(res.grad).values()])


@pytest.mark.parametrize("tangent", ["exact", "summed"])
@pytest.mark.parametrize("hvp,tol", [("finite_difference", 1e-5), ("central_difference", 1e-8)])
def test_forward_hypergradient_with_fd_products_matches_autodiff(tangent, hvp, tol):
    # a BatchNorm net, a dropout net and a hyperparameter inside the loss (mixed term, autodiff)
    x, y = data()
    space = hd.Space({"lr": hd.Real(0.1, low=1e-4, high=1.0, log=True, per="layer"),
                      "l2": hd.Real(1e-2, low=1e-6, high=1.0, log=True)})
    for p in (_bn_problem(), problem(_dropout_mlp(), _lr_space(), hd.optim.SGD(momentum=0.9)),
              problem(mlp(), space, hd.optim.SGD(momentum=0.9), regularizer=_l2)):
        torch.manual_seed(0)  # the same dropout masks in both runs
        want = hd.hypergrad(p, STEPS, "forward", tangent=tangent)
        torch.manual_seed(0)
        got = hd.hypergrad(p, STEPS, "forward", tangent=tangent, hvp=hvp)
        assert float((_flat(got) - _flat(want)).norm() / _flat(want).norm()) < tol
        assert got.value == pytest.approx(want.value, rel=1e-12)


def test_the_steps_gradient_has_a_graph_only_for_a_mixed_term(monkeypatch):
    space = hd.Space({"lr": hd.Real(0.1, low=1e-4, high=1.0, log=True),
                      "l2": hd.Real(1e-2, low=1e-6, high=1.0, log=True)})
    for p, mixed in ((problem(mlp(), _lr_space(), hd.optim.SGD()), False),
                     (problem(mlp(), space, hd.optim.SGD(), regularizer=_l2), True)):
        graphs = []
        real = p.train_grad

        def spy(*a, create_graph=False, graphs=graphs, real=real, **kw):
            graphs.append(create_graph)
            return real(*a, create_graph=create_graph, **kw)

        monkeypatch.setattr(p, "train_grad", spy)
        engine = ForwardTangent(p, STEPS, hvp="finite_difference")
        leaves = {k: v.detach() for k, v in hd.space.flatten(p.real_hparams()).items()}
        state, carry = p.init_state(), engine.init()
        for t in range(3):
            graphs.append("step")
            state, carry, _ = engine.step(carry, state, p.train_batch(t), leaves, t)
        assert engine._mixed is mixed
        steps = [graphs[i + 1] for i, g in enumerate(graphs) if g == "step"]
        # the first step looks for mixed terms with a graph; after it, only where there is one
        assert steps == [True, mixed, mixed]
        # one perturbed gradient (no graph) per nonzero column from step 1 on
        assert engine.hvps == sum(1 for g in graphs if g is False) - (0 if mixed else 2)


def test_uoro_with_fd_products_is_unbiased_for_the_exact_hypergradient():
    p = problem(mlp(), _lr_space(), hd.optim.SGD())
    exact = hd.hypergrad(p, STEPS, "forward")
    engine = UOROTangent(p, STEPS, samples=400, seed=0, centred=True, hvp="finite_difference")
    leaves = {k: v.detach() for k, v in hd.space.flatten(p.real_hparams()).items()}
    state, carry = p.init_state(), engine.init()
    for t in range(STEPS):
        state, carry, _ = engine.step(carry, state, p.train_batch(t), leaves, t)
    _, c, _ = p.val_grad(state.params, state.buffers, p.val_batch(STEPS))
    est = engine.sample_estimates(carry, c)
    mean, se = est.mean(0), est.std(0) / est.shape[0] ** 0.5
    flat = hd.space.flatten(exact.grad)
    want = torch.stack([flat[col.members[0].leaf].reshape(-1)[col.members[0].index]
                        for col in engine.columns])
    assert ((mean - want).abs() <= 4 * se + 1e-9).all(), (mean, want, se)
    assert float((est[0] - want).norm() / want.norm()) > 1e-3
    assert engine.hvps > 0


def test_hvp_option_is_validated_everywhere():
    p = problem(mlp(), _lr_space(), hd.optim.SGD())
    for bad in ("fd", "Autodiff", True, None):
        with pytest.raises(hd.HyperparameterError, match="hvp="):
            hd.hypergrad(p, 2, "forward", hvp=bad)
        with pytest.raises(hd.HyperparameterError, match="hvp="):
            hd.OnlineTuner(p, hvp=bad)
        with pytest.raises(hd.HyperparameterError, match="hvp="):
            forward_engine(p, 2, "uoro", hvp=bad)
    with pytest.raises(hd.HyperparameterError, match="compile=True"):
        ForwardTangent(p, 2, compile=True, hvp="central_difference")
    with pytest.raises(hd.HyperparameterError, match="truncated"):
        hd.OnlineTuner(p, method="truncated", hvp="finite_difference")
    with pytest.raises(hd.HyperparameterError, match="unknown option"):
        hd.hypergrad(p, 2, "reverse", hvp="finite_difference")
    tuner = hd.OnlineTuner(p, tangent="uoro", hvp="central_difference")
    assert tuner.engine.hvp == "central_difference" and tuner.config["hvp"] == "central_difference"
    assert hd.OnlineTuner(p, method="greedy", hvp="finite_difference").engine.hvp == \
        "finite_difference"


def test_difference_products_warn_on_a_model_with_kinks():
    kinked = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Hardswish(),
                                 torch.nn.Linear(8, 3)).double()
    p = problem(kinked, _lr_space(), hd.optim.SGD())
    with pytest.warns(UserWarning, match=r"Hardswish module '1', whose active piece is not"):
        hd.OnlineTuner(p, tangent="uoro", hvp="finite_difference")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hd.OnlineTuner(p, tangent="uoro")  # exact products: no warning
        hd.OnlineTuner(problem(mlp(), _lr_space(), hd.optim.SGD()), hvp="central_difference")


def test_fd_product_defaults():
    p = problem(mlp(), _lr_space(), hd.optim.SGD())
    state, batch, hp, v = _at_step(p, 1)
    _, g0, rng = _autodiff_hvp(p, state, batch, hp, v)
    args = (p, state.params, state.buffers, batch, hp, v)
    # one-sided by default, which needs the step's gradient (the message names it)
    with pytest.raises(hd.HyperparameterError, match=r"needs grad0 = ∇L\(θ\)"):
        finite_difference_hvp(*args)
    # the default ε is fd_epsilon's for the kind of difference asked for
    for central in (False, True):
        eps = fd_epsilon(state.params, v, central)
        default = finite_difference_hvp(*args, g0, central, rng=rng)
        given = finite_difference_hvp(*args, g0, central, eps=eps, rng=rng)
        assert all(torch.equal(default[n], given[n]) for n in given)


def _kinked_convnet(inplace=False):
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(inplace=inplace),
        torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(4 * 2 * 2, 8),
        torch.nn.LeakyReLU(0.1), torch.nn.Linear(8, 3)).double()


@pytest.mark.parametrize("inplace", [False, True])
def test_frozen_kinks_make_difference_products_exact_on_a_relu_maxpool_net(inplace):
    from hyperdescent.hypergrad.kinks import KinkPatterns
    x, y = image_data()
    p = problem(_kinked_convnet(inplace), _lr_space(), hd.optim.SGD(momentum=0.9), x=x, y=y)
    state, batch, hp, v = _at_step(p)
    want, g0, rng = _autodiff_hvp(p, state, batch, hp, v)
    kinks = KinkPatterns(p.model)
    assert len(kinks.modules) == 3
    params = {n: t.detach().requires_grad_(True) for n, t in state.params.items()}
    with kinks.record():
        _, g_rec, _, _ = p.train_grad(params, state.buffers, batch, hp)
    assert all(torch.equal(g_rec[n], g0[n]) for n in g0)  # recording changes nothing
    # unfrozen, every kink the shifted weights cross adds jump/ε: the error grows as ε
    # shrinks; with the pieces recorded at θ replayed, it falls as O(ε²)
    args = (p, state.params, state.buffers, batch, hp, v, g0, True)
    loose = [_rel(finite_difference_hvp(*args, eps=e, rng=rng), want) for e in (1e-2, 1e-3)]
    frozen = [_rel(finite_difference_hvp(*args, eps=e, rng=rng, kinks=kinks), want)
              for e in (1e-2, 1e-3)]
    assert loose[1] > loose[0] > 0.5, loose
    assert frozen[1] < 3e-5 and 50 < frozen[0] / frozen[1] < 200, frozen
    one_sided = finite_difference_hvp(p, state.params, state.buffers, batch, hp, v, g0,
                                      rng=rng, kinks=kinks)
    assert _rel(one_sided, want) < 1e-6
    assert p.model[1].inplace == inplace  # put back as it was
    assert p.model[2].return_indices is False


def test_frozen_kinks_follow_a_module_called_twice():
    from hyperdescent.hypergrad.kinks import KinkPatterns
    torch.manual_seed(2)
    relu = torch.nn.ReLU(inplace=True)  # one module, two calls (as torchvision's blocks do)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), relu, torch.nn.Linear(8, 8), relu,
                              torch.nn.Linear(8, 3)).double()
    p = problem(net, _lr_space(), hd.optim.SGD())
    state, batch, hp, v = _at_step(p)
    want, g0, rng = _autodiff_hvp(p, state, batch, hp, v)
    kinks = KinkPatterns(p.model)
    params = {n: t.detach().requires_grad_(True) for n, t in state.params.items()}
    with kinks.record():
        p.train_grad(params, state.buffers, batch, hp)
    assert len(kinks.modules) == 1 and len(kinks.patterns) == 2
    got = finite_difference_hvp(p, state.params, state.buffers, batch, hp, v, g0, True,
                                eps=1e-3, rng=rng, kinks=kinks)
    assert _rel(got, want) < 3e-5
    loose = finite_difference_hvp(p, state.params, state.buffers, batch, hp, v, g0, True,
                                  eps=1e-3, rng=rng)
    assert _rel(loose, want) > 1.0  # kinks crossed: what the replay is for


def test_forward_hypergradient_with_frozen_kinks_matches_autodiff():
    x, y = image_data()
    p = problem(_kinked_convnet(), _lr_space(), hd.optim.SGD(momentum=0.9), x=x, y=y)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ReLU, LeakyReLU and MaxPool are frozen: no warning
        got = hd.hypergrad(p, STEPS, "forward", hvp="central_difference")
    want = hd.hypergrad(p, STEPS, "forward")
    assert float((_flat(got) - _flat(want)).norm() / _flat(want).norm()) < 1e-6
