import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hyperdescent as hd
from hyperdescent.errors import HyperparameterError

BOUNDED = [
    hd.Real(0.05, low=1e-5, high=2.0, log=True),
    hd.Real(0.9, low=0.0, high=0.999),
    hd.Real(1.0, low=0.5),
    hd.Real(-1.0, high=3.0),
    hd.Real(0.3),
    hd.Real(3.0, low=1.0, log=True),
]


@pytest.mark.parametrize("hp", BOUNDED, ids=lambda h: h.transform)
@settings(max_examples=60, deadline=None)
@given(raw=st.floats(-60, 60))
def test_natural_always_inside_bounds_with_finite_gradient(hp, raw):
    r = torch.tensor(raw, dtype=torch.float64, requires_grad=True)
    v = hp.to_natural(r)
    assert hp.low <= v.item() <= hp.high
    (g,) = torch.autograd.grad(v, r)
    assert torch.isfinite(g)


@pytest.mark.parametrize("hp", BOUNDED, ids=lambda h: h.transform)
@settings(max_examples=60, deadline=None)
@given(u=st.floats(0.001, 0.999))
def test_raw_natural_round_trip(hp, u):
    lo = hp.low if math.isfinite(hp.low) else -10.0
    hi = hp.high if math.isfinite(hp.high) else lo + 20.0
    value = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))) if hp.log else lo + u * (hi - lo)
    v = torch.tensor(value, dtype=torch.float64)
    back = hp.to_natural(hp.to_raw(v))
    assert torch.allclose(back, v, rtol=1e-9, atol=1e-12)


def test_transform_kinds():
    assert hd.Real(0.1, low=1e-3, high=1, log=True).transform == "log"
    assert hd.Real(0.5, low=0, high=1).transform == "logit"
    assert hd.Real(1.0, low=0).transform == "softplus_low"
    assert hd.Real(-1.0, high=0).transform == "softplus_high"
    assert hd.Real(0.0).transform == "identity"


def _model():
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def test_value_shapes_of_api():
    space = hd.Space({
        "lr": hd.Real(0.05, low=1e-5, high=2.0, log=True),
        "wd": hd.Real(1e-4, low=1e-8, high=1e-1, log=True, per="layer"),
        "sched": hd.Real(0.1, low=1e-4, high=1.0, log=True, schedule=hd.Piecewise(10)),
        "pp": hd.Real(0.1, low=0.0, high=1.0, per="parameter", schedule=hd.Piecewise(3)),
    })
    values = space.bind(_model()).initial()
    assert values["lr"].shape == ()
    assert set(values["wd"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert values["wd"]["0.weight"].shape == ()
    assert values["sched"].shape == (10,)
    assert values["pp"]["0.weight"].shape == (3, 4, 3)


def test_piecewise_block_rule():
    sched = hd.Piecewise(4)
    assert [sched.block(t, 10) for t in range(10)] == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    assert hd.Piecewise(1).block(5, 10) == 0


def test_layer_space_without_model_is_refused():
    space = hd.Space({"wd": hd.Real(1e-4, low=1e-8, high=1e-1, log=True, per="layer")})
    with pytest.raises(HyperparameterError, match="'wd'.*needs a model"):
        space.bind(None)


def test_unknown_name_and_bounds_errors():
    space = hd.Space({"lr": hd.Real(0.05, low=1e-5, high=2.0, log=True)})
    bound = space.bind(None)
    vals = bound.initial()
    with pytest.raises(HyperparameterError, match="unknown hyperparameter 'momentum'.*lr"):
        bound.coerce({"momentum": 0.9}, vals)
    with pytest.raises(HyperparameterError, match="'lr'.*outside its bounds"):
        bound.coerce({"lr": 5.0}, vals)
    with pytest.raises(HyperparameterError, match="outside"):
        hd.Real(3.0, low=0, high=1)
    with pytest.raises(HyperparameterError, match="log=True needs low > 0"):
        hd.Real(0.1, low=0.0, high=1.0, log=True)


def test_blackbox_kinds_refused_by_gradient_methods():
    space = hd.Space({"lr": hd.Real(0.1, low=1e-3, high=1, log=True),
                      "width": hd.Int(16, low=4, high=64), "opt": hd.Categorical(["sgd", "adam"])})
    with pytest.raises(HyperparameterError, match="width.*opt.*forward"):
        space.require_differentiable("forward")


def test_project_raw_keeps_log_bounds():
    hp = hd.Real(0.1, low=1e-3, high=1.0, log=True)
    raw = torch.tensor([-50.0, 50.0])
    assert torch.allclose(hp.to_natural(hp.project_raw(raw)), torch.tensor([1e-3, 1.0]))


@pytest.mark.parametrize("hp", BOUNDED, ids=lambda h: h.transform)
def test_closed_form_dnatural_matches_autograd(hp):
    raw = torch.linspace(-5, 5, 11, dtype=torch.float64).requires_grad_(True)
    inside = raw.detach()
    if hp.transform == "log":
        raw = (torch.linspace(0.1, 0.9, 11, dtype=torch.float64)
               * (math.log(hp.high) - math.log(hp.low)) + math.log(hp.low)).requires_grad_(True)
        inside = raw.detach()
    (g,) = torch.autograd.grad(hp.to_natural(raw).sum(), raw)
    assert torch.allclose(hp.dnatural_draw(inside), g, rtol=1e-12)
