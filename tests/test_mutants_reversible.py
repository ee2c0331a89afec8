"""Reversible learning (Maclaurin, Duvenaud & Adams 2015), through hd.hypergrad only: the
checks on its options and optimizer, and the fixed-point radixes its stats report."""

import pytest
from helpers import data, logreg

import hyperdescent as hd


def _problem(optimizer=None, momentum_tuned=False):
    x, y = data(n=40)
    space = {"lr": hd.Real(0.05, low=1e-4, high=1.0, log=True)}
    if momentum_tuned:
        space["momentum"] = hd.Real(0.5, low=0.0, high=0.9)
    return hd.Problem(logreg(), optimizer=optimizer or hd.optim.SGD(momentum=0.5),
                      space=hd.Space(space), train=(x, y), val=(x[:16] + 0.1, y[:16]),
                      batch_size=10, seed=2)


@pytest.mark.parametrize("kw,name", [
    (dict(headroom_bits=-1), "headroom_bits"), (dict(headroom_bits=41), "headroom_bits"),
    (dict(momentum_denom=3), "momentum_denom"), (dict(momentum_denom=1), "momentum_denom"),
    (dict(momentum_denom=1 << 17), "momentum_denom"),
])
def test_reversible_options_are_checked_by_name(kw, name):
    with pytest.raises(hd.HyperparameterError, match=name):
        hd.hypergrad(_problem(), 2, "reversible", **kw)


@pytest.mark.parametrize("opt", [hd.optim.SGD(), hd.optim.SGD(momentum=0.5, nesterov=True),
                                 hd.optim.SGD(momentum=0.5, dampening=0.1), hd.optim.Adam()],
                         ids=["no-momentum", "nesterov", "dampening", "adam"])
def test_only_plain_momentum_sgd_is_reversed(opt):
    with pytest.raises(hd.HyperparameterError, match="method='reversible'"):
        hd.hypergrad(_problem(opt), 2, "reversible")


def test_a_tuned_momentum_needs_no_fixed_momentum():
    """momentum tuned from a fixed momentum of 0: reversed (the tuned value is used)."""
    res = hd.hypergrad(_problem(hd.optim.SGD(), momentum_tuned=True), 3, "reversible")
    rev = hd.hypergrad(_problem(hd.optim.SGD(), momentum_tuned=True), 3, "reverse")
    assert res.stats["reversal_exact"]
    assert res.grad["lr"].item() == pytest.approx(rev.grad["lr"].item(), rel=1e-4)


def test_the_stats_report_the_fixed_point_radixes_used():
    """One radix (fractional bits) per parameter tensor, for the weights and the velocity."""
    st = hd.hypergrad(_problem(), 3, "reversible", headroom_bits=8).stats
    for k in ("theta_radix", "velocity_radix"):
        assert len(st[k]) == 2 and all(isinstance(r, int) and 0 < r < 64 for r in st[k]), k
    # more headroom above the weights' range: fewer fractional bits for them
    wide = hd.hypergrad(_problem(), 3, "reversible", headroom_bits=16).stats
    assert [r - 8 for r in st["theta_radix"]] == wide["theta_radix"]
    assert [r - 8 for r in st["velocity_radix"]] == wide["velocity_radix"]


def test_the_stats_name_the_method_its_momentum_grid_products_and_buffer():
    p = _problem()
    st = hd.hypergrad(p, 3, "reversible").stats
    lanes = sum(q.numel() for q in p.model.parameters())
    assert st["method"] == "reversible" and st["steps"] == 3
    assert st["momentum_denom"] == 2 ** 16 and st["momentum_used"] == 0.5
    assert st["hvps"] == 2  # one Hessian-vector product a reversed step but the first
    # at least one 64-bit head a lane, plus the words pushed
    assert st["buffer_peak_mb"] >= 64 * lanes / 8 / 2 ** 20
    assert st["buffer_bits"] > 0 and st["reversal_exact"]
