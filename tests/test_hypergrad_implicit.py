"""IFT hypergradients against the closed-form ridge hypergradient."""

import pytest
import torch

import hyperdescent as hd
from hyperdescent.errors import HyperparameterError


def ridge_data(n=40, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    y = x @ w + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    return x[:30], y[:30], x[30:], y[30:]


def mse(out, y):
    return ((out.squeeze(-1) - y) ** 2).mean()


def closed_form(alpha, x, y, xv, yv):
    """w*(α) of mean((Xw + b - y)^2) + α||θ||^2 and dE/dα of E = val MSE."""
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    xva = torch.cat([xv, torch.ones(len(xv), 1, dtype=x.dtype)], 1)
    n = len(x)
    A = 2 / n * xa.T @ xa + 2 * alpha * torch.eye(xa.shape[1], dtype=x.dtype)
    w = torch.linalg.solve(A, 2 / n * xa.T @ y)
    dE_dw = 2 / len(xv) * xva.T @ (xva @ w - yv)
    dw_da = -torch.linalg.solve(A, 2 * w)
    return (dE_dw @ dw_da).item()


def ridge_problem(steps_lr=0.2, how="regularizer"):
    x, y, xv, yv = ridge_data()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).double()
    if how == "regularizer":
        space = hd.Space({"l2": hd.Real(0.1, low=1e-6, high=10.0, log=True)})
        reg = lambda params, hp: hp["l2"] * sum((p * p).sum() for p in params.values())  # noqa
        opt = hd.optim.SGD(lr=steps_lr)
    else:  # coupled weight decay: ∇L + wd θ = 0, so wd = 2α
        space = hd.Space({"weight_decay": hd.Real(0.2, low=1e-6, high=10.0, log=True)})
        reg = None
        opt = hd.optim.SGD(lr=steps_lr)
    return hd.Problem(model, loss=mse, optimizer=opt, space=space, train=(x, y), val=(xv, yv),
                      batch_size=1000, regularizer=reg), (x, y, xv, yv)


def test_cg_and_neumann_match_closed_form_ridge():
    p, d = ridge_problem()
    exact = closed_form(0.1, *d)
    cg = hd.hypergrad(p, steps=400, method="implicit", solver="cg", iters=50, tol=1e-14)
    assert cg.grad["l2"].item() == pytest.approx(exact, rel=1e-6)
    neu = hd.hypergrad(p, steps=400, method="implicit", solver="neumann", terms=300)
    assert neu.grad["l2"].item() == pytest.approx(exact, rel=1e-3)
    assert cg.stats["hvps"] >= 1


def test_coupled_weight_decay_is_part_of_the_stationarity_condition():
    p, d = ridge_problem(how="weight_decay")
    exact = closed_form(0.1, *d) / 2  # d/d wd with wd = 2α
    res = hd.hypergrad(p, steps=400, method="implicit", solver="cg", iters=50, tol=1e-14)
    assert res.grad["weight_decay"].item() == pytest.approx(exact, rel=1e-6)


def test_implicit_approaches_reverse_as_T_grows():
    p, _ = ridge_problem(steps_lr=0.05)
    gaps = []
    for T in (20, 80, 320):
        imp = hd.hypergrad(p, steps=T, method="implicit", solver="cg", iters=50, tol=1e-14)
        rev = hd.hypergrad(p, steps=T, method="reverse")
        gaps.append(abs(imp.grad["l2"].item() - rev.grad["l2"].item()))
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 1e-3 * abs(rev.grad["l2"].item())


@pytest.mark.parametrize("opt,name", [(hd.optim.SGD(), "lr"), (hd.optim.SGD(momentum=0.9), "momentum"),
                                      (hd.optim.Adam(), "beta1")])
def test_refuses_optimizer_dynamics_hyperparameters(opt, name):
    x, y, xv, yv = ridge_data()
    lo, hi = (1e-4, 1.0) if name == "lr" else (0.0, 0.999)
    space = hd.Space({name: hd.Real(0.5 if name != "lr" else 0.1, low=lo, high=hi)})
    p = hd.Problem(torch.nn.Linear(4, 1).double(), loss=mse, optimizer=opt, space=space,
                   train=(x, y), val=(xv, yv))
    with pytest.raises(HyperparameterError, match=f"'{name}'"):
        hd.hypergrad(p, steps=2, method="implicit")


def test_refuses_decoupled_weight_decay():
    x, y, xv, yv = ridge_data()
    space = hd.Space({"weight_decay": hd.Real(0.1, low=1e-6, high=1.0, log=True)})
    p = hd.Problem(torch.nn.Linear(4, 1).double(), loss=mse, optimizer=hd.optim.AdamW(),
                   space=space, train=(x, y), val=(xv, yv))
    with pytest.raises(HyperparameterError, match="weight_decay"):
        hd.hypergrad(p, steps=2, method="implicit")
