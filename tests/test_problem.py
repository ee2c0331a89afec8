import pytest
import torch
from helpers import data, mlp

import hyperdescent as hd
from hyperdescent.errors import DataError, HyperparameterError


def make(**kw):
    x, y = data()
    space = hd.Space({"lr": hd.Real(0.05, low=1e-4, high=1.0, log=True),
                      "weight_decay": hd.Real(1e-3, low=1e-6, high=1.0, log=True, per="layer")})
    args = dict(optimizer=hd.optim.SGD(momentum=0.9), space=space, train=(x, y),
                val=(x[:10], y[:10]), batch_size=16, seed=5)
    args.update(kw)
    return hd.Problem(mlp(), **args)


def test_batches_are_a_pure_function_of_seed_and_step():
    a, b = make(), make()
    for t in [7, 0, 3, 7, 12, 2]:
        xa, ya = a.train_batch(t)
        xb, yb = b.train_batch(t)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # each epoch is a permutation: 3 batches of 16 cover the 48 examples once
    seen = torch.cat([a.train_data.indices(t) for t in range(3)])
    assert sorted(seen.tolist()) == list(range(48))
    assert not torch.equal(make(seed=6).train_batch(0)[0], a.train_batch(0)[0])


def test_full_batch_when_batch_size_exceeds_data():
    p = make(batch_size=1000)
    x, _ = p.train_batch(5)
    assert len(x) == 48


def test_hparams_shapes_and_set():
    p = make()
    hp = p.hparams
    assert hp["lr"].shape == () and set(hp["weight_decay"]) == {"0.weight", "0.bias", "2.weight",
                                                                 "2.bias"}
    p.set_hparams({"lr": 0.1, "weight_decay": {"0.weight": 0.5}})
    assert p.hparams["lr"].item() == pytest.approx(0.1)
    assert p.hparams["weight_decay"]["0.weight"].item() == pytest.approx(0.5)
    assert p.hparams["weight_decay"]["2.bias"].item() == pytest.approx(1e-3)
    with pytest.raises(HyperparameterError, match="'lr'.*outside its bounds"):
        p.set_hparams({"lr": 3.0})
    with pytest.raises(HyperparameterError, match="unknown hyperparameter 'beta'"):
        p.set_hparams({"beta": 3.0})
    with pytest.raises(HyperparameterError, match="unknown parameter name.*'nope'"):
        p.set_hparams({"weight_decay": {"nope": 0.1}})


def test_dtype_and_device_follow_the_model():
    x, y = data()
    p = hd.Problem(mlp().float(), optimizer=hd.optim.SGD(), space=hd.Space({}),
                   train=(x, y), val=(x, y))
    assert p.train_batch(0)[0].dtype == torch.float32
    assert p.hparams == {}


def test_data_errors():
    x, y = data()
    with pytest.raises(DataError, match="'train' has 48 inputs but 47 targets"):
        make(train=(x, y[:-1]))
    with pytest.raises(DataError, match="'val' is empty"):
        make(val=(x[:0], y[:0]))
    with pytest.raises(DataError, match="'train' is empty"):
        make(train=torch.utils.data.TensorDataset(x[:0], y[:0]))


def test_indexable_dataset_and_stream():
    x, y = data()
    ds = [(x[i], y[i]) for i in range(len(x))]
    p = make(train=ds)
    assert p.train_batch(0)[0].shape == (16, 5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    s = make(train=loader)
    assert not s.replayable
    with pytest.raises(DataError, match="'reverse' must replay"):
        hd.hypergrad(s, steps=3, method="reverse")
    res = hd.hypergrad(s, steps=3, method="forward")
    assert torch.isfinite(res.grad["lr"])


def test_unused_hyperparameter_is_refused():
    x, y = data()
    with pytest.raises(HyperparameterError, match="'dropout' is used neither"):
        hd.Problem(mlp(), optimizer=hd.optim.SGD(), train=(x, y), val=(x, y),
                   space=hd.Space({"dropout": hd.Real(0.1, low=0.0, high=0.9)}))


def test_step_matches_torch_optim():
    p = make()
    state = p.init_state()
    ref = mlp()
    opt = torch.optim.SGD([{"params": [prm], "weight_decay": 1e-3} for prm in ref.parameters()],
                          lr=0.05, momentum=0.9)
    for t in range(5):
        state, _ = p.step(state, p.train_batch(t), p.hparams)
        x, y = p.train_batch(t)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        opt.step()
    for n, prm in ref.named_parameters():
        assert torch.allclose(state.params[n], prm, rtol=1e-12)


def test_a_parameter_the_loss_does_not_use_is_named():
    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used = torch.nn.Linear(4, 2)
            self.spare = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.used(x)

    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    p = hd.Problem(TwoHeads(), loss=torch.nn.functional.cross_entropy,
                   optimizer=hd.optim.SGD(lr=0.1), train=(x, y), val=(x, y), batch_size=8)
    with pytest.raises(hd.errors.HyperdescentError, match="spare.weight"):
        p.step(p.init_state(), p.train_batch(0), {})


def test_engine_vjp_equals_torch_autograd_grad():
    from hyperdescent import autodiff

    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(7, 5, dtype=torch.float64)
    loss = torch.tanh(x @ w + b).pow(2).sum()
    g = autodiff.grad(loss, [w, b, unused], create_graph=True)
    ref = torch.autograd.grad(loss, [w, b], create_graph=True)
    assert g[2] is None and all(torch.allclose(a, r) for a, r in zip(g[:2], ref))
    u = [torch.randn_like(w), torch.randn_like(b)]
    hv = autodiff.vjp(g[:2], [w, b], u, retain_graph=True)
    ref_hv = torch.autograd.grad(ref, [w, b], u)
    assert all(torch.allclose(a, r, rtol=1e-12) for a, r in zip(hv, ref_hv))


def test_forward_swaps_tensors_in_as_functional_call_does_and_restores_the_module():
    """The fast path for untied models: same output, same in-place buffer updates, the
    module's own tensors back in place afterwards, also when the forward raises."""
    from helpers import bn_convnet, image_data
    from torch.func import functional_call

    x, y = image_data()
    p = hd.Problem(bn_convnet(), optimizer=hd.optim.SGD(), train=(x, y), val=(x, y), batch_size=8)
    assert p._slots is not None
    own = {n: t for n, t in p.model.state_dict(keep_vars=True).items()}
    params = {n: t.detach() * 1.5 for n, t in p.params0.items()}
    for training in (True, False):
        fast = {n: b.clone() for n, b in p.buffers0.items()}
        ref = {n: b.clone() for n, b in p.buffers0.items()}
        out = p.forward(params, fast, x, training)
        expected = functional_call(p.model, (params, ref), (x,))
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        for n in fast:
            torch.testing.assert_close(fast[n], ref[n], rtol=0, atol=0)
    assert all(t is own[n] for n, t in p.model.state_dict(keep_vars=True).items())
    with pytest.raises(RuntimeError):
        p.forward(params, p.buffers0, x[:, :, :2, :2], True)  # too small for the conv
    assert all(t is own[n] for n, t in p.model.state_dict(keep_vars=True).items())


def test_tied_or_parametrized_models_take_functional_call():
    tied = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).double()
    tied[1].weight = tied[0].weight
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 4, (8,))
    assert hd.Problem(tied, optimizer=hd.optim.SGD(), train=(x, y), val=(x, y))._slots is None
    model = torch.nn.Linear(4, 4).double()
    torch.nn.utils.parametrize.register_parametrization(model, "weight", torch.nn.Identity())
    assert hd.Problem(model, optimizer=hd.optim.SGD(), train=(x, y), val=(x, y))._slots is None
