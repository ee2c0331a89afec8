"""What a rollback halves: the step sizes (`backtrack`, lr by default) when the weights grew
since the snapshot or the loss is not finite, and the regularizers (`regularizers`, weight decay
by default) when the weights shrank while the loss climbed: too much weight decay pulls them in,
and halving lr then only slows the meta-steps that would bring weight decay back down."""

import dataclasses
import math

import pytest
from helpers import data, mlp

import hyperdescent as hd


def tuner(per="global", with_wd=True, **kw):
    """meta_lr 0 (unless `kw` says otherwise), so every value stays at its start until a
    rollback halves it."""
    x, y = data(n=64)
    space = {"lr": hd.Real(0.05, low=1e-4, high=1.0, log=True)}
    if with_wd:
        space["weight_decay"] = hd.Real(1e-3, low=1e-6, high=0.1, log=True, per=per)
    p = hd.Problem(mlp(), optimizer=hd.optim.SGD(momentum=0.9), space=hd.Space(space),
                   train=(x, y), val=(x[:24], y[:24]), batch_size=16, seed=0)
    t = hd.OnlineTuner(p, **{"meta_lr": 0.0, "snapshot_every": 5, **kw})
    t.run(12)
    return t


def roll_back(t, weight_scale, loss=5.0):
    """Scale the weights (as a run that shrank or grew them would), then roll back."""
    t.state = dataclasses.replace(t.state, params={k: v * weight_scale
                                                   for k, v in t.state.params.items()})
    return t._rollback({"step": t.t - 1, "train_loss": loss, "hparams": {}})


def values(t):
    hp = t.hparams
    wd = hp.get("weight_decay")
    return float(hp["lr"]), (None if wd is None else
                             sorted(float(v) for v in wd.values()) if isinstance(wd, dict)
                             else float(wd))


def test_shrunk_weights_halve_weight_decay_not_lr():
    t = tuner()
    event = roll_back(t, 0.5)
    assert event["halved"] == ["weight_decay"] and t.events[-1]["halved"] == ["weight_decay"]
    assert values(t) == (pytest.approx(0.05), pytest.approx(5e-4))
    event = roll_back(t, 0.5)  # a second rollback to the same snapshot halves the halved value
    assert values(t) == (pytest.approx(0.05), pytest.approx(2.5e-4))


def test_grown_weights_or_a_non_finite_loss_halve_lr():
    t = tuner()
    assert roll_back(t, 2.0)["halved"] == ["lr"]
    assert values(t) == (pytest.approx(0.025), pytest.approx(1e-3))
    t = tuner()
    assert roll_back(t, 0.5, loss=math.nan)["halved"] == ["lr"]
    assert values(t) == (pytest.approx(0.025), pytest.approx(1e-3))


def test_per_layer_weight_decay_is_halved_on_every_layer():
    t = tuner(per="layer")
    before = values(t)[1]
    assert roll_back(t, 0.5)["halved"] == ["weight_decay"]
    assert values(t)[1] == pytest.approx([v / 2 for v in before])
    assert values(t)[0] == pytest.approx(0.05)


def test_without_a_regularizer_to_halve_lr_is_backtracked():
    t = tuner(with_wd=False)
    assert roll_back(t, 0.5)["halved"] == ["lr"]
    t = tuner(regularizers=())
    assert roll_back(t, 0.5)["halved"] == ["lr"]
    assert values(t) == (pytest.approx(0.025), pytest.approx(1e-3))


def test_regularizers_are_checked_by_name():
    assert tuner(regularizers="weight_decay").config["regularizers"] == ("weight_decay",)
    with pytest.raises(hd.HyperparameterError, match="regularizers names \\['l2'\\]"):
        tuner(regularizers=("l2",))
    with pytest.raises(hd.HyperparameterError, match="regularizers must be a tuple"):
        tuner(regularizers=3)
    # the default names a hyperparameter the space may lack: then it is simply not there
    assert tuner(with_wd=False).config["regularizers"] == ("weight_decay",)


def test_a_saved_tuner_keeps_its_regularizers(tmp_path):
    t = tuner(regularizers=())
    t.save(tmp_path / "t.pt")
    back = hd.OnlineTuner.load(tmp_path / "t.pt", t.problem)
    assert back.config["regularizers"] == ()


def test_equal_norms_are_not_shrunk_weights():
    """Weights whose norm did not fall (the very weights of the snapshot rolled back to) are
    no sign of over-regularization: the step sizes are halved."""
    t = tuner()
    older = t.guard._snapshots[0]["record"]["state"]["params"]  # what a rollback restores
    t.state = dataclasses.replace(t.state, params={k: v.clone() for k, v in older.items()})
    assert t._rollback({"step": t.t - 1, "train_loss": 5.0, "hparams": {}})["halved"] == ["lr"]


@pytest.mark.parametrize("per", ["global", "layer"])
def test_a_halved_value_stays_inside_its_bounds(per):
    """Weight decay at its lower bound stays there when a rollback halves it."""
    x, y = data(n=64)
    space = hd.Space({"lr": hd.Real(0.05, low=1e-4, high=1.0, log=True),
                      "weight_decay": hd.Real(1e-6, low=1e-6, high=0.1, log=True, per=per)})
    p = hd.Problem(mlp(), optimizer=hd.optim.SGD(momentum=0.9), space=space, train=(x, y),
                   val=(x[:24], y[:24]), batch_size=16, seed=0)
    t = hd.OnlineTuner(p, meta_lr=0.0, snapshot_every=5)
    t.run(12)
    assert roll_back(t, 0.5)["halved"] == ["weight_decay"]
    wd = values(t)[1]
    assert wd == (pytest.approx([1e-6] * len(wd)) if per == "layer" else pytest.approx(1e-6))
    # the raw (log) coordinates themselves, not only the values read back through the bounds
    raw = [v for k, v in t.meta.values().items() if k.startswith("weight_decay")]
    assert all(float(v.min()) >= math.log(1e-6) - 1e-12 for v in raw)


def test_the_meta_lr_floor_is_reported_once():
    """With meta_lr_floor 1, every rollback is held at the floor; the event says so once."""
    t = tuner(meta_lr=0.1, meta_lr_floor=1.0)
    for _ in range(3):
        roll_back(t, 0.5)
    assert [e["event"] for e in t.events].count("meta_lr_floor") == 1
    assert t.meta_lr == pytest.approx(t.config["meta_lr"])
