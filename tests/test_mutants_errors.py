"""Bad input to the tuners, the meta-optimizer and hd.hypergrad raises the library's own error
naming the input (a generated table, one row a check), before any training."""

import math

import pytest
import torch
from helpers import data, mlp

import hyperdescent as hd
from hyperdescent.tuners.meta import MetaOptimizer
from hyperdescent.tuners.offline import OfflineTuner


def _problem(space=None, train=None, test=True):
    x, y = data(n=48)
    space = space if space is not None else hd.Space(
        {"lr": hd.Real(0.05, low=1e-4, high=1.0, log=True)})
    return hd.Problem(mlp(), optimizer=hd.optim.SGD(), space=space,
                      train=(x, y) if train is None else train, val=(x[:20], y[:20]),
                      test=(x[20:], y[20:]) if test else None, batch_size=16, seed=3)


def _loader():
    x, y = data(n=48)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


ONLINE = [
    (dict(method="bogus"), "method="), (dict(meta_optimizer="rmsprop"), "meta_optimizer="),
    (dict(tune_on="test"), "tune_on="), (dict(hyper_every=0), "hyper_every"),
    (dict(hyper_every=True), "hyper_every"), (dict(reset_every=0), "reset_every"),
    (dict(method="truncated", window=0), "window"), (dict(backtrack=3), "backtrack"),
    (dict(backtrack=("lr", 3)), "backtrack"), (dict(clip=0.0), "clip"),
    (dict(meta_lr=-0.1), "meta_lr"), (dict(tangent="sum"), "tangent="),
    (dict(uoro_samples=2), "uoro"),
]


@pytest.mark.parametrize("kw,name", ONLINE, ids=[n for _, n in ONLINE])
def test_online_tuner_arguments(kw, name):
    with pytest.raises(hd.HyperparameterError, match=name):
        hd.OnlineTuner(_problem(), **kw)


def test_tuners_refuse_a_space_without_a_real_hyperparameter():
    p = _problem(space=hd.Space({}))
    with pytest.raises(hd.HyperparameterError, match="no Real hyperparameter"):
        hd.OnlineTuner(p)
    with pytest.raises(hd.HyperparameterError, match="no Real hyperparameter"):
        OfflineTuner(p, steps=4)


OFFLINE = [
    (dict(method="greedy"), "method="), (dict(steps=0), "steps"), (dict(steps=2.0), "steps"),
    (dict(meta_steps=1.5), "meta_steps"), (dict(meta_optimizer="rms"), "meta_optimizer="),
    (dict(val_fraction=0.0), "val_fraction"), (dict(clamp_grad=0.0), "clamp_grad"),
    (dict(clamp_hz=-1.0), "clamp_hz"), (dict(method="reverse", clamp_hz=1.0), "clamp_hz"),
    (dict(meta_optimizer="adam", meta_lr={"lr": 0.1}), "one float"),
    (dict(meta_lr={"momentum": 0.1}), "momentum"),
]


@pytest.mark.parametrize("kw,name", OFFLINE, ids=[n for _, n in OFFLINE])
def test_offline_tuner_arguments(kw, name):
    kw = {"steps": 4, **kw}
    with pytest.raises(hd.HyperparameterError, match=name):
        OfflineTuner(_problem(), **kw)


def test_offline_data_and_retrain_checks():
    with pytest.raises(hd.DataError, match="val_fraction"):
        OfflineTuner(_problem(train=_loader()), steps=4, val_fraction=0.25)
    off = OfflineTuner(_problem(), steps=4)
    for kw, name in ((dict(on="val"), "on="), (dict(values="first"), "values="),
                     (dict(steps=0), "steps"), (dict(steps=1.5), "steps")):
        with pytest.raises(hd.HyperparameterError, match=name):
            off.retrain(**kw)
    with pytest.raises(hd.DataError, match="test="):
        OfflineTuner(_problem(test=False), steps=4).retrain()
    with pytest.raises(hd.DataError, match="retrain needs train="):
        OfflineTuner(_problem(train=_loader()), steps=4).retrain()
    with pytest.raises(hd.HyperdescentError, match="cannot be saved"):
        OfflineTuner(_problem(), steps=4, fresh_init=lambda seed: mlp()).state_dict()


@pytest.mark.parametrize("kw,name", [
    (dict(kind="lbfgs"), "meta_optimizer="), (dict(clip=0), "clip"), (dict(clip="1"), "clip"),
    (dict(lr=-1.0), "meta_lr"), (dict(lr=math.inf), "meta_lr"), (dict(lr=True), "meta_lr"),
    (dict(kind="fds", lr={"a": -1.0}), "meta_lr"), (dict(kind="fds", step_decay=1.0), "step_decay"),
])
def test_meta_optimizer_arguments(kw, name):
    with pytest.raises(hd.HyperparameterError, match=name):
        MetaOptimizer({"a": torch.zeros(2)}, **kw)
    m = MetaOptimizer({"a": torch.zeros(2)}, "sgd", lr=0.1)
    with pytest.raises(hd.HyperparameterError, match="meta_lr"):
        m.set_lr(-0.5)
    assert m.lr == 0.1


@pytest.mark.parametrize("method,kw,name", [
    ("newton", {}, "method="), ("forward", {"steps": 0}, "steps"),
    ("forward", {"steps": True}, "steps"), ("forward", {"window": 2}, "window"),
    ("truncated", {"window": 0}, "window"), ("reverse", {"checkpoint_every": 0},
                                             "checkpoint_every"),
    ("reverse", {"checkpoint_every": 1.5}, "checkpoint_every"),
    ("forward", {"tangent": "uoro", "compile": True}, "compile=True"),
])
def test_hypergrad_arguments(method, kw, name):
    kw = {"steps": 3, **kw}
    with pytest.raises(hd.HyperparameterError, match=name):
        hd.hypergrad(_problem(), method=method, **kw)


def test_methods_that_replay_refuse_a_streaming_training_set():
    p = _problem(train=_loader())
    for method in ("reverse", "truncated"):
        with pytest.raises(hd.DataError, match=f"'{method}'"):
            hd.hypergrad(p, 3, method)
    assert math.isfinite(hd.hypergrad(p, 3, "forward").value)


def test_an_unknown_option_lists_the_options_the_method_takes():
    with pytest.raises(hd.HyperparameterError, match=r"unknown option\(s\) \['windw'\].*clamp_grad"):
        hd.hypergrad(_problem(), 3, "forward", windw=2)
    with pytest.raises(hd.HyperparameterError, match="takes no options"):
        hd.hypergrad(_problem(), 3, "greedy", window=2)
