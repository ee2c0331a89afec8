"""The "normalized" meta-optimizer: normalized momentum (Cutkosky & Mehta 2020) with one
root-mean-square over every raw coordinate and each coordinate's step clamped at meta_lr.

Checked against a reference written here from the formula, x ← x − lr·clamp(m / rms(m), −1, 1)
with m ← β·m + (1 − β)·g, and for the properties it is chosen for: a hyperparameter whose
hypergradient is negligible beside the others' stays put (Adam steps it at full size), and no
memory of past magnitudes (a run with every hypergradient scaled by 1e6 is the same run).
"""

import math

import pytest
import torch
from helpers import data, mlp

import hyperdescent as hd
from hyperdescent.tuners.meta import MetaOptimizer, NormalizedMomentum


def leaves(**values):
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}


def reference(grads_seq, start, lr, beta):
    """The update rule, written out on Python floats."""
    x = {k: list(v) for k, v in start.items()}
    m = {k: [0.0] * len(v) for k, v in start.items()}
    for grads in grads_seq:
        for k in m:
            m[k] = [beta * a + (1 - beta) * g for a, g in zip(m[k], grads[k])]
        flat = [a for v in m.values() for a in v]
        rms = math.sqrt(sum(a * a for a in flat) / len(flat))
        for k in x:
            x[k] = [xi - lr * max(-1.0, min(1.0, a / rms)) for xi, a in zip(x[k], m[k])]
    return x


def test_steps_follow_the_formula_over_several_leaves_and_steps():
    start = {"lr": [0.0], "wd": [1.0, -2.0]}
    rng = torch.Generator().manual_seed(0)
    seq = [{"lr": torch.randn(1, generator=rng, dtype=torch.float64).tolist(),
            "wd": (torch.randn(2, generator=rng, dtype=torch.float64) * 0.3).tolist()}
           for _ in range(7)]
    opt = MetaOptimizer(leaves(**start), "normalized", lr=0.05, betas=(0.8, 0.999))
    for g in seq:
        opt.step(leaves(**g))
    want = reference(seq, start, lr=0.05, beta=0.8)
    for k, v in opt.values().items():
        assert v.tolist() == pytest.approx(want[k], rel=1e-12, abs=1e-15), k


def test_a_negligible_hypergradient_stays_put_where_adam_steps_it_at_full_size():
    grads = leaves(lr=[-0.5], weight_decay=[3e-6])  # an underfit net: lr dominates
    norm = MetaOptimizer(leaves(lr=[0.0], weight_decay=[0.0]), "normalized", lr=0.03)
    adam = MetaOptimizer(leaves(lr=[0.0], weight_decay=[0.0]), "adam", lr=0.03)
    for _ in range(20):
        norm.step(grads)
        adam.step(grads)
    assert norm.values()["lr"].item() == pytest.approx(0.6, rel=1e-12)  # clamped: lr per step
    assert abs(norm.values()["weight_decay"].item()) < 1e-5
    assert adam.values()["weight_decay"].item() == pytest.approx(-0.6, rel=1e-2)


def test_coordinates_of_one_size_each_move_a_full_step_and_smaller_ones_less():
    opt = MetaOptimizer(leaves(lr=[0.0, 0.0, 0.0, 0.0]), "normalized", lr=0.1)
    opt.step(leaves(lr=[2.0, -2.0, 2.0, 0.2]))  # rms 1.735: the first three clamp at lr
    rms = math.sqrt((3 * 4.0 + 0.04) / 4)
    assert opt.values()["lr"].tolist() == pytest.approx([-0.1, 0.1, -0.1, -0.1 * 0.2 / rms],
                                                        rel=1e-12)


def test_scaling_every_hypergradient_leaves_the_run_unchanged():
    rng = torch.Generator().manual_seed(3)
    seq = [torch.randn(3, generator=rng, dtype=torch.float64) for _ in range(10)]
    runs = []
    for scale in (1.0, 1e6):
        opt = MetaOptimizer(leaves(h=[0.0, 0.0, 0.0]), "normalized", lr=0.02)
        for g in seq:
            opt.step({"h": g * scale})
        runs.append(opt.values()["h"])
    assert torch.allclose(runs[0], runs[1], rtol=1e-12, atol=0)


def test_a_zero_hypergradient_moves_nothing():
    opt = MetaOptimizer(leaves(h=[0.5, -0.5]), "normalized", lr=0.1)
    opt.step(leaves(h=[0.0, 0.0]))
    assert opt.values()["h"].tolist() == [0.5, -0.5]
    assert NormalizedMomentum(leaves(h=[1.0]), 0.9).direction(leaves(h=[0.0]))["h"].item() == 0


def test_clipping_weighs_a_huge_hypergradient_as_one_of_norm_clip():
    """The joint-norm clip applies before the momentum, so one huge hypergradient cannot
    outweigh the later ones for longer than its clipped size allows."""
    seq = [[100.0, 0.0], [0.0, -1.0]]
    opt = MetaOptimizer(leaves(h=[0.0, 0.0]), "normalized", lr=0.1, clip=1.0, betas=(0.5, 0.9))
    for g in seq:
        opt.step(leaves(h=g))
    want = reference([{"h": [1.0, 0.0]}, {"h": [0.0, -1.0]}], {"h": [0.0, 0.0]}, 0.1, 0.5)
    assert opt.values()["h"].tolist() == pytest.approx(want["h"], rel=1e-12)


def test_state_dict_continues_exactly():
    rng = torch.Generator().manual_seed(5)
    seq = [torch.randn(2, generator=rng, dtype=torch.float64) for _ in range(8)]
    whole = MetaOptimizer(leaves(h=[0.0, 0.0]), "normalized", lr=0.05)
    half = MetaOptimizer(leaves(h=[0.0, 0.0]), "normalized", lr=0.05)
    for g in seq:
        whole.step({"h": g})
    for g in seq[:4]:
        half.step({"h": g})
    back = MetaOptimizer(leaves(h=[9.0, 9.0]), "normalized", lr=1.0, betas=(0.1, 0.2))
    back.load_state_dict(half.state_dict())
    for g in seq[4:]:
        back.step({"h": g})
    assert back.values()["h"].tolist() == whole.values()["h"].tolist()


def test_online_tuner_with_normalized_steps_resumes_bit_for_bit(tmp_path):
    x, y = data(n=48)
    space = hd.Space({"lr": hd.Real(0.01, low=1e-4, high=1.0, log=True),
                      "weight_decay": hd.Real(1e-3, low=1e-6, high=0.1, log=True)})

    def problem():
        return hd.Problem(mlp(), optimizer=hd.optim.SGD(momentum=0.9), space=space,
                          train=(x, y), val=(x[:16] + 0.1, y[:16]), batch_size=16, seed=1)

    whole = hd.OnlineTuner(problem(), meta_optimizer="normalized", meta_lr=0.1).run(10)
    half = hd.OnlineTuner(problem(), meta_optimizer="normalized", meta_lr=0.1).run(5)
    half.save(tmp_path / "t.pt")
    back = hd.OnlineTuner.load(tmp_path / "t.pt", problem()).run(10)
    for k in whole.raw:
        assert back.raw[k].item() == whole.raw[k].item()
    # every meta-step moves the dominant coordinate by exactly meta_lr
    steps = [abs(math.log(b["hparams"]["lr"] / a["hparams"]["lr"]))
             for a, b in zip(whole.history, whole.history[1:])]
    assert max(steps) == pytest.approx(0.1, rel=1e-6)


def test_clip_auto_is_one_for_adam_and_none_for_normalized_and_a_bad_string_is_refused():
    from hyperdescent.errors import HyperparameterError
    x, y = data(n=32)
    space = hd.Space({"lr": hd.Real(0.01, low=1e-4, high=1.0, log=True)})

    def problem():
        return hd.Problem(mlp(), optimizer=hd.optim.SGD(), space=space, train=(x, y),
                          val=(x, y), batch_size=16, seed=1)

    assert hd.OnlineTuner(problem()).config["clip"] == 1.0
    assert hd.OnlineTuner(problem(), meta_optimizer="normalized").config["clip"] is None
    assert hd.OnlineTuner(problem(), meta_optimizer="normalized", clip=0.5).meta.clip == 0.5
    with pytest.raises(HyperparameterError, match="clip"):
        hd.OnlineTuner(problem(), clip="none")
