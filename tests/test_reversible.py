"""Reversible learning: the rANS buffer's round trips, bit-exact fixed-point reversal, and
hypergradients equal to method="reverse" and to central finite differences (float64)."""

import math
import random

import pytest
import torch
from helpers import bn_convnet, dot, fd_directional, image_data, logreg, mlp, problem
from helpers import data as helpers_data

import hyperdescent as hd
from hyperdescent.errors import HyperparameterError, NonFiniteError
from hyperdescent.hypergrad import coder
from hyperdescent.hypergrad.coder import HEAD_LOW, RansBuffer
from hyperdescent.optim import reversible_sgd as rsgd

LR = hd.Real(0.05, low=1e-4, high=1.0, log=True)
WD = hd.Real(1e-2, low=1e-6, high=1.0, log=True)
STEPS = 6


# -- the information buffer -------------------------------------------------------------------
def _random_base(rng, lanes, gen):
    """(k, n): digits pushed below 2^k, popped below n, n at the range limits or in between."""
    k = rng.choice([0, 1, 7, 16, 16, rng.randint(1, 16)])
    kind = rng.choice(["int", "tensor", "max", "one"])
    if kind == "int":
        return k, rng.randint(1, 1 << k)
    if kind == "max":
        return k, 1 << k
    if kind == "one":
        return k, 1
    return k, torch.randint(1, (1 << k) + 1, (lanes,), generator=gen)


def _digits(rng, base, lanes, gen):
    base = torch.as_tensor(base, dtype=torch.int64).expand(lanes)
    if rng.random() < 0.3:  # the range limits: 0 and base - 1
        return (base - 1).clone() if rng.random() < 0.5 else torch.zeros(lanes, dtype=torch.int64)
    return (torch.rand(lanes, generator=gen, dtype=torch.float64) * base).long()


@pytest.fixture(params=[True, False], ids=["numpy", "torch"])
def kernels(request, monkeypatch):
    """Both integer kernels: numpy's (CPU, a scalar base) and torch's (any device)."""
    monkeypatch.setattr(coder, "NUMPY_CPU", request.param)
    return request.param


@pytest.mark.parametrize("seed", range(6))
def test_coder_round_trip_random_orders(seed, kernels):
    """Any interleaving of exchanges and inverse exchanges, undone in reverse order, restores
    the message; every step undone returns the digit it took."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    lanes = rng.randint(1, 40)
    buf = RansBuffer(lanes, capacity_words=1)  # the tape must grow
    start = buf.snapshot()
    ops = []
    for _ in range(300):
        k, n = _random_base(rng, lanes, gen)
        if rng.random() < 0.6:
            r = _digits(rng, 1 << k, lanes, gen)
            ops.append(("exchange", r, buf.exchange(r, k, n), k, n))
        else:
            s = _digits(rng, n, lanes, gen)
            ops.append(("unexchange", s, buf.unexchange(s, k, n), k, n))
        assert bool((buf.head >= HEAD_LOW).all()) and bool((buf.head < 1 << 47).all())
    assert buf.top > 0
    for kind, given, got, k, n in reversed(ops):
        if kind == "exchange":
            assert torch.equal(buf.unexchange(got, k, n), given)
        else:
            assert torch.equal(buf.exchange(got, k, n), given)
    assert buf.matches(start)


@pytest.mark.parametrize("seed", range(3))
def test_coder_numpy_and_torch_kernels_agree_bit_for_bit(seed, monkeypatch):
    """The numpy kernels write the same heads, words and digits as torch's, with heads at
    the emission and refill thresholds and digits at their limits."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    lanes = 50
    bufs = {True: RansBuffer(lanes, capacity_words=1), False: RansBuffer(lanes, capacity_words=1)}
    for _ in range(200):
        k = rng.choice([1, 7, 16, 16])
        n = rng.choice([1, 1 << k, rng.randint(1, 1 << k)])
        if rng.random() < 0.2:  # heads just below, at and above a threshold
            edge = rng.choice([n << (47 - k), HEAD_LOW * n, (1 << 47) - 1])
            head = edge + torch.randint(-2, 1, (lanes,), generator=gen)
            head = head.clamp(HEAD_LOW, (1 << 47) - 1)
            for b in bufs.values():
                b.head = head.clone()
        exchange = rng.random() < 0.6
        digits = _digits(rng, 1 << k if exchange else n, lanes, gen)
        out = {}
        for use_numpy, b in bufs.items():
            monkeypatch.setattr(coder, "NUMPY_CPU", use_numpy)
            out[use_numpy] = (b.exchange if exchange else b.unexchange)(digits.clone(), k, n)
        assert torch.equal(out[True], out[False])
        assert torch.equal(bufs[True].head, bufs[False].head)
        assert bufs[True].top == bufs[False].top
        assert torch.equal(bufs[True].tape[:bufs[True].top], bufs[False].tape[:bufs[False].top])


def test_coder_lifo_many_words_and_size():
    """Many exchanges at momentum n/2^16, undone LIFO; the size is the information log2(d/n)
    per lane-step plus the 64-bit heads and under one word a lane, and the digits are exactly
    uniform below n."""
    gen = torch.Generator().manual_seed(0)
    lanes, n, k, steps = 64, 58982, 16, 2000
    buf = RansBuffer(lanes)
    digits, popped = [], []
    for _ in range(steps):
        digits.append(torch.randint(0, 1 << k, (lanes,), generator=gen))
        popped.append(buf.exchange(digits[-1], k, n))
    info = lanes * steps * math.log2((1 << k) / n)
    # the tape's words and the heads' growth above 2^16 hold the information, to a bit a lane
    held = 31 * buf.top + float(torch.log2(buf.head.double() / HEAD_LOW).sum())
    assert abs(held - info) <= lanes
    assert buf.bits() <= info * 32 / 31 + (64 + 32) * lanes
    assert int(torch.stack(popped).max()) < n and int(torch.stack(popped).min()) >= 0
    for d, s in zip(reversed(digits), reversed(popped)):
        assert torch.equal(buf.unexchange(s, k, n), d)
    assert buf.top == 0 and bool((buf.head == HEAD_LOW).all())


def test_coder_pop_from_empty_borrows_zero_words():
    """Inverse exchanges on an empty buffer read zero words from below the bottom; exchanging
    the digits back leaves only zero words there, the same message as the empty buffer."""
    buf = RansBuffer(5)
    start = buf.snapshot()
    got = [buf.unexchange(torch.full((5,), 3, dtype=torch.int64), 16, 7) for _ in range(40)]
    assert buf.top == 0
    for r in reversed(got):
        buf.exchange(r, 16, 7)
    assert buf.matches(start)


def test_coder_refuses_bad_digits_and_bases():
    buf = RansBuffer(3)
    with pytest.raises(hd.errors.HyperdescentError, match="digit"):
        buf.exchange(torch.tensor([0, 5, 1]), 2, 3)
    with pytest.raises(hd.errors.HyperdescentError, match="base"):
        buf.exchange(torch.zeros(3, dtype=torch.int64), 4, 17)
    with pytest.raises(hd.errors.HyperdescentError, match="base"):
        buf.unexchange(torch.zeros(3, dtype=torch.int64), 4, 0)
    with pytest.raises(hd.errors.HyperdescentError, match="digit bits"):
        buf.exchange(torch.zeros(3, dtype=torch.int64), 17, 3)


# -- fixed-point SGD and its inverse ------------------------------------------------------------
def _quadratic_run(steps, mu=0.9, seed=0):
    """A fixed-point run on a random quadratic: gradient A θ - b with A positive definite."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(12, 12, generator=gen, dtype=torch.float64)
    a, b = m @ m.T / 12 + torch.eye(12, dtype=torch.float64), torch.randn(12, generator=gen,
                                                                          dtype=torch.float64)
    theta0 = torch.randn(12, generator=gen, dtype=torch.float64)
    layout = rsgd.Layout.of({"w": theta0[:8], "b": theta0[8:]})
    n, _ = rsgd.quantize_momentum(mu)
    lr = torch.tensor(0.05, dtype=torch.float64)
    return a, b, theta0, layout, n, lr


LONG = 1000  # long enough for float reversal to lose θ_0 entirely


@pytest.mark.parametrize("base", ["tensor", "int"])
def test_fixed_point_sgd_reverses_bit_for_bit(base, kernels):
    a, b, theta0, layout, n, lr = _quadratic_run(LONG)
    n = int(n) if base == "int" else n
    fx = rsgd.FixedPoint.for_weights(layout, theta0, headroom_bits=8)
    buf = RansBuffer(12)
    start = buf.snapshot()
    theta = rsgd.to_fixed(theta0, fx.theta_scale, layout, "weights")
    theta_start, v = theta.clone(), torch.zeros(12, dtype=torch.int64)
    for t in range(LONG):
        d = a @ rsgd.to_float(theta, fx.theta_inv) - b
        if t == 0:
            fx.set_velocity_range(d, torch.as_tensor(n) / rsgd.MOMENTUM_DENOM, headroom_bits=8)
        theta, v = rsgd.step(theta, v, d, lr, n, fx, buf, t)
    assert buf.top > 0
    for t in range(LONG - 1, -1, -1):
        theta = rsgd.unstep_position(theta, v, lr, fx, t)
        v = rsgd.unstep_velocity(v, a @ rsgd.to_float(theta, fx.theta_inv) - b, n, fx, buf, t)
    assert torch.equal(theta, theta_start) and not bool(v.any()) and buf.matches(start)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fixed_point_step_numpy_equals_torch(dtype, monkeypatch):
    """The numpy step and inverse steps give torch's integers, words and digits exactly."""
    a, b, theta0, layout, n, lr = _quadratic_run(300, mu=0.6, seed=1)
    a, b, theta0, lr, n = a.to(dtype), b.to(dtype), theta0.to(dtype), lr.to(dtype), int(n)
    runs = {}
    for use_numpy in (True, False):
        monkeypatch.setattr(coder, "NUMPY_CPU", use_numpy)
        fx = rsgd.FixedPoint.for_weights(layout, theta0, headroom_bits=2)
        buf = RansBuffer(12, capacity_words=1)
        theta = rsgd.to_fixed(theta0, fx.theta_scale, layout, "weights")
        v, states = torch.zeros(12, dtype=torch.int64), []
        for t in range(300):
            d = a @ rsgd.to_float(theta, fx.theta_inv) - b
            if t < 2:  # set again after a step: the kernels must use the new scales
                fx.set_velocity_range(d * (t + 1), torch.as_tensor(n / rsgd.MOMENTUM_DENOM), 2)
            theta, v = rsgd.step(theta, v, d, lr * 4, n, fx, buf, t)
            states.append((theta, v, buf.head.clone()))
        words = buf.tape[:buf.top].clone()
        for t in range(299, 149, -1):
            theta = rsgd.unstep_position(theta, v, lr * 4, fx, t)
            v = rsgd.unstep_velocity(v, a @ rsgd.to_float(theta, fx.theta_inv) - b, n, fx, buf,
                                     t)
            states.append((theta, v, buf.head.clone()))
        runs[use_numpy] = states, words
    assert runs[True][1].numel() > 0 and torch.equal(runs[True][1], runs[False][1])
    for x, y in zip(*(runs[k][0] for k in (True, False))):
        assert all(torch.equal(p, q) for p, q in zip(x, y))


def test_naive_float_reversal_does_not_recover_the_start():
    """The same run in float64, reversed by the same formulas without the buffer: dividing by
    μ amplifies rounding errors by 1/μ a step, and θ_0 is not recovered."""
    a, b, theta0, _, _, lr = _quadratic_run(LONG)
    mu = 0.9
    theta, v = theta0.clone(), torch.zeros(12, dtype=torch.float64)
    for _ in range(LONG):
        v = mu * v + (a @ theta - b)
        theta = theta - lr * v
    for _ in range(LONG):
        theta = theta + lr * v
        v = (v - (a @ theta - b)) / mu
    assert not torch.equal(theta, theta0)
    assert float((theta - theta0).abs().max()) > 1e-2


def test_to_fixed_names_the_tensor_on_nan_and_overflow():
    layout = rsgd.Layout.of({"w": torch.zeros(3), "b": torch.zeros(2)})
    scale = torch.full((5,), 2.0 ** 40, dtype=torch.float64)
    with pytest.raises(NonFiniteError, match=r"not finite.*\['b'\]"):
        rsgd.to_fixed(torch.tensor([0, 0, 0, 0, math.nan], dtype=torch.float64), scale, layout,
                      "gradient", 3)
    with pytest.raises(rsgd.FixedPointOverflowError, match=r"overflows.*\['w'\]"):
        rsgd.to_fixed(torch.tensor([0, 2.0 ** 30, 0, 0, 0], dtype=torch.float64), scale,
                      layout, "gradient", 3)


def test_step_names_the_tensor_whose_gradient_velocity_or_weights_overflow(kernels):
    """Each range check of the step (both kernels) raises on a finite value past 2^62 and
    names its tensor, instead of casting garbage or wrapping."""
    assert coder.fast(torch.zeros(2, dtype=torch.int64), 3) is kernels
    layout = rsgd.Layout.of({"w": torch.zeros(3), "b": torch.zeros(2)})

    def attempt(theta, v, direction, lr=0.0, n=1 << 16):
        fx = rsgd.FixedPoint.for_weights(layout, torch.zeros(5, dtype=torch.float64), 0)
        fx.set_velocity_range(torch.ones(5, dtype=torch.float64), torch.tensor(0.5), 0)
        rsgd.step(torch.tensor(theta), torch.tensor(v), torch.tensor(direction,
                  dtype=torch.float64), torch.tensor(lr, dtype=torch.float64), n, fx,
                  RansBuffer(5), 3)

    big = (1 << 62) - 1
    with pytest.raises(rsgd.FixedPointOverflowError, match=r"gradient at step 3.*\['b'\]"):
        attempt([0] * 5, [0] * 5, [0, 0, 0, 0, 8.0])
    with pytest.raises(rsgd.FixedPointOverflowError, match=r"velocity at step 3.*\['w'\]"):
        attempt([0] * 5, [0, 0, big, 0, 0], [0, 0, 0.5, 0, 0])
    with pytest.raises(rsgd.FixedPointOverflowError, match=r"weights at step 3.*\['b'\]"):
        attempt([0, 0, 0, big, 0], [0, 0, 0, -(1 << 59), 0], [0] * 5, lr=1.0)
    with pytest.raises(rsgd.FixedPointOverflowError, match=r"lr·velocity at step 3.*\['b'\]"):
        attempt([0] * 5, [0, 0, 0, -(1 << 61), 0], [0] * 5, lr=1.0)
    with pytest.raises(NonFiniteError, match=r"gradient at step 3 is not finite.*\['w'\]"):
        attempt([0] * 5, [0] * 5, [math.nan, 0, 0, 0, 0])
    attempt([0] * 5, [0, 0, big - (1 << 60), 0, 0], [0, 0, 0.5, 0, 0])  # in range: no error
    attempt([big] * 5, [big, -big, big, 0, 0], [0] * 5)  # at the limit, rounding to 2^62


def test_diverging_run_raises_instead_of_wrapping():
    space = hd.Space({"lr": hd.Real(50.0, low=1e-4, high=100.0, log=True)})
    p = problem(mlp(), space, hd.optim.SGD(momentum=0.9))
    with pytest.raises(NonFiniteError, match="parameter"):
        hd.hypergrad(p, steps=200, method="reversible", headroom_bits=2)


# -- hypergradients ---------------------------------------------------------------------------
def l2_reg(params, hp):
    return hp["l2"] * sum((p * p).sum() for p in params.values())


CASES = {
    "global": ({"lr": LR, "weight_decay": WD, "momentum": hd.Real(0.875, low=0.0, high=0.99)},
               hd.optim.SGD(momentum=0.9), {}),
    "per-layer": ({"lr": hd.Real(0.05, low=1e-4, high=1.0, log=True, per="layer"),
                   "momentum": hd.Real(0.75, low=0.0, high=0.99, per="layer"),
                   "weight_decay": hd.Real(1e-2, low=1e-6, high=1.0, log=True, per="layer")},
                  hd.optim.SGD(momentum=0.9), {}),
    "per-parameter-wd": ({"weight_decay": hd.Real(1e-2, low=1e-6, high=1.0, log=True,
                                                  per="parameter"), "lr": LR},
                         hd.optim.SGD(momentum=0.5), {}),
    "per-parameter-momentum": ({"momentum": hd.Real(0.75, low=0.05, high=0.99,
                                                     per="parameter"), "lr": LR},
                               hd.optim.SGD(momentum=0.5), {}),
    "piecewise": ({"lr": hd.Real(0.05, low=1e-4, high=1.0, log=True, schedule=hd.Piecewise(3)),
                   "momentum": hd.Real(0.75, low=0.0, high=0.99, schedule=hd.Piecewise(2))},
                  hd.optim.SGD(momentum=0.9), {}),
    "regularizer": ({"l2": hd.Real(1e-2, low=1e-6, high=1.0, log=True), "lr": LR},
                    hd.optim.SGD(momentum=0.875), {"regularizer": l2_reg}),
}


def _build(name):
    space, opt, kw = CASES[name]
    return problem(mlp(), hd.Space(space), opt, **kw)


def _close(a, b, rel):
    for k in b:
        ga, gb = (a[k], b[k]) if isinstance(b[k], dict) else ({"": a[k]}, {"": b[k]})
        for q in gb:
            scale = float(gb[q].abs().max())
            assert float((ga[q] - gb[q]).abs().max()) <= rel * max(scale, 1e-12), (k, q)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reverse_and_reverses_exactly(name):
    p = _build(name)
    a = hd.hypergrad(p, steps=STEPS, method="reversible")
    b = hd.hypergrad(p, steps=STEPS, method="reverse")
    assert a.stats["reversal_exact"] is True
    assert a.value == pytest.approx(b.value, rel=1e-9)
    _close(a.grad, b.grad, 1e-6)
    _close(a.raw_grad, b.raw_grad, 1e-6)
    assert a.stats["peak_memory_mb"] >= 0 and a.stats["buffer_bits_per_param_step"] > 0


@pytest.mark.parametrize("name", ["global", "per-layer", "regularizer"])
def test_matches_central_finite_differences(name):
    p = _build(name)
    res = hd.hypergrad(p, steps=STEPS, method="reversible")
    direction = {k: v for k, v in _direction(p.hparams).items()}
    assert dot(res.grad, direction) == pytest.approx(fd_directional(p, direction, steps=STEPS),
                                                     rel=1e-5, abs=1e-9)


def _direction(values, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(v):  # momentum moves too: its values are multiples of 1/2^16, FD stays off-grid-free
        return torch.rand(v.shape, generator=g, dtype=v.dtype) * v.abs().clamp_min(1e-3)

    return {n: ({q: r(x) for q, x in v.items()} if isinstance(v, dict) else r(v))
            for n, v in values.items()}


def test_momentum_is_quantised_used_and_reported():
    """0.9 is used as 58982/65536: the gradient equals reverse mode at that value."""
    space = hd.Space({"lr": LR, "momentum": hd.Real(0.9, low=0.0, high=0.99)})
    p = problem(logreg(), space, hd.optim.SGD(momentum=0.9))
    res = hd.hypergrad(p, steps=STEPS, method="reversible")
    q = 58982 / 65536
    assert res.stats["momentum_used"] == q
    ref = hd.hypergrad(p, steps=STEPS, method="reverse", hparams={"momentum": q})
    _close(res.grad, ref.grad, 1e-6)
    fixed = problem(logreg(), hd.Space({"lr": LR}), hd.optim.SGD(momentum=0.98))
    assert hd.hypergrad(fixed, steps=2, method="reversible").stats["momentum_used"] == \
        round(0.98 * 65536) / 65536


def test_buffer_bits_approach_log2_one_over_momentum():
    space = hd.Space({"lr": hd.Real(0.02, low=1e-4, high=1.0, log=True)})
    p = problem(logreg(), space, hd.optim.SGD(momentum=0.9), batch_size=48)
    T = 800  # T·bound = 122 bits a weight: more than the 64-bit heads alone
    res = hd.hypergrad(p, steps=T, method="reversible")
    bound = math.log2(65536 / 58982)
    assert res.stats["reversal_exact"]
    assert bound <= res.stats["buffer_bits_per_param_step"] <= 1.1 * bound + 64 / T


def test_refuses_other_optimizers_and_buffers():
    for opt in (hd.optim.Adam(), hd.optim.SGD(momentum=0.0), hd.optim.SGD(momentum=0.9,
                                                                        nesterov=True)):
        p = problem(logreg(), hd.Space({"lr": LR}), opt)
        with pytest.raises(HyperparameterError, match="SGD with momentum"):
            hd.hypergrad(p, steps=2, method="reversible")
    x, y = image_data()
    p = problem(bn_convnet(), hd.Space({"lr": LR}), hd.optim.SGD(momentum=0.9), x=x, y=y,
                eval_mode=False)
    with pytest.raises(HyperparameterError, match="buffers"):
        hd.hypergrad(p, steps=2, method="reversible")
    p = problem(logreg(), hd.Space({"lr": LR, "momentum": hd.Real(0.5, low=0.0, high=0.99)}),
                hd.optim.SGD(momentum=0.9))
    with pytest.raises(HyperparameterError, match="momentum"):
        hd.hypergrad(p, steps=2, method="reversible", hparams={"momentum": 1e-7})


def _value(model, x, y, space, opt, val):
    p = hd.Problem(model, optimizer=opt, space=space, train=(x, y), val=val, batch_size=16,
                   seed=3)
    return hd.hypergrad(p, steps=STEPS, method="greedy").value


def test_initial_weight_scales_and_training_inputs_match_finite_differences():
    """dE/d(scale of a layer's initial weights) and dE/dX_train along a direction, against
    central differences of the float64 run (momentum 0.875 is exact as n/2^16)."""
    space, opt = hd.Space({"lr": LR}), hd.optim.SGD(momentum=0.875, weight_decay=1e-3)
    x, y = helpers_data()
    val = (x[:20] + 0.1, y[:20])
    p = hd.Problem(mlp(), optimizer=opt, space=space, train=(x, y), val=val, batch_size=16,
                   seed=3)
    res = hd.hypergrad(p, steps=STEPS, method="reversible", initial_grad=True, inputs_grad=True)
    assert res.stats["reversal_exact"]
    h = 1e-6
    for layer in ("0.weight", "2.weight"):
        vals = []
        for sign in (1, -1):
            m = mlp()
            with torch.no_grad():
                dict(m.named_parameters())[layer].mul_(1 + sign * h)
            vals.append(_value(m, x, y, space, opt, val))
        fd = (vals[0] - vals[1]) / (2 * h)
        assert res.stats["init_scale_grad"][layer] == pytest.approx(fd, rel=1e-5, abs=1e-9)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(5),
                            dtype=x.dtype)
    fd = (_value(mlp(), x + h * direction, y, space, opt, val)
          - _value(mlp(), x - h * direction, y, space, opt, val)) / (2 * h)
    got = float((res.stats["train_inputs_grad"] * direction).sum())
    assert got == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_float32_model_reverses_exactly_and_unknown_options_are_refused():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x, y = helpers_data()
    p = hd.Problem(model, optimizer=hd.optim.SGD(momentum=0.9), space=hd.Space({"lr": LR}),
                   train=(x.float(), y), val=(x[:20].float(), y[:20]), batch_size=16, seed=3)
    res = hd.hypergrad(p, steps=20, method="reversible")
    ref = hd.hypergrad(p, steps=20, method="reverse",
                       hparams={"lr": torch.tensor(0.05)})
    assert res.stats["reversal_exact"]
    assert float(res.grad["lr"]) == pytest.approx(float(ref.grad["lr"]), rel=1e-3)
    with pytest.raises(HyperparameterError, match="unknown option"):
        hd.hypergrad(p, steps=2, method="reversible", window=3)


def test_a_reversal_that_misses_warns(monkeypatch):
    p = problem(logreg(), hd.Space({"lr": LR}), hd.optim.SGD(momentum=0.9))
    monkeypatch.setattr(RansBuffer, "matches", lambda self, snap: False)
    with pytest.warns(RuntimeWarning, match="bit for bit"):
        res = hd.hypergrad(p, steps=3, method="reversible")
    assert res.stats["reversal_exact"] is False


# -- initial-weight scales and training inputs as hyperparameters of the space ------------------
def test_init_scale_per_layer_matches_reverse_and_finite_differences():
    """"init_scale" per layer scales θ_0 (Sec. 3.3): reversible equals reverse mode to 1e-6
    and a central difference along a direction; the old initial_grad stats still agree."""
    space = hd.Space({"lr": LR, "init_scale": hd.Real(1.0, low=0.1, high=10.0, log=True,
                                                       per="layer")})
    p = problem(mlp(), space, hd.optim.SGD(momentum=0.875, weight_decay=1e-3))
    p.set_hparams({"init_scale": {"0.weight": 0.7, "2.bias": 1.5}})
    assert torch.equal(p.init_state().params["0.weight"], p.params0["0.weight"] * 0.7)
    a = hd.hypergrad(p, steps=STEPS, method="reversible", initial_grad=True)
    b = hd.hypergrad(p, steps=STEPS, method="reverse")
    assert a.stats["reversal_exact"] and a.value == pytest.approx(b.value, rel=1e-9)
    _close(a.grad, b.grad, 1e-6)
    _close(a.raw_grad, b.raw_grad, 1e-6)
    assert max(abs(float(g)) for g in a.grad["init_scale"].values()) > 1e-4
    # d/ds_l = <dE/dθ_0, θ_init> over the layer: the initial_grad stat
    for k, g in a.grad["init_scale"].items():
        assert float(g) == pytest.approx(a.stats["init_scale_grad"][k], rel=1e-9, abs=1e-12)
    direction, base, h = _direction(p.hparams), p.hparams, 1e-6

    def at(sign):  # E(s_T) with every hyperparameter moved by sign·h along the direction
        p.set_hparams({n: ({q: b[q] + sign * h * direction[n][q] for q in b}
                           if isinstance(b, dict) else b + sign * h * direction[n])
                       for n, b in base.items()})
        return hd.hypergrad(p, steps=STEPS, method="truncated", window=1).value

    fd = (at(1) - at(-1)) / (2 * h)
    p.set_hparams(base)
    assert dot(a.grad, direction) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_train_inputs_as_a_hyperparameter_match_reverse():
    """"train_inputs" holds the whole training set's inputs (Sec. 3.4): its hypergradient by
    reversal equals reverse mode to 1e-6 and the inputs_grad stat; mini-batches and forward
    mode are refused, naming the hyperparameter."""
    x, y = helpers_data(n=12)
    space = hd.Space({"lr": LR, "train_inputs": hd.Real(0.0, low=-5.0, high=5.0)})
    p = problem(mlp(), space, hd.optim.SGD(momentum=0.875), x=x.clamp(-4, 4), y=y,
                batch_size=12)
    assert torch.equal(p.hparams["train_inputs"], x.clamp(-4, 4))
    p.set_hparams({"train_inputs": x.clamp(-4, 4) * 0.5})
    a = hd.hypergrad(p, steps=STEPS, method="reversible", inputs_grad=True)
    b = hd.hypergrad(p, steps=STEPS, method="reverse")
    assert a.stats["reversal_exact"] and a.value == pytest.approx(b.value, rel=1e-9)
    assert a.grad["train_inputs"].shape == x.shape
    _close(a.grad, b.grad, 1e-6)
    _close(a.raw_grad, b.raw_grad, 1e-6)
    _close({"x": a.stats["train_inputs_grad"]}, {"x": b.grad["train_inputs"]}, 1e-6)
    with pytest.raises(HyperparameterError, match="train_inputs"):
        problem(mlp(), space, hd.optim.SGD(momentum=0.875), x=x, y=y, batch_size=4)
    with pytest.raises(HyperparameterError, match="train_inputs"):
        hd.hypergrad(p, steps=2, method="forward")


def test_engine_reset_reverses_to_the_reset_state_like_truncation():
    """ReversibleEngine.reset makes the current state the start: run() with a reset after
    T - W steps gives truncated backprop's hypergradient over the last W steps, exactly
    reversed to the reset state."""
    from hyperdescent.hypergrad.engine import run
    from hyperdescent.hypergrad.reversible import ReversibleEngine

    p = _build("per-layer")
    values, _ = __import__("hyperdescent.hypergrad.reversible",
                           fromlist=["prepare"]).prepare(p, None, 1 << 16, 10)
    T, W = 8, 3
    eng = ReversibleEngine(p, T, values)
    step = eng.step

    def step_with_reset(carry, state, batch, leaves, t):
        return step(eng.reset(carry) if t == T - W else carry, state, batch, leaves, t)

    eng.step = step_with_reset
    value, grads = run(eng, p, T, values)
    ref = hd.hypergrad(p, steps=T, method="truncated", window=W, hparams=values)
    assert eng.stats["reversal_exact"]
    assert value == pytest.approx(ref.value, rel=1e-9)
    flat = hd.space.flatten(ref.grad)
    for k, g in grads.items():
        assert float((g - flat[k]).abs().max()) <= 1e-6 * max(float(flat[k].abs().max()), 1e-12)
