"""The forward engine's options that the exactness matrix does not reach: the clamps of
Micaelli & Storkey 2021 at points where they are active (against a hand-written clamped
recursion that shares no code with the engine), column groupings given as functions, and the
argument checks of `forward` / `forward_engine`.
"""

import pytest
import torch
from helpers import data, mlp
from torch.func import functional_call, jvp

import hyperdescent as hd
from hyperdescent.hypergrad.forward import ForwardTangent, Tangent, exact_grouping, forward_engine

T = 4
LR, L2 = 0.2, 0.05


def _l2(params, hp):
    return hp["l2"] * sum((w ** 2).sum() for w in params.values())


def _problem(per="global"):
    x, y = data(n=40)
    space = hd.Space({"lr": hd.Real(LR, low=1e-4, high=1.0, log=True, per=per),
                      "l2": hd.Real(L2, low=1e-6, high=1.0, log=True)})
    return hd.Problem(mlp(), optimizer=hd.optim.SGD(), space=space, train=(x, y),
                      val=(x[:16] + 0.1, y[:16]), batch_size=10, seed=2, regularizer=_l2)


def _clamped_reference(p, clamp_grad=None, clamp_hz=None):
    """dE/d(lr, l2) of plain SGD on CE + l2·|θ|², by the forward recursion written out here:
    g_c = clamp(g), Z' = Z - lr·keep⊙(clamp(H·Z) + ∂g/∂l2) - g_c·[column lr], with H·Z a
    torch.func.jvp of the gradient and keep = |g| <= clamp_grad."""
    model = mlp()
    theta = {n: q.detach().clone() for n, q in model.named_parameters()}

    def loss_fn(prm, x, y):
        out = functional_call(model, prm, (x,))
        return torch.nn.functional.cross_entropy(out, y) + L2 * sum(
            (w ** 2).sum() for w in prm.values())

    grad_fn = torch.func.grad(loss_fn)
    Z = {c: {n: torch.zeros_like(w) for n, w in theta.items()} for c in ("lr", "l2")}
    for t in range(T):
        x, y = p.train_batch(t)
        g = grad_fn(theta, x, y)
        keep = {n: torch.ones_like(v) for n, v in g.items()}
        if clamp_grad is not None:
            keep = {n: (v.abs() <= clamp_grad).double() for n, v in g.items()}
            g = {n: v.clamp(-clamp_grad, clamp_grad) for n, v in g.items()}
        for col in ("lr", "l2"):
            _, hz = jvp(lambda prm, x=x, y=y: grad_fn(prm, x, y), (theta,), (Z[col],))
            if clamp_hz is not None:
                hz = {n: v.clamp(-clamp_hz, clamp_hz) for n, v in hz.items()}
            dg = {n: keep[n] * (hz[n] + (2 * theta[n] if col == "l2" else 0.0)) for n in hz}
            Z[col] = {n: Z[col][n] - LR * dg[n] - (g[n] if col == "lr" else 0.0) for n in hz}
        theta = {n: theta[n] - LR * g[n] for n in theta}
    xv, yv = p.val_batch(T)
    c = torch.func.grad(lambda prm: torch.nn.functional.cross_entropy(
        functional_call(model, prm, (xv,)), yv))(theta)
    return {col: sum((Z[col][n] * c[n]).sum() for n in c).item() for col in Z}


def test_clamp_hz_with_a_mixed_term_matches_a_hand_written_clamped_recursion():
    """clamp_hz bounds H·Z only; the mixed ∂²L/∂θ∂λ row of a regularizer hyperparameter is
    added after the clamp, in the loop and (clamps force it) not in the batched rows."""
    p = _problem()
    exact = _clamped_reference(p)
    c = 2e-3
    ref = _clamped_reference(p, clamp_hz=c)
    # the clamp is active: it moves both hypergradients well beyond float error
    for col in ref:
        assert abs(ref[col] - exact[col]) > 1e-3 * abs(exact[col]), col
    for batched in (False, True):
        res = hd.hypergrad(p, steps=T, method="forward", clamp_hz=c, batched_rows=batched)
        for col in ref:
            assert res.grad[col].item() == pytest.approx(ref[col], rel=1e-9), (col, batched)


def test_clamp_grad_masks_the_mixed_term_too():
    """clamp_grad: the tangent of clamp(g) is keep ⊙ (H·Z + ∂g/∂λ), the mixed row included."""
    p = _problem()
    exact = _clamped_reference(p)
    c = 0.02
    ref = _clamped_reference(p, clamp_grad=c)
    assert abs(ref["l2"] - exact["l2"]) > 1e-3 * abs(exact["l2"])
    res = hd.hypergrad(p, steps=T, method="forward", clamp_grad=c)
    for col in ref:
        assert res.grad[col].item() == pytest.approx(ref[col], rel=1e-9), col
    both = hd.hypergrad(p, steps=T, method="forward", clamp_grad=c, clamp_hz=1e-3)
    ref_both = _clamped_reference(p, clamp_grad=c, clamp_hz=1e-3)
    for col in ref:
        assert both.grad[col].item() == pytest.approx(ref_both[col], rel=1e-9), col


def test_unclamped_reference_is_the_reverse_hypergradient():
    """The hand-written recursion itself (no clamps) is reverse mode's hypergradient."""
    p = _problem()
    ref = _clamped_reference(p)
    rev = hd.hypergrad(p, steps=T, method="reverse")
    for col in ref:
        assert rev.grad[col].item() == pytest.approx(ref[col], rel=1e-9), col


def test_a_grouping_function_is_a_tangent_choice():
    """tangent=<function from scalar hyperparameters to carried columns>: the exact grouping
    given as a function is tangent='exact'; one column summing everything is one column."""
    p = _problem(per="layer")
    exact = hd.hypergrad(p, steps=T, method="forward", tangent="exact")
    fn = hd.hypergrad(p, steps=T, method="forward", tangent=exact_grouping)
    assert fn.stats["columns"] == exact.stats["columns"] == 5  # 4 layers' lr + l2
    for k, v in hd.space.flatten(exact.grad).items():
        assert torch.equal(hd.space.flatten(fn.grad)[k], v), k
    engine = ForwardTangent(p, T, tangent=lambda members: [Tangent(tuple(members))])
    assert len(engine.columns) == 1 and len(engine.columns[0].members) == 5
    with pytest.raises(hd.HyperparameterError, match="tangent="):
        hd.hypergrad(p, steps=T, method="forward", tangent="exactly")
    with pytest.raises(hd.HyperparameterError, match="tangent="):
        ForwardTangent(p, T, tangent=3)


def test_forward_engine_defaults_to_the_exact_tangent():
    p = _problem(per="layer")
    engine = forward_engine(p, T)
    assert type(engine) is ForwardTangent
    assert [len(c.members) for c in engine.columns] == [1] * 5
    assert not engine.batched_rows  # CPU default: one backward per row
    assert forward_engine(p, T, batched_rows=True).batched_rows


def test_clamps_and_compile_are_refused_together_before_compiling():
    p = _problem()
    for kw in ({"clamp_grad": 1.0}, {"clamp_hz": 1.0}):
        with pytest.raises(hd.HyperparameterError, match="compile=True"):
            hd.hypergrad(p, steps=T, method="forward", compile=True, **kw)
    for bad in (0, -1.0, "1"):
        with pytest.raises(hd.HyperparameterError, match="clamp_grad"):
            hd.hypergrad(p, steps=T, method="forward", clamp_grad=bad)


def test_batched_rows_reaches_the_engine_from_hypergrad(monkeypatch):
    """batched_rows=True: the Hessian-vector rows of a step go through one batched
    vector-Jacobian product of the problem's seam; the default on CPU takes one per row."""
    calls = []
    real = hd.Problem.vjp

    def spy(self, *a, **kw):
        calls.append(kw.get("batched", False))
        return real(self, *a, **kw)

    monkeypatch.setattr(hd.Problem, "vjp", spy)
    p = _problem()
    hd.hypergrad(p, steps=T, method="forward", batched_rows=True)
    assert sum(calls) == T  # one batched product a step (the other calls are gradients)
    calls.clear()
    hd.hypergrad(p, steps=T, method="forward")
    assert calls and not any(calls)
