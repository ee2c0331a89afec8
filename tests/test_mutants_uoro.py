"""UORO (Tallec & Ollivier 2018): the tangent norm the online tuner records is the norm of
the rank-one estimate itself, built here as an explicit outer product."""

import pytest
import torch
from helpers import mlp, problem

import hyperdescent as hd
from hyperdescent.hypergrad.uoro import UOROTangent


def test_uoro_tangent_norm_is_the_mean_norm_of_each_samples_outer_product():
    space = hd.Space({"lr": hd.Real(0.1, low=1e-4, high=1.0, log=True, per="layer"),
                      "momentum": hd.Real(0.8, low=0.0, high=0.99)})
    p = problem(mlp(), space, hd.optim.SGD())
    engine = UOROTangent(p, 4, samples=3, seed=1)
    leaves = {k: v.detach() for k, v in hd.space.flatten(p.real_hparams()).items()}
    state, carry = p.init_state(), engine.init()
    assert engine.tangent_norm(carry) == 0.0
    for t in range(4):
        state, carry, _ = engine.step(carry, state, p.train_batch(t), leaves, t)
    sp, lam = carry["s"]["params"], carry["lam"]
    flat = torch.cat([sp[n].reshape(3, -1) for n in sp], 1)  # s̃ of each sample, (3, |θ|)
    norms = [torch.linalg.matrix_norm(torch.outer(flat[i], lam[i])) for i in range(3)]
    want = torch.stack(norms).mean().item()
    assert want > 0
    assert engine.tangent_norm(carry) == pytest.approx(want, rel=1e-12)


def test_uoro_blocks_group_columns_by_name_or_by_layer():
    """Per-layer lr and weight decay on a 2-layer MLP (4 tensors): 'name' makes one block of
    each hyperparameter's columns, 'layer' one block of each tensor's lr and wd columns."""
    space = hd.Space({"lr": hd.Real(0.05, low=1e-4, high=1.0, log=True, per="layer"),
                      "weight_decay": hd.Real(1e-3, low=1e-6, high=0.1, log=True,
                                              per="layer")})
    p = problem(mlp(), space, hd.optim.SGD(momentum=0.9))
    masks = {b: UOROTangent(p, 4, blocks=b)._mask for b in ("all", "name", "layer")}
    cols = masks["all"].shape[1]
    assert masks["all"].shape == (1, cols)
    assert masks["name"].shape == (2, cols) and masks["name"].sum(1).tolist() == [cols // 2] * 2
    assert masks["layer"].shape == (cols // 2, cols)
    assert masks["layer"].sum(1).tolist() == [2] * (cols // 2)
    for m in masks.values():  # a partition: every column in exactly one block
        assert m.sum(0).tolist() == [1] * cols


def test_uoro_name_blocks_join_a_schedules_blocks():
    """With lr a 2-block schedule, 'name' puts both blocks' columns in one block (the
    per-(name, block) grouping that centring uses would split them)."""
    space = hd.Space({"lr": hd.Real(0.05, low=1e-4, high=1.0, log=True,
                                    schedule=hd.Piecewise(2))})
    p = problem(mlp(), space, hd.optim.SGD(momentum=0.9))
    assert UOROTangent(p, 4, blocks="name")._mask.tolist() == [[True, True]]
