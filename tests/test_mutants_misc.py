"""The small shared parts of the tuners and engines, by their module-level functions: the
torch.optim name mapping, the checkpointer's cadence, the state record's copy / save / load,
random-number states, the Schedule, and the cost meter."""

import random

import pytest
import torch

import hyperdescent as hd
from hyperdescent.errors import InputTypeError
from hyperdescent.hypergrad import common
from hyperdescent.hypergrad.common import CostMeter, sample_memory
from hyperdescent.optim.names import (
    ALL_HPARAMS,
    BY_OPTIMIZER,
    hyperparameter_names,
    set_group_hparam,
)
from hyperdescent.tuners.checkpoint import Checkpointer, rng_state, set_rng_state
from hyperdescent.tuners.record import FORMAT_VERSION, copy_record, load_record, save_record
from hyperdescent.tuners.schedule import Schedule


# -- optim.names ------------------------------------------------------------------------------
def test_set_group_hparam_writes_torch_optim_keys_and_says_whether_it_did():
    sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.5)
    g = sgd.param_groups[0]
    assert set_group_hparam(g, "lr", 0.25) is True and g["lr"] == 0.25
    assert set_group_hparam(g, "momentum", 0.75) is True and g["momentum"] == 0.75
    assert set_group_hparam(g, "beta1", 0.5) is False and "betas" not in g
    assert set_group_hparam(g, "not_a_name", 1.0) is False and "not_a_name" not in g
    adam = torch.optim.Adam([torch.zeros(1, requires_grad=True)], betas=(0.9, 0.999))
    a = adam.param_groups[0]
    assert set_group_hparam(a, "beta2", 0.95) is True and a["betas"] == (0.9, 0.95)
    assert set_group_hparam(a, "beta1", 0.8) is True and a["betas"] == (0.8, 0.95)
    assert set_group_hparam(a, "momentum", 0.5) is False and "momentum" not in a
    # alpha is an RMSprop name, which an Adam group does not have
    assert "alpha" in ALL_HPARAMS and set_group_hparam(a, "alpha", 0.5) is False


def test_hyperparameter_names_by_short_name_class_or_instance():
    assert hyperparameter_names("adam") == hyperparameter_names(hd.optim.Adam) \
        == hyperparameter_names(hd.optim.Adam()) == BY_OPTIMIZER["adam"]
    assert {"lr", "beta1", "beta2", "eps", "weight_decay"} <= set(BY_OPTIMIZER["adam"])
    assert {"lr", "momentum", "dampening", "weight_decay"} <= set(BY_OPTIMIZER["sgd"])
    with pytest.raises(KeyError, match="'adagrad'"):
        hyperparameter_names("adagrad")


# -- checkpoint ---------------------------------------------------------------------------------
def test_the_checkpointer_saves_every_50_steps_by_default_and_at_the_end(tmp_path):
    saved = []
    with Checkpointer(tmp_path / "c.pt", None, saved.append) as ck:
        assert ck.every == 50 and not ck.stop
        for t in range(1, 101):
            ck.after_step(t)
    assert saved == [tmp_path / "c.pt"] * 3  # steps 50, 100, and the end
    saved.clear()
    with Checkpointer(tmp_path / "c.pt", 3, saved.append) as ck:
        for t in range(1, 8):
            ck.after_step(t)
    assert len(saved) == 3  # steps 3, 6, the end
    saved.clear()
    with Checkpointer(None, 1, saved.append) as ck:  # no path: never saves
        ck.after_step(1)
    assert saved == []
    with pytest.raises(hd.HyperdescentError, match="checkpoint_every"):
        Checkpointer(tmp_path / "c.pt", 0, saved.append)
    with pytest.raises(InputTypeError, match="checkpoint"):
        Checkpointer(3, 1, saved.append)


def test_an_exception_inside_the_checkpointer_does_not_save_a_half_done_step(tmp_path):
    saved = []
    with pytest.raises(RuntimeError), Checkpointer(tmp_path / "c.pt", 10, saved.append):
        raise RuntimeError("step failed")
    assert saved == []


def test_rng_state_round_trips_the_torch_and_python_generators():
    state = rng_state()
    a, b = torch.rand(3), random.random()
    set_rng_state(state)
    assert torch.equal(torch.rand(3), a) and random.random() == b
    assert isinstance(state["python"], list)  # plain lists: loadable with weights_only


# -- record -------------------------------------------------------------------------------------
def test_copy_record_clones_tensors_and_keeps_container_types():
    t = torch.ones(2, requires_grad=True)
    rec = {"a": (t, [t, 1]), "b": {"c": "x"}, "d": [(1, 2)]}
    out = copy_record(rec)
    assert type(out["a"]) is tuple and type(out["a"][1]) is list and type(out["d"][0]) is tuple
    assert out["b"] == {"c": "x"} and out["d"] == [(1, 2)]
    c = out["a"][0]
    assert torch.equal(c, t) and not c.requires_grad and c.data_ptr() != t.data_ptr()
    c.add_(1)
    assert torch.equal(t, torch.ones(2))


def test_save_and_load_record_round_trip_and_refuse_foreign_files(tmp_path):
    path = tmp_path / "sub" / "dir" / "r.pt"  # parents made as needed
    save_record(path, {"x": torch.arange(3), "n": 2, "t": (1, 2)}, "Kind")
    back = load_record(path, "Kind")
    assert torch.equal(back["x"], torch.arange(3)) and back["n"] == 2 and back["t"] == (1, 2)
    assert back["kind"] == "Kind" and back["format_version"] == FORMAT_VERSION
    assert [p.name for p in path.parent.iterdir()] == ["r.pt"]  # no temp file left
    with pytest.raises(hd.ConfigError, match="not a Other state record"):
        load_record(path, "Other")
    with pytest.raises(hd.ConfigError, match="does not exist"):
        load_record(tmp_path / "none.pt", "Kind")
    (tmp_path / "torn.pt").write_bytes(b"not a torch file")
    with pytest.raises(hd.ConfigError, match="cannot be read"):
        load_record(tmp_path / "torn.pt", "Kind")
    torch.save({"kind": "Kind", "format_version": FORMAT_VERSION + 1}, tmp_path / "v.pt")
    with pytest.raises(hd.ConfigError, match="format version"):
        load_record(tmp_path / "v.pt", "Kind")


# -- schedule -----------------------------------------------------------------------------------
def test_schedule_holds_its_last_value_and_round_trips_json():
    s = Schedule([{"lr": 0.1}, {"lr": 0.2}])
    assert len(s) == 2 and s.at(-1) == {"lr": 0.1} and s.at(1) == {"lr": 0.2}
    assert s.at(10) == {"lr": 0.2}
    assert Schedule.from_json(s.to_json()).values == s.values
    with pytest.raises(ValueError, match="at least one step"):
        Schedule([])


def test_schedule_attach_sets_each_steps_values_before_it():
    w = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([w], lr=1.0)
    Schedule([{"lr": 0.5}, {"lr": 0.25}]).attach(opt)
    seen = []
    for _ in range(3):
        opt.zero_grad()
        w.sum().backward()
        opt.step()
        seen.append(opt.param_groups[0]["lr"])
    assert seen == [0.5, 0.25, 0.25]
    assert w.item() == pytest.approx(1 - 0.5 - 0.25 - 0.25)


# -- cost meter ---------------------------------------------------------------------------------
def test_cost_meter_accounts_phases_memory_and_hvps(monkeypatch):
    """Peak memory above the start, read where the method calls sample_memory (RSS made
    deterministic here: the allocator keeps freed pages, so a real RSS need not rise)."""
    rss = {"bytes": 100 * 2 ** 20}
    monkeypatch.setattr(common, "rss_bytes", lambda: rss["bytes"])
    with CostMeter("cpu") as meter:
        with meter.phase("a"):
            pass
        with meter.phase("a"):
            pass
        with meter.phase("b"):
            rss["bytes"] = 164 * 2 ** 20  # the method's peak, seen only by this sample
            sample_memory()
            rss["bytes"] = 100 * 2 ** 20
        meter.hvps = 7
    st = meter.stats(method="m", steps=3)
    assert set(st["phase_s"]) == {"a", "b"} and all(v >= 0 for v in st["phase_s"].values())
    assert st["hvps"] == 7 and st["method"] == "m" and st["steps"] == 3
    assert st["memory_source"] == "rss_sampled" and st["wall_time_s"] >= st["phase_s"]["b"]
    assert st["peak_memory_mb"] == 64.0
    outside = CostMeter("cpu")
    outside.sample()  # a meter that is not running may still be read
    assert outside._peak == 100 * 2 ** 20
