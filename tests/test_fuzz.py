"""Fuzzing every public entry point a user types arguments into: any input either works or
raises the library's own error type (HyperdescentError, or the argument parser's exit for the
command line), never a bare exception from deep inside torch or Python."""

import functools
import importlib
import math
import os

import pytest
import torch
from helpers import data, mlp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hyperdescent as hd
from hyperdescent import cli
from hyperdescent.experiment.config import load_config, validate_config
from hyperdescent.experiment.runners import build_space
from hyperdescent.tasks import get as get_task

# HD_FUZZ_EXAMPLES raises the count for a long hunt (benchmarks/reliability.py)
EXAMPLES = int(os.environ.get("HD_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# anything a user might type where a number, a flag or a name is expected
junk = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.lists(st.floats(-2, 2), max_size=3), st.tuples(st.floats(-2, 2), st.floats(-2, 2)),
    st.dictionaries(st.text(max_size=3), st.floats(-2, 2), max_size=2),
    st.sampled_from(["global", "layer", "parameter", "lr", "0.1", "nan", "-1"]),
    st.builds(torch.tensor, st.floats(-2, 2)),
)
small_float = st.one_of(st.floats(-3, 3), st.sampled_from([0.0, 1e-5, 0.5, 1.0, 2.0]))


def attempt(fn, *args, **kwargs):
    """Call fn; our error types are an accepted outcome, any other exception fails the test."""
    try:
        return fn(*args, **kwargs)
    except hd.HyperdescentError:
        return None


@functools.lru_cache(maxsize=1)
def tiny_problem_parts():
    x, y = data(n=24)
    return x, y


def tiny_problem(optimizer=None):
    x, y = tiny_problem_parts()
    space = hd.Space({"lr": hd.Real(0.05, low=1e-4, high=1.0, log=True),
                      "momentum": hd.Real(0.5, low=0.0, high=0.99),
                      "weight_decay": hd.Real(1e-3, low=1e-6, high=0.1, log=True,
                                              per="layer")})
    return hd.Problem(mlp(), optimizer=optimizer or hd.optim.SGD(momentum=0.5), space=space,
                      train=(x, y), val=(x, y), batch_size=8)


@FUZZ
@given(init=st.one_of(small_float, junk), low=st.one_of(small_float, junk),
       high=st.one_of(small_float, junk), log=st.one_of(st.booleans(), junk),
       per=st.one_of(st.sampled_from(["global", "layer", "parameter"]), junk))
def test_real_either_builds_a_valid_declaration_or_raises_our_error(init, low, high, log, per):
    r = attempt(hd.Real, init, low=low, high=high, log=log, per=per)
    if r is None:
        return
    assert r.low < r.high and r.low <= r.init <= r.high and math.isfinite(r.init)
    nat = r.to_natural(r.to_raw(torch.tensor(r.init, dtype=torch.float64)))
    assert r.low <= nat.item() <= r.high


@FUZZ
@given(init=junk, low=junk, high=junk, log=junk, choices=junk)
def test_int_and_categorical_either_build_or_raise_our_error(init, low, high, log, choices):
    i = attempt(hd.Int, init, low, high, log=log)
    if i is not None:
        assert isinstance(i.init, int) and i.low <= i.init <= i.high
    c = attempt(hd.Categorical, choices)
    if c is not None:
        assert c.init in c.choices
    attempt(hd.Piecewise, init)


@FUZZ
@given(spec=st.one_of(junk, st.dictionaries(st.one_of(st.text(max_size=4), st.integers()),
                                            st.one_of(junk, st.just(hd.Real(0.1))),
                                            max_size=3)))
def test_space_either_builds_or_raises_our_error(spec):
    space = attempt(hd.Space, spec)
    if space is not None:
        assert all(isinstance(n, str) and "/" not in n for n in space)


@FUZZ
@given(values=st.one_of(junk, st.dictionaries(
    st.sampled_from(["lr", "momentum", "weight_decay", "width", ""]),
    st.one_of(junk, small_float, st.dictionaries(st.sampled_from(["0.weight", "2.bias", "x"]),
                                                 st.one_of(small_float, junk), max_size=2)),
    max_size=3)))
def test_set_hparams_either_sets_values_inside_the_bounds_or_raises_our_error(values):
    problem = tiny_problem()
    attempt(problem.set_hparams, values)
    for name, v in problem.hparams.items():
        hp = problem.space[name]
        for leaf in (v.values() if isinstance(v, dict) else [v]):
            assert torch.isfinite(leaf).all()
            assert (leaf >= hp.low).all() and (leaf <= hp.high).all()


@FUZZ
@given(cls=st.sampled_from([hd.optim.SGD, hd.optim.Adam, hd.optim.AdamW, hd.optim.RMSprop]),
       kwargs=st.dictionaries(
           st.sampled_from(["lr", "momentum", "weight_decay", "nesterov", "dampening", "betas",
                            "beta1", "beta2", "eps", "alpha", "centered", "bogus"]),
           st.one_of(small_float, junk), max_size=3))
def test_optimizers_either_build_and_step_finitely_or_raise_our_error(cls, kwargs):
    opt = attempt(cls, **kwargs)
    if opt is None:
        return
    # a built optimizer takes one finite step on a finite gradient
    p = {"w": torch.ones(3, dtype=torch.float64)}
    state = opt.init(p)
    new, _ = opt.update(p, state, {"w": torch.full((3,), 0.1, dtype=torch.float64)})
    assert torch.isfinite(new["w"]).all()


@settings(max_examples=max(EXAMPLES // 2, 1), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(kwargs=st.dictionaries(
    st.sampled_from(["method", "meta_optimizer", "meta_lr", "hyper_every", "reset_every",
                     "tune_on", "clip", "tangent", "window", "horizon", "spike_factor",
                     "trend_factor", "giveback", "snapshot_every", "max_rollbacks",
                     "backtrack", "noise_tolerance", "meta_lr_floor"]),
    st.one_of(junk, small_float, st.integers(-2, 30),
              st.sampled_from(["forward", "greedy", "truncated", "adam", "sgd", "sign", "val",
                               "train", "exact", "summed", ("lr",), ()])),
    max_size=3),
    # junk without its large integers: a valid huge step count would just run
    steps=st.one_of(st.integers(-2, 3), junk.filter(
        lambda v: not isinstance(v, int) or isinstance(v, bool) or v <= 3)))
def test_online_tuner_arguments_either_run_or_raise_our_error(kwargs, steps):
    tuner = attempt(hd.OnlineTuner, tiny_problem(), **kwargs)
    if tuner is None:
        return
    if attempt(tuner.run, steps) is not None:
        assert tuner.t == steps
        assert all(torch.isfinite(leaf).all() for leaf in tuner.raw.values())


BASE_CONFIG = {"task": "digits_logreg", "budget": {"inner_steps": 10},
               "methods": [{"label": "OHO", "kind": "oho"}, {"label": "r", "kind": "random"}]}


@FUZZ
@given(key=st.sampled_from(["task", "seeds", "budget", "steps", "space", "methods", "name",
                            "target_val_loss", "bogus"]),
       value=st.one_of(junk, st.dictionaries(
           st.sampled_from(["lr", "weight_decay", "momentum", "inner_steps", "init", "x"]),
           st.one_of(junk, st.dictionaries(st.sampled_from(["init", "low", "high", "log", "per",
                                                            "schedule"]), junk, max_size=3)),
           max_size=2)))
def test_configs_either_validate_and_build_their_spaces_or_raise_our_error(key, value):
    cfg = attempt(validate_config, {**BASE_CONFIG, key: value})
    if cfg is None:
        return
    task = get_task(cfg.task)
    for method in cfg.methods:
        space = attempt(build_space, task, cfg, method)
        if space is not None:
            assert isinstance(space, hd.Space)


@FUZZ
@given(text=st.one_of(st.text(max_size=80), st.sampled_from([
    'task = "digits_logreg"\n[budget]\ninner_steps = 5\n[[methods]]\nlabel = "a"\nkind = "oho"\n',
    'task = 3\n', '[budget\n', 'seeds = [1, 1]\n', '[[methods]]\nkind = "nope"\n'])),
    suffix=st.sampled_from(["", "\n[space.lr]\ninit = -1\n", "\nsteps = 0\n", "\x00"]))
def test_config_files_either_load_or_raise_our_error(text, suffix, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "c.toml"
    path.write_text(text + suffix)
    cfg = attempt(load_config, path)
    if cfg is not None:
        for method in cfg.methods:
            attempt(build_space, get_task(cfg.task), cfg, method)


CLI_WORDS = ["run", "compare", "report", "demo", "--out", "--method", "--budget", "--seeds",
             "--steps", "--no-progress", "--resume", "missing.toml", "missing_dir", "-1", "0",
             "abc", "1e-3", "nan", "inf", "", "--", "-x"]


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(argv=st.lists(st.sampled_from(CLI_WORDS), max_size=5))
def test_cli_arguments_either_fail_cleanly_or_exit_from_the_parser(argv, tmp_path_factory,
                                                                   monkeypatch_cli):
    out = tmp_path_factory.mktemp("cli")
    argv = [str(out / a) if a.startswith("missing") else a for a in argv]
    try:
        status = cli.main(argv)
    except SystemExit as e:  # argparse's usage error, or --help
        assert e.code in (0, 2)
        return
    assert status == 2


@pytest.fixture
def monkeypatch_cli(monkeypatch):
    """No fuzzed command line may start real work: a demo whose numbers pass the checks
    stops at the first thing it would run."""
    def refuse(*a, **k):
        raise hd.ConfigError("the fuzz test runs no experiment")
    module = importlib.import_module("hyperdescent.experiment.compare")
    monkeypatch.setattr(module, "compare", refuse)
    monkeypatch.setattr(module, "run", refuse)
