"""The meta-optimizer's Adam betas (OnlineTuner meta_betas): they reach the Adam update, they
are checked, and a tuner saved and loaded keeps them."""

import math

import pytest
import torch
from helpers import data, mlp

import hyperdescent as hd
from hyperdescent.errors import HyperparameterError
from hyperdescent.tuners.meta import MetaOptimizer


def _adam_by_hand(x, grads, lr, b1, b2, eps=1e-8):
    """Kingma & Ba 2015 Adam on one float, bias-corrected moments."""
    m = v = 0.0
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        x -= lr * (m / (1 - b1 ** t)) / (math.sqrt(v / (1 - b2 ** t)) + eps)
    return x


@pytest.mark.parametrize("betas", [(0.9, 0.97), (0.5, 0.9)])
def test_adam_steps_use_the_given_betas(betas):
    grads = [0.3, -0.05, 0.02, 0.01]
    meta = MetaOptimizer({"a": torch.tensor(1.0, dtype=torch.float64)}, "adam", lr=0.1,
                         betas=betas)
    for g in grads:
        meta.step({"a": torch.tensor(g, dtype=torch.float64)})
    expected = _adam_by_hand(1.0, grads, 0.1, *betas)
    assert meta.values()["a"].item() == pytest.approx(expected, rel=1e-12)
    # with the usual beta2 the late small gradients move it less: the betas matter here
    assert expected != pytest.approx(_adam_by_hand(1.0, grads, 0.1, 0.9, 0.999), rel=1e-6)


@pytest.mark.parametrize("bad", [(0.9,), (0.9, 1.0), (-0.1, 0.9), "0.9,0.97", (True, 0.9)])
def test_bad_meta_betas_are_refused_by_name(bad):
    x, y = data(n=32)
    space = hd.Space({"lr": hd.Real(0.05, low=1e-4, high=1.0, log=True)})
    p = hd.Problem(mlp(), optimizer=hd.optim.SGD(), space=space, train=(x, y), val=(x, y),
                   batch_size=16, seed=1)
    with pytest.raises(HyperparameterError, match="meta_betas"):
        hd.OnlineTuner(p, meta_betas=bad)


def test_saved_tuner_keeps_its_meta_betas_and_continues_identically(tmp_path):
    x, y = data(n=32)
    space = hd.Space({"lr": hd.Real(0.05, low=1e-4, high=1.0, log=True)})

    def problem():
        return hd.Problem(mlp(), optimizer=hd.optim.SGD(), space=space, train=(x, y),
                          val=(x, y), batch_size=16, seed=1)

    whole = hd.OnlineTuner(problem(), meta_betas=(0.8, 0.9)).run(8)
    half = hd.OnlineTuner(problem(), meta_betas=(0.8, 0.9)).run(4)
    half.save(tmp_path / "t.pt")
    resumed = hd.OnlineTuner.load(tmp_path / "t.pt", problem())
    assert resumed.meta.betas == (0.8, 0.9)
    resumed.run(8)
    assert resumed.raw["lr"].item() == whole.raw["lr"].item()
