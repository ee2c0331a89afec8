"""Figures the results state, checked by counting or measuring rather than by formula.

`stats["hvps"]` is compared with the vector-Hessian products autograd really runs, counted by a
loss whose gradient passes through an op that counts its own backward; the peak memory of a
reverse-mode run is compared with the size of the unrolled graph it must hold.
"""

import ctypes

import pytest
import torch
from helpers import data, mlp

import hyperdescent as hd


class _CountSecond(torch.autograd.Function):
    """Identity whose backward counts: it runs once each time a gradient graph is
    differentiated again (one Hessian-vector product through the loss)."""

    count = 0

    @staticmethod
    def forward(ctx, g):
        return g.clone()

    @staticmethod
    def backward(ctx, gg):
        _CountSecond.count += 1
        return gg


class _CountFirst(torch.autograd.Function):
    """Identity on the model output whose backward passes the gradient through _CountSecond
    (so the gradient stays differentiable, and its own backward is counted)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return _CountSecond.apply(g)


def counting_loss(out, y):
    """cross_entropy whose second-order backward passes are counted."""
    return torch.nn.functional.cross_entropy(_CountFirst.apply(out), y)


def make_problem(names=("lr", "weight_decay")):
    x, y = data(n=48)
    space = hd.Space({n: hp for n, hp in {
        "lr": hd.Real(0.05, low=1e-4, high=1.0, log=True),
        "weight_decay": hd.Real(1e-2, low=1e-6, high=1.0, log=True)}.items() if n in names})
    return hd.Problem(mlp(), loss=counting_loss, optimizer=hd.optim.SGD(momentum=0.9),
                      space=space, train=(x, y), val=(x[:16] + 0.1, y[:16]), batch_size=12,
                      seed=0)


CALLS = [
    ("reverse", {}), ("reverse", {"checkpoint_every": 2}), ("truncated", {"window": 3}),
    ("greedy", {}), ("forward", {}), ("forward", {"tangent": "summed"}),
    ("implicit", {"solver": "neumann"}), ("implicit", {"solver": "cg"}),
]


@pytest.mark.parametrize("method,options", CALLS, ids=[f"{m}{o}" for m, o in CALLS])
def test_hvps_stat_is_the_number_of_hessian_vector_products_autograd_runs(method, options):
    # implicit differentiation takes regularization hyperparameters only
    p = make_problem(("weight_decay",) if method == "implicit" else ("lr", "weight_decay"))
    _CountSecond.count = 0
    res = hd.hypergrad(p, steps=5, method=method, **options)
    counted = _CountSecond.count
    assert res.stats["hvps"] == counted, (res.stats["hvps"], counted)
    assert res.stats["method"] == method and res.stats["steps"] == 5
    if method != "greedy":
        assert counted > 0


def test_reverse_peak_memory_covers_the_unrolled_graph(monkeypatch):
    """Background sampling off: the peak must come from the reading taken while the whole
    unrolled graph is alive. The graph holds, for each of the T steps, the weights, the momentum
    buffer and the gradient: more than T weight vectors (measured at T=50: 2.1x, 1.4x under
    mutmut's trampolines; 0.16x when the reading inside the run is left out)."""
    import importlib

    common = importlib.import_module("hyperdescent.hypergrad.common")
    monkeypatch.setattr(common.CostMeter, "interval_s", 3600.0)
    if common.rss_bytes() == 0:
        pytest.skip("no /proc RSS on this platform")
    try:  # glibc: blocks >= 128 KiB come from mmap and go back to the system when freed, so
        # the RSS at the end of the run no longer shows the graph (a fixed threshold also
        # turns off glibc's raising of it after the first free)
        libc = ctypes.CDLL("libc.so.6")
        assert libc.mallopt(-3, 128 * 1024) == 1  # M_MMAP_THRESHOLD
    except (OSError, AttributeError, AssertionError):
        pytest.skip("needs glibc's mallopt to make freed memory visible in the RSS")
    torch.manual_seed(0)
    width = 400
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(),
                                torch.nn.Linear(width, 3)).double()
    x = torch.randn(32, width, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    p = hd.Problem(model, optimizer=hd.optim.SGD(momentum=0.9),
                   space=hd.Space({"lr": hd.Real(0.01, low=1e-4, high=1.0, log=True)}),
                   train=(x, y), val=(x, y), batch_size=32)
    steps = 50
    res = hd.hypergrad(p, steps=steps, method="reverse")
    weights_mb = sum(q.numel() for q in model.parameters()) * 8 / 2 ** 20
    assert res.stats["peak_memory_mb"] >= steps * weights_mb, (
        res.stats["peak_memory_mb"], steps * weights_mb)


@pytest.mark.parametrize("call,name", [
    (lambda p: hd.hypergrad(p, steps=3, method="truncated", window=0), "window"),
    (lambda p: hd.hypergrad(p, steps=0, method="reverse"), "steps"),
    (lambda p: hd.hypergrad(p, steps=3, method="bogus"), "bogus"),
    (lambda p: hd.hypergrad(p, steps=3, method="greedy", window=2), "window"),
    (lambda p: hd.OnlineTuner(p, method="truncated", window=0), "window"),
    (lambda p: hd.OnlineTuner(p, hyper_every=0), "hyper_every"),
    (lambda p: hd.OnlineTuner(p, meta_optimizer="rmsprop"), "rmsprop"),
    (lambda p: hd.OnlineTuner(p, meta_lr=float("nan")), "meta_lr"),
    (lambda p: hd.OnlineTuner(p, meta_lr=float("inf")), "meta_lr"),
    (lambda p: hd.OnlineTuner(p, spike_factor="3"), "spike_factor"),
    (lambda p: hd.OnlineTuner(p, max_rollbacks=-1), "max_rollbacks"),
])
def test_errors_name_the_offending_input(call, name):
    """A bad argument is refused with an error that names it."""
    with pytest.raises((hd.HyperparameterError, ValueError), match=name):
        call(make_problem())


def test_optimizer_repr_lists_its_fixed_arguments():
    text = repr(hd.optim.SGD(lr=0.1, momentum=0.9))
    assert text.startswith("SGD(") and "lr=0.1, momentum=0.9, " in text


def test_structure_stats():
    """stats["segments"] of checkpointed reverse and stats["columns"] of forward mode."""
    p = make_problem()
    assert hd.hypergrad(p, steps=4, method="reverse", checkpoint_every=1).stats["segments"] == 4
    assert hd.hypergrad(p, steps=4, method="reverse", checkpoint_every=3).stats["segments"] == 2
    assert hd.hypergrad(p, steps=4, method="reverse").stats["segments"] == 1
    assert hd.hypergrad(p, steps=3, method="forward").stats["columns"] == 2
    assert hd.hypergrad(p, steps=4, method="truncated", window=3).stats["window"] == 3


def test_wall_time_stat_is_the_time_the_call_took():
    import time

    p = make_problem()
    t0 = time.perf_counter()
    res = hd.hypergrad(p, steps=3, method="reverse")
    took = time.perf_counter() - t0
    assert 0 < res.stats["wall_time_s"] <= took


def test_a_tuner_without_a_real_hyperparameter_is_refused():
    x, y = data(n=16)
    p = hd.Problem(mlp(), optimizer=hd.optim.SGD(lr=0.1), space=hd.Space({}), train=(x, y),
                   val=(x, y))
    with pytest.raises(hd.HyperparameterError, match="no Real hyperparameter"):
        hd.OnlineTuner(p)
