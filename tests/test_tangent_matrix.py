"""Every optimizer option x every tunable hyperparameter: forward mode (the hand-written tangent
rules) against reverse mode (autograd through `update`), float64, 1e-9 relative.

The matrix is generated, not hand-picked: for each optimizer, every combination of its fixed
options (the valid ones) with each hyperparameter tuned alone and with all of them tuned at once.
Also here: the summed tangent against exact on a one-tensor model and against an independent
per-layer read-back, and truncated reverse (window < T) against a reference that shares no code
with the library (`torch.func` through a hand-written unroll).
"""

import itertools

import pytest
import torch
from helpers import data, logreg, mlp
from torch.func import functional_call, jvp

import hyperdescent as hd

STEPS = 4

BOUNDS = {
    "lr": lambda v: hd.Real(v, low=1e-4, high=1.0, log=True),
    "weight_decay": lambda v: hd.Real(v, low=1e-6, high=1.0, log=True),
    "momentum": lambda v: hd.Real(v, low=0.0, high=0.99),
    "dampening": lambda v: hd.Real(v, low=0.0, high=0.9),
    "beta1": lambda v: hd.Real(v, low=0.0, high=0.999),
    "beta2": lambda v: hd.Real(v, low=0.0, high=0.9999),
    "eps": lambda v: hd.Real(v, low=1e-8, high=1.0, log=True),
    "alpha": lambda v: hd.Real(v, low=0.5, high=0.999),
}
# initial values of the tuned hyperparameters: large enough that each one's effect on the
# validation loss is well above float error (eps 1e-3, not 1e-8)
START = {"lr": 0.1, "weight_decay": 0.05, "momentum": 0.8, "dampening": 0.3, "beta1": 0.8,
         "beta2": 0.95, "eps": 1e-3, "alpha": 0.9}
LR_START = {"SGD": 0.1, "Adam": 0.02, "AdamW": 0.02, "RMSprop": 0.01}


def _options(name):
    """Every valid combination of the optimizer's fixed options."""
    if name == "SGD":
        out = []
        for mu, damp, nest, wd in itertools.product((0.0, 0.9), (0.0, 0.3), (False, True),
                                                    (0.0, 0.01)):
            if (nest and (mu == 0 or damp != 0)) or (mu == 0 and damp != 0):
                continue  # torch.optim.SGD's own rule: Nesterov needs momentum, no dampening
            out.append(dict(momentum=mu, dampening=damp, nesterov=nest, weight_decay=wd))
        return out
    if name in ("Adam", "AdamW"):
        return [dict(weight_decay=wd) for wd in (0.0, 0.01)]
    return [dict(centered=c, momentum=mu, weight_decay=wd)
            for c, mu, wd in itertools.product((False, True), (0.0, 0.5), (0.0, 0.01))]


TUNABLE = {
    "SGD": ("lr", "weight_decay", "momentum", "dampening"),
    "Adam": ("lr", "beta1", "beta2", "eps", "weight_decay"),
    "AdamW": ("lr", "beta1", "beta2", "eps", "weight_decay"),
    "RMSprop": ("lr", "alpha", "eps", "momentum", "weight_decay"),
}


def _matrix():
    cases = []
    for opt, names in TUNABLE.items():
        for options in _options(opt):
            # each alone, OHO's flagship pair (SGD's heavy-ball kernel), and all at once
            for tuned in [(n,) for n in names] + [("lr", "weight_decay"), names]:
                if tuned == ("dampening",) and options["momentum"] == 0:
                    continue  # no momentum buffer: dampening has no effect to test
                tag = "+".join(tuned) if len(tuned) < len(names) else "all"
                oid = ",".join(f"{k}={v}" for k, v in options.items())
                cases.append(pytest.param(opt, options, tuned, id=f"{opt}[{oid}]-{tag}"))
    return cases


def _build(opt_name, options, tuned, model=logreg, per=None):
    x, y = data(n=40)
    space = {}
    for n in tuned:
        start = LR_START[opt_name] if n == "lr" else START[n]
        hp = BOUNDS[n](start)
        if per and n in per:
            hp = hd.Real(start, low=hp.low, high=hp.high, log=hp.log, per=per[n])
        space[n] = hp
    fixed = dict(options)
    if "lr" not in tuned:
        fixed["lr"] = LR_START[opt_name]
    return hd.Problem(model(), optimizer=getattr(hd.optim, opt_name)(**fixed),
                      space=hd.Space(space), train=(x, y), val=(x[:16] + 0.1, y[:16]),
                      batch_size=10, seed=2)


def _leaves(grad):
    """(name, tensor) for every leaf of a result's grad dict, in a fixed order."""
    out = []
    for name in sorted(grad):
        v = grad[name]
        if isinstance(v, dict):
            out += [(f"{name}/{p}", v[p]) for p in sorted(v)]
        else:
            out.append((name, v))
    return out


def _assert_close(got, ref, rel=1e-9, what=""):
    """Each leaf of `got` within `rel` of `ref` (relative to that leaf, or to the whole
    gradient where the leaf is tiny), and `ref` itself not zero."""
    total = torch.cat([r.reshape(-1) for _, r in _leaves(ref)]).norm().item()
    assert total > 1e-10, f"{what}: the reference hypergradient is zero, the case tests nothing"
    for (k, g), (_, r) in zip(_leaves(got), _leaves(ref)):
        err = (g - r).norm().item()
        scale = max(r.norm().item(), 1e-6 * total)
        assert err <= rel * scale, (what, k, g, r, err / scale)


@pytest.mark.parametrize("opt,options,tuned", _matrix())
def test_forward_equals_reverse(opt, options, tuned):
    """forward (tangent rule) == reverse (autograd through update) for every option x hp."""
    p = _build(opt, options, tuned)
    fwd = hd.hypergrad(p, steps=STEPS, method="forward")
    rev = hd.hypergrad(p, steps=STEPS, method="reverse")
    assert fwd.value == pytest.approx(rev.value, rel=1e-12)
    _assert_close(fwd.grad, rev.grad, what="forward vs reverse")
    # checkpointing's first pass steps without a graph (the optimizers' no-graph kernels)
    ck = hd.hypergrad(p, steps=STEPS, method="reverse", checkpoint_every=2)
    assert ck.value == pytest.approx(rev.value, rel=1e-12)
    _assert_close(ck.grad, rev.grad, what="checkpointed vs reverse")


GRANULAR = [
    ("SGD", dict(momentum=0.9), {"lr": "layer", "weight_decay": "parameter"}),
    ("SGD", dict(momentum=0.9, nesterov=True), {"momentum": "layer", "lr": "layer"}),
    ("SGD", dict(momentum=0.9, dampening=0.3), {"dampening": "layer", "weight_decay": "layer"}),
    ("Adam", {}, {"lr": "layer", "beta1": "layer", "eps": "parameter"}),
    ("AdamW", {}, {"weight_decay": "layer", "beta2": "layer"}),
    ("RMSprop", dict(centered=True, momentum=0.5), {"alpha": "layer", "eps": "layer",
                                                    "momentum": "parameter"}),
    ("RMSprop", dict(momentum=0.5), {"lr": "layer", "weight_decay": "layer"}),
    ("Adam", dict(weight_decay=0.01), {"beta2": "parameter", "weight_decay": "layer"}),
    ("AdamW", {}, {"lr": "layer", "eps": "layer"}),
]


@pytest.mark.parametrize("opt,options,per", GRANULAR,
                         ids=[f"{o}-{'-'.join(p)}" for o, _, p in GRANULAR])
def test_forward_equals_reverse_per_layer_and_per_parameter(opt, options, per):
    """The tangent rules with per-layer and per-element hyperparameter tensors."""
    p = _build(opt, options, tuple(per), model=mlp, per=per)
    fwd = hd.hypergrad(p, steps=STEPS, method="forward")
    rev = hd.hypergrad(p, steps=STEPS, method="reverse")
    _assert_close(fwd.grad, rev.grad, what="forward vs reverse")


def test_forward_equals_reverse_on_validation_minibatches():
    """val_batch_size below the validation set: both read the same validation batch T."""
    x, y = data(n=40)
    p = hd.Problem(mlp(), optimizer=hd.optim.SGD(momentum=0.9),
                   space=hd.Space({"lr": BOUNDS["lr"](0.1),
                                   "weight_decay": BOUNDS["weight_decay"](0.05)}),
                   train=(x, y), val=(x + 0.1, y), batch_size=10, val_batch_size=8, seed=2)
    fwd = hd.hypergrad(p, steps=STEPS, method="forward")
    rev = hd.hypergrad(p, steps=STEPS, method="reverse")
    xv, yv = p.val_batch(STEPS)
    assert len(yv) == 8
    assert fwd.value == pytest.approx(rev.value, rel=1e-12)
    _assert_close(fwd.grad, rev.grad, what="forward vs reverse")


# -- an independent reference: a hand-written SGD unroll differentiated by torch.func ----------
def _sgd_unroll(model, problem, lr, wd, mu, t0, t1, params, buf):
    """Steps t0..t1-1 of heavy-ball SGD (torch.optim's rule) on the problem's batches, written
    out here: lr, wd are dicts name -> value (per layer) and mu a number."""
    def loss_fn(prm, x, y):
        return torch.nn.functional.cross_entropy(functional_call(model, prm, (x,)), y)

    for t in range(t0, t1):
        x, y = problem.train_batch(t)
        g = torch.func.grad(loss_fn)(params, x, y)
        d = {n: g[n] + wd[n] * params[n] for n in params}
        buf = d if (t == 0 or buf is None) else {n: mu * buf[n] + d[n] for n in params}
        params = {n: params[n] - lr[n] * buf[n] for n in params}
    return params, buf


def _sgd_problem(model_fn, per_lr="global", momentum=0.9, lr=0.1, wd=0.01):
    x, y = data(n=40)
    space = hd.Space({"lr": hd.Real(lr, low=1e-4, high=1.0, log=True, per=per_lr),
                      "weight_decay": hd.Real(wd, low=1e-6, high=1.0, log=True)})
    return hd.Problem(model_fn(), optimizer=hd.optim.SGD(momentum=momentum), space=space,
                      train=(x, y), val=(x[:16] + 0.1, y[:16]), batch_size=10, seed=2)


def _summed_reference(model_fn, per, steps=STEPS):
    """For a per-layer (or per-parameter) lr: the summed tangent Z = dθ_T/dε along
    lr_l + ε for every layer at once, by torch.func.jvp through the hand-written unroll, and
    the gradient of E at θ_T. Returns (Z, c)."""
    p = _sgd_problem(model_fn, per_lr=per)
    model = model_fn()
    theta0 = {n: q.detach().clone() for n, q in model.named_parameters()}
    lr0, wd = 0.1, 0.01

    def final(eps):
        lr = {n: lr0 + eps for n in theta0}
        return _sgd_unroll(model, p, lr, dict.fromkeys(theta0, wd), 0.9, 0, steps,
                           theta0, None)[0]

    theta_T, Z = jvp(final, (torch.tensor(0.0, dtype=torch.float64),),
                     (torch.tensor(1.0, dtype=torch.float64),))
    xv, yv = p.val_batch(steps)
    c = torch.func.grad(lambda prm: torch.nn.functional.cross_entropy(
        functional_call(model, prm, (xv,)), yv))(theta_T)
    return p, Z, c


def test_summed_tangent_equals_exact_on_a_one_tensor_model():
    """One parameter tensor: one layer, so OHO's summed tangent is the exact hypergradient."""
    def one_tensor():
        torch.manual_seed(1)
        return torch.nn.Linear(5, 3, bias=False).double()

    p = _sgd_problem(one_tensor, per_lr="layer")
    summed = hd.hypergrad(p, steps=STEPS, method="forward", tangent="summed")
    exact = hd.hypergrad(p, steps=STEPS, method="forward", tangent="exact")
    rev = hd.hypergrad(p, steps=STEPS, method="reverse")
    _assert_close(summed.grad, exact.grad, rel=1e-12, what="summed vs exact")
    _assert_close(summed.grad, rev.grad, what="summed vs reverse")
    # and the hand-written reference: one layer, so Z.c is the whole hypergradient
    _, Z, c = _summed_reference(one_tensor, "layer")
    ref = sum((Z[n] * c[n]).sum() for n in Z)
    assert summed.grad["lr"]["weight"].item() == pytest.approx(ref.item(), rel=1e-9)


def test_summed_tangent_reads_back_each_layer_independently():
    """Several layers: the summed tangent of layer l's lr reads back <∇_l E, Z_l> with Z the
    tangent along all layers' lr at once, not the total over layers (an independent unroll)."""
    p, Z, c = _summed_reference(mlp, "layer")
    summed = hd.hypergrad(p, steps=STEPS, method="forward", tangent="summed")
    per_layer = {n: (Z[n] * c[n]).sum().item() for n in Z}
    values = list(per_layer.values())
    assert max(values) - min(values) > 1e-3 * max(abs(v) for v in values)  # layers differ
    for n, ref in per_layer.items():
        assert summed.grad["lr"][n].item() == pytest.approx(ref, rel=1e-9), n
    # the summed read-back is not the exact per-layer hypergradient (cross-layer terms)
    exact = hd.hypergrad(p, steps=STEPS, method="reverse")
    assert any(abs(summed.grad["lr"][n].item() - exact.grad["lr"][n].item())
               > 1e-6 * abs(exact.grad["lr"][n].item()) for n in per_layer)


def test_summed_tangent_reads_back_each_element_for_per_parameter_values():
    """per='parameter': element e of a summed tangent reads back ∇E_e · Z_e."""
    p, Z, c = _summed_reference(logreg, "parameter")
    summed = hd.hypergrad(p, steps=STEPS, method="forward", tangent="summed")
    for n in Z:
        ref = c[n] * Z[n]
        assert torch.allclose(summed.grad["lr"][n], ref, rtol=1e-9, atol=1e-14), n


@pytest.mark.parametrize("window", [1, 2, 3])
def test_truncated_window_below_T_matches_an_independent_unroll(window):
    """truncated(window=K < T): s_{T-K} held constant. Reference: the hand-written unroll to
    s_{T-K} without a graph, then torch.func.jvp along each hyperparameter through the last
    K steps only."""
    T = 5
    p = _sgd_problem(mlp)
    res = hd.hypergrad(p, steps=T, method="truncated", window=window)
    model = mlp()
    theta0 = {n: q.detach().clone() for n, q in model.named_parameters()}
    names = list(theta0)
    lr0, wd0 = 0.1, 0.01
    with torch.no_grad():
        start, buf = _sgd_unroll(model, p, dict.fromkeys(names, lr0), dict.fromkeys(names, wd0),
                                 0.9, 0, T - window, theta0, None)
    xv, yv = p.val_batch(T)

    def value(lr, wd):
        prm, _ = _sgd_unroll(model, p, dict.fromkeys(names, lr), dict.fromkeys(names, wd), 0.9,
                             T - window, T, start, buf)
        return torch.nn.functional.cross_entropy(functional_call(model, prm, (xv,)), yv)

    one, zero = (torch.tensor(v, dtype=torch.float64) for v in (1.0, 0.0))
    lr_t, wd_t = (torch.tensor(v, dtype=torch.float64) for v in (lr0, wd0))
    v, d_lr = jvp(value, (lr_t, wd_t), (one, zero))
    _, d_wd = jvp(value, (lr_t, wd_t), (zero, one))
    assert res.value == pytest.approx(v.item(), rel=1e-12)
    assert res.grad["lr"].item() == pytest.approx(d_lr.item(), rel=1e-9)
    assert res.grad["weight_decay"].item() == pytest.approx(d_wd.item(), rel=1e-9)
    # and it is a truncation: the full reverse hypergradient differs
    full = hd.hypergrad(p, steps=T, method="reverse")
    assert abs(full.grad["lr"].item() - d_lr.item()) > 1e-6 * abs(d_lr.item())


OPT_CASES = [("SGD", dict(momentum=0.9, dampening=0.3, weight_decay=0.01), ("lr", "momentum")),
             ("SGD", dict(momentum=0.9, nesterov=True), ("lr", "weight_decay", "momentum")),
             ("Adam", dict(weight_decay=0.01), ("lr", "beta1", "eps")),
             ("AdamW", {}, ("lr", "weight_decay", "beta2")),
             ("RMSprop", dict(centered=True, momentum=0.5), ("lr", "alpha", "momentum"))]


@pytest.mark.parametrize("opt,options,tuned", OPT_CASES, ids=[c[0] for c in OPT_CASES])
def test_optimizer_tangent_method_is_the_jvp_of_update(opt, options, tuned):
    """`opt.tangent(...)` (the optimizer's exact JVP, called directly, at a state after two
    steps) equals torch.func.jvp of `opt.update` along random tangents of every input."""
    g = torch.Generator().manual_seed(5)
    model = mlp()
    params = {n: q.detach().clone() for n, q in model.named_parameters()}

    def rnd(t):
        return torch.randn(t.shape, generator=g, dtype=torch.float64)

    o = getattr(hd.optim, opt)(**options)
    state = o.init(params, hp_names=tuned)
    hp = {n: torch.tensor(START[n] if n != "lr" else LR_START[opt], dtype=torch.float64)
          for n in tuned}
    for _ in range(2):
        params, state = o.update(params, state, {n: rnd(q) for n, q in params.items()}, hp)
    grads = {n: rnd(q) for n, q in params.items()}
    tens = {k: v for k, v in state.items() if isinstance(v, dict)}
    dp, dg = ({n: rnd(q) for n, q in params.items()} for _ in range(2))
    ds = {k: {n: rnd(x) for n, x in d.items()} for k, d in tens.items()}
    dh = {n: torch.tensor(0.3 + 0.1 * i, dtype=torch.float64) for i, n in enumerate(tuned)}

    def update(p_, s_, g_, h_):
        new_p, new_s = o.update(p_, {**state, **s_}, g_, h_)
        return new_p, {k: v for k, v in new_s.items() if isinstance(v, dict)}

    _, (ref_p, ref_s) = jvp(update, (params, tens, grads, hp), (dp, ds, dg, dh))
    dhp = {n: {p: v for p in params} for n, v in dh.items()}  # per-parameter view of λ's tangent
    got_p, got_s = o.tangent(params, state, grads, hp, dp, ds, dg, dhp)
    for n in params:
        assert torch.allclose(got_p[n], ref_p[n], rtol=1e-10, atol=1e-13), n
    for k in ref_s:
        for n in params:
            assert torch.allclose(got_s[k][n], ref_s[k][n], rtol=1e-10, atol=1e-13), (k, n)
