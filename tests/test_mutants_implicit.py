"""Implicit differentiation (Pedregosa 2016; Lorraine et al. 2020) and greedy lookahead
(Luketina et al. 2016) details the closed-form ridge tests do not pin: which decoupled weight
decay is refused, the validation batch read, scheduled regularizers, and their stats."""

import pytest
import torch
from helpers import data, mlp

import hyperdescent as hd


def _reg(params, hp):
    return hp["l2"] * sum((p * p).sum() for p in params.values())


def _problem(optimizer=None, l2=None, val_batch_size=512):
    x, y = data(n=40)
    space = hd.Space({"l2": l2 or hd.Real(0.05, low=1e-6, high=1.0, log=True)})
    return hd.Problem(mlp(), optimizer=optimizer or hd.optim.SGD(lr=0.1), space=space,
                      train=(x, y), val=(x + 0.1, y), batch_size=40,
                      val_batch_size=val_batch_size, seed=2, regularizer=_reg)


def test_decoupled_weight_decay_is_refused_only_when_it_is_not_zero():
    with pytest.raises(hd.HyperparameterError, match="decoupled weight decay"):
        hd.hypergrad(_problem(hd.optim.AdamW(lr=0.01, weight_decay=0.01)), 3, "implicit")
    res = hd.hypergrad(_problem(hd.optim.AdamW(lr=0.01, weight_decay=0.0)), 3, "implicit")
    assert torch.isfinite(res.grad["l2"]).all() and res.grad["l2"].item() != 0.0
    # coupled weight decay (Adam's) is part of the fixed point, not refused
    hd.hypergrad(_problem(hd.optim.Adam(lr=0.01, weight_decay=0.01)), 3, "implicit")


def test_implicit_reads_validation_batch_T_like_the_other_methods():
    """val_batch_size below the validation set: E is the loss of batch T (as reverse's is)."""
    p = _problem(val_batch_size=8)
    assert not torch.equal(p.val_batch(5)[0], p.val_batch(0)[0])
    imp = hd.hypergrad(p, 5, "implicit", solver="cg", iters=5)
    rev = hd.hypergrad(p, 5, "reverse")
    assert imp.value == pytest.approx(rev.value, rel=1e-12)


def test_implicit_stats_name_the_phases_and_the_solver():
    p = _problem()
    cg = hd.hypergrad(p, 5, "implicit", solver="cg", iters=7, tol=0.0)
    assert set(cg.stats["phase_s"]) == {"forward", "backward", "solve"}
    assert cg.stats["solver"] == "cg" and cg.stats["cg_iters"] == 7
    assert cg.stats["hvps"] == 7 and cg.stats["method"] == "implicit"
    neu = hd.hypergrad(p, 5, "implicit", terms=4)
    assert neu.stats["terms"] == 4 and neu.stats["alpha"] == 0.1 and neu.stats["hvps"] == 4
    with pytest.raises(hd.HyperparameterError, match="solver"):
        hd.hypergrad(p, 5, "implicit", solver="lu")


def test_a_scheduled_regularizer_gets_its_implicit_hypergradient_in_the_last_block():
    """The fixed point is that of the last step's values: only the block holding step T-1
    has an implicit hypergradient, and it is that of a constant regularizer at its value."""
    sched = _problem(l2=hd.Real(0.05, low=1e-6, high=1.0, log=True, schedule=hd.Piecewise(2)))
    res = hd.hypergrad(sched, 6, "implicit", solver="cg", iters=20)
    const = hd.hypergrad(_problem(), 6, "implicit", solver="cg", iters=20)
    assert res.grad["l2"].shape == (2,) and res.grad["l2"][0].item() == 0.0
    # both blocks start at 0.05: the same weights as the constant regularizer, the same solve
    assert res.grad["l2"][1].item() == pytest.approx(const.grad["l2"].item(), rel=1e-10)


def test_greedy_stats_are_reverses_with_its_own_method_name():
    p = _problem()
    greedy = hd.hypergrad(p, 4, "greedy")
    rev = hd.hypergrad(p, 4, "reverse")
    assert greedy.stats["method"] == "greedy" and greedy.stats["steps"] == 4
    assert set(greedy.stats) == set(rev.stats)
    assert greedy.stats["segments"] == 1 and greedy.stats["hvps"] < rev.stats["hvps"]
