"""The divergence guard's noise arithmetic and argument checks, by its module functions:
the running average's standard deviation against the variance sum written out, the noise
estimate on few and on many differences, errors naming their input, and records from before
a statistic existed."""

import math

import pytest

import hyperdescent as hd
from hyperdescent.tuners.guard import DivergenceGuard, ema_sd, noise_sd


def test_ema_sd_is_the_sd_of_a_running_average_started_at_the_first_loss():
    """m_1 = x_1, m_n = 0.9 m_{n-1} + 0.1 x_n on white noise of sd 1: Var m_n is
    0.81^(n-1) + sum_{k=2..n} 0.01 * 0.81^(n-k)."""
    for n in range(1, 40):
        var = 0.81 ** (n - 1) + sum(0.01 * 0.81 ** (n - k) for k in range(2, n + 1))
        assert ema_sd(n) == pytest.approx(math.sqrt(var), rel=1e-12), n
    assert ema_sd(1) == 1.0
    assert ema_sd(10 ** 4) == pytest.approx(math.sqrt(0.1 / 1.9), rel=1e-12)


def test_noise_sd_on_few_and_on_many_differences():
    assert noise_sd([]) == noise_sd([1.0, -1.0, 2.0]) == 0.0  # below 4: no estimate
    assert noise_sd([0.5] * 30) == 0.0  # a steady trend has no noise
    alt = [1.0, -1.0] * 5  # median 0, every deviation 1
    plain = math.sqrt(10 / 9 / 2)  # few differences: the plain sd / sqrt 2 is larger
    assert noise_sd(alt) == pytest.approx(plain, rel=1e-12)
    q90 = 1.6449 * math.sqrt(2)
    assert noise_sd([1.0, -1.0] * 20) == pytest.approx(1 / q90, rel=1e-12)
    # a lone spike among many differences does not move the quantile estimate
    many = [0.1 * ((i * 7) % 11 - 5) for i in range(40)]
    assert noise_sd(many + [50.0]) == pytest.approx(noise_sd(many + [0.0]), rel=0.2)
    assert noise_sd(many + [50.0]) < 1.0


@pytest.mark.parametrize("kw,name", [
    (dict(spike_factor=0.5), "spike_factor"), (dict(trend_factor=math.nan), "trend_factor"),
    (dict(giveback=-0.1), "giveback"), (dict(noise_tolerance=True), "noise_tolerance"),
    (dict(meta_lr_floor=1.5), "meta_lr_floor"), (dict(meta_lr_floor="0.1"), "meta_lr_floor"),
    (dict(snapshot_every=0), "snapshot_every"), (dict(snapshot_every=2.0), "snapshot_every"),
    (dict(max_rollbacks=-1), "max_rollbacks"),
])
def test_bad_guard_settings_are_refused_by_name(kw, name):
    with pytest.raises(hd.HyperparameterError, match=name):
        DivergenceGuard(**kw)


def test_edge_settings_are_accepted():
    g = DivergenceGuard(spike_factor=1.0, trend_factor=1.0, giveback=0.0, noise_tolerance=0.0,
                        meta_lr_floor=0.0, snapshot_every=1, max_rollbacks=0)
    assert g.max_rollbacks == 0 and g.meta_lr_floor == 0.0
    assert DivergenceGuard(meta_lr_floor=1.0).backoff(0.4, 0.4) == (0.4, True)


def test_a_record_saved_before_the_noise_statistics_existed_still_loads():
    """A state record with only the running averages and the counters (no last loss,
    differences, count or best sd) loads with their starting values."""
    g = DivergenceGuard()
    g.load_state_dict({"rollbacks": 2, "smooth": [1.0, 1.2, 0.9], "snapshots": []})
    assert g.rollbacks == 2 and g.smooth == (1.0, 1.2, 0.9)
    assert g.last is None and list(g.diffs) == [] and g.count == 0 and g.best_sd == 1.0
    assert g.noise == 0.0
    # and goes on judging: the first healthy loss after the load starts the differences
    assert not g.diverged(10, 0.95) and g.last == 0.95 and list(g.diffs) == []
    assert not g.diverged(11, 0.93) and list(g.diffs) == [pytest.approx(-0.02)]


def test_four_differences_are_enough_for_a_noise_estimate():
    assert noise_sd([1.0, -1.0, 1.0, -1.0]) > 0.0


def test_a_loaded_guard_keeps_its_noise_window_and_two_snapshots():
    g = DivergenceGuard()
    for t, loss in enumerate([1.0 + 0.01 * ((7 * i) % 5) for i in range(80)], 1):
        assert not g.diverged(t, loss)
    for i in range(3):
        g.snapshot({"step": i})
    sd = g.state_dict()
    assert len(sd["diffs"]) == 50  # the window, not every difference seen
    back = DivergenceGuard()
    back.load_state_dict(sd)
    assert list(back.diffs) == list(g.diffs) and back.noise == g.noise > 0
    back.diffs.append(0.5)
    assert len(back.diffs) == 50  # still a window of 50 after the load
    for i in range(3, 5):  # two more snapshots push out the loaded ones: two are kept
        back.snapshot({"step": i})
    assert back.rollback() == {"step": 3}
