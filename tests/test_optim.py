import pytest
import torch

import hyperdescent as hd


def conv_net():
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 4)
    ).double()


CASES = [
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, weight_decay=1e-2)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=1e-3)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    ("Adam", dict(lr=1e-2)),
    ("Adam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
    ("RMSprop", dict(lr=1e-3)),
    ("RMSprop", dict(lr=1e-3, alpha=0.9, momentum=0.8, weight_decay=1e-3)),
    ("RMSprop", dict(lr=1e-3, centered=True, momentum=0.5)),
]


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_matches_torch_optim_for_100_steps(name, kw):
    x = torch.randn(100, 16, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (100, 16))
    ref = conv_net()
    topt = getattr(torch.optim, name)(ref.parameters(), **kw)
    model = conv_net()
    opt = getattr(hd.optim, name)(**kw)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = opt.init(params)
    for t in range(100):
        topt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x[t]), y[t]).backward()
        topt.step()
        p = {n: v.requires_grad_(True) for n, v in params.items()}
        loss = torch.nn.functional.cross_entropy(torch.func.functional_call(model, p, (x[t],)), y[t])
        grads = dict(zip(p, torch.autograd.grad(loss, list(p.values()))))
        with torch.no_grad():
            params, state = opt.update({n: v.detach() for n, v in p.items()}, state, grads)
    for n, p in ref.named_parameters():
        rel = ((params[n] - p).norm() / p.norm()).item()
        assert rel < 1e-10, (n, rel)


HP_CASES = [
    ("SGD", dict(momentum=0.9), ["lr", "momentum", "weight_decay", "dampening"]),
    ("SGD", dict(momentum=0.9, nesterov=True), ["lr", "momentum", "weight_decay"]),
    ("Adam", dict(), ["lr", "beta1", "beta2", "eps", "weight_decay"]),
    ("AdamW", dict(), ["lr", "beta1", "weight_decay"]),
    ("RMSprop", dict(momentum=0.5, centered=True), ["lr", "alpha", "momentum", "weight_decay"]),
]


@pytest.mark.parametrize("name,kw,hps", HP_CASES, ids=[c[0] for c in HP_CASES])
@pytest.mark.parametrize("shape", ["scalar", "layer", "element"])
def test_update_gradcheck_wrt_every_hyperparameter(name, kw, hps, shape):
    torch.manual_seed(0)
    params = {"a": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64)}
    opt = getattr(hd.optim, name)(**kw)
    base = {"lr": 0.1, "momentum": 0.8, "weight_decay": 0.05, "dampening": 0.1, "beta1": 0.85,
            "beta2": 0.95, "eps": 1e-3, "alpha": 0.9}

    def make(v):
        if shape == "scalar":
            return torch.tensor(v, dtype=torch.float64)
        if shape == "layer":
            return {n: torch.tensor(v, dtype=torch.float64) for n in params}
        return {n: torch.full(p.shape, v, dtype=torch.float64) for n, p in params.items()}

    state = opt.init(params, hp_names=hps)
    grads0 = {n: torch.randn_like(p) for n, p in params.items()}
    hp0 = {h: make(base[h]) for h in hps}
    params, state = opt.update(params, state, grads0, hp0)  # past step 0 so every path is live
    grads = {n: torch.randn_like(p) for n, p in params.items()}
    for h in hps:
        leaf = hp0[h]
        inputs = (leaf,) if isinstance(leaf, torch.Tensor) else tuple(leaf.values())
        inputs = tuple(t.clone().requires_grad_(True) for t in inputs)

        def f(*xs, h=h, leaf=leaf):
            v = xs[0] if isinstance(leaf, torch.Tensor) else dict(zip(leaf, xs))
            new_p, new_s = opt.update(params, state, grads, {**hp0, h: v})
            return tuple(new_p.values()) + tuple(
                x for d in new_s.values() if isinstance(d, dict) for x in d.values())

        assert torch.autograd.gradcheck(f, inputs), h


def test_unknown_optimizer_argument():
    with pytest.raises(ValueError, match="unknown argument.*'mom'"):
        hd.optim.SGD(mom=0.9)


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
@pytest.mark.parametrize("extra", [{"beta2": 1.0}, {"beta1": None}, {"beta1": 0.5, "beta2": 0.5}])
def test_betas_with_beta1_or_beta2_is_refused_naming_both(cls, extra):
    """Found by test_fuzz: the check read betas while the optimizer used beta2=1.0 (NaN)."""
    with pytest.raises(ValueError, match=r"give betas or beta"):
        getattr(hd.optim, cls)(betas=(0.9, 0.99), **extra)
    assert getattr(hd.optim, cls)(betas=(0.9, 0.99)).fixed["beta2"] == 0.99


def test_flat_views_are_made_on_first_read_and_behave_as_a_dict():
    """FlatViews: no views until read, then the same views as unflat; copies, pickles and
    comparisons see values; common_base returns the vector without making views."""
    import copy
    import pickle

    from hyperdescent.optim.base import FlatViews, common_base, unflat

    like = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    flat = torch.arange(9.0)
    fv = FlatViews(flat, like)
    assert common_base(fv) is flat and list(fv) == ["w", "b"] and len(fv) == 2
    assert dict.__getitem__(fv, "w") is None  # nothing made yet
    expected = unflat(flat, like)
    assert torch.equal(fv["w"], expected["w"]) and fv["w"]._base is flat
    for made in (dict(FlatViews(flat, like)), {**FlatViews(flat, like)},
                 FlatViews(flat, like).copy(), copy.deepcopy(FlatViews(flat, like)),
                 pickle.loads(pickle.dumps(FlatViews(flat, like))),
                 dict(FlatViews(flat, like).items())):
        assert type(made) is dict and all(torch.equal(made[k], expected[k]) for k in like)
    assert [v.shape for v in FlatViews(flat, like).values()] == [(2, 3), (3,)]
    assert FlatViews(flat, like).get("b") is not None
    other = FlatViews(flat, like)
    other["b"] = torch.ones(3)  # a write first makes the views, then replaces one
    assert torch.equal(other["w"], expected["w"]) and torch.equal(other["b"], torch.ones(3))


def test_flat_sgd_step_hands_back_vectors_without_making_views():
    """In a graph, SGD's flat step returns weights and momentum buffers as FlatViews; the next
    step reads them back whole, so the buffer's per-parameter views are never made."""
    from hyperdescent.optim.base import FlatViews

    torch.manual_seed(0)
    params = {"a": torch.randn(3, 2, requires_grad=True), "b": torch.randn(2, requires_grad=True)}
    # the kernels a problem tuning one global lr chooses
    opt = hd.optim.SGD(lr=0.1, momentum=0.9).specialized(scalar_hparams=True, tuned=["lr"])
    hp = {"lr": torch.tensor(0.1, requires_grad=True)}
    state = opt.init(params)
    for _ in range(3):
        grads = {n: 2 * p for n, p in params.items()}  # the gradient of the squared norm
        params, state = opt.update(params, state, grads, hp)
        buf = state["momentum_buffer"]
        assert isinstance(params, FlatViews) and isinstance(buf, FlatViews)
    assert all(dict.__getitem__(buf, n) is None for n in buf)  # never read, never made
    expected = {n: p.detach() for n, p in params.items()}
    torch.manual_seed(0)  # the same three steps without a graph, per parameter
    plain = {"a": torch.randn(3, 2), "b": torch.randn(2)}
    ref_state = opt.init(plain)
    with torch.no_grad():
        for _ in range(3):
            plain, ref_state = opt.update(plain, ref_state, {n: 2 * p for n, p in plain.items()},
                                          {"lr": torch.tensor(0.1)})
    assert all(torch.allclose(expected[n], plain[n], rtol=0, atol=1e-6) for n in plain)


@pytest.mark.parametrize("kw,hp", [
    (dict(lr=0.1), {}),
    (dict(lr=0.1, weight_decay=1e-2), {"lr": 0.05}),
    (dict(lr=0.1, momentum=0.9), {"lr": "tensor", "weight_decay": "tensor"}),
    (dict(lr=0.1, momentum=0.9, weight_decay=1e-3), {"momentum": "tensor"}),
    (dict(lr=0.1, momentum=0.9, dampening=0.3), {}),  # outside: per-parameter loop
    (dict(lr=0.1, momentum=0.9, nesterov=True), {}),  # outside: per-parameter loop
])
def test_sgd_foreach_update_is_the_per_parameter_loop(kw, hp, monkeypatch):
    """Without a graph, SGD's one-call-per-op update gives bit for bit the per-parameter loop's
    weights and buffers over 4 steps, and is taken exactly where it applies."""
    from hyperdescent.optim import SGD

    torch.manual_seed(0)
    params0 = {"a": torch.randn(3, 2), "b": torch.randn(2), "c": torch.randn(4, 3)}
    hp = {k: torch.tensor(0.07) if v == "tensor" else v for k, v in hp.items()}
    used = []
    fast = SGD._foreach_update

    def counted(self, *args):
        result = fast(self, *args)
        used.append(result is not None)
        return result

    monkeypatch.setattr(SGD, "_foreach_update", counted)
    out = []
    for on in (True, False):
        # as a problem with one scalar per hyperparameter chooses its kernels / the reference
        opt = SGD(**kw).specialized(scalar_hparams=True, tuned=list(hp)) if on else SGD(**kw)
        params, state = dict(params0), opt.init(params0, hp_names=list(hp))
        with torch.no_grad():
            for t in range(4):
                grads = {n: torch.sin(p * (t + 1)) for n, p in params.items()}
                params, state = opt.update(params, state, grads, hp)
        out.append([*params.values(), *state.get("momentum_buffer", {}).values()])
    assert all(torch.equal(x, y) for x, y in zip(*out))
    applies = not kw.get("nesterov") and not kw.get("dampening")
    # chosen once: where it does not apply the kernel is never even tried
    assert used == ([True] * 4 if applies else [])
