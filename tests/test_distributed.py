"""Data parallelism: 2 CPU processes (gloo) equal one process on the whole batch, in float64.

Each rank takes half of every training and validation batch; the online tuner's hyperparameter
trajectory and final weights, and the forward (also with batched rows), reverse, truncated and
reversible hypergradients, must equal a single process on the same global batches to 1e-6
relative, and so must OfflineTuner(method="fds") and the STNTrainer's hyperparameter trajectory,
perturbation scales and final weights.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hyperdescent as hd
from hyperdescent import distributed as dp
from hyperdescent.errors import DataError, HyperdescentError

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD = 2
STEPS = 12


def _problem(distributed: bool, batch_size: int = 12, optimizer=None) -> hd.Problem:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(72, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (72,), generator=g)
    # a different initialisation on each rank: rank 0's weights are broadcast at construction
    torch.manual_seed(1 + (dp.rank() if distributed else 0))
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(),
                                torch.nn.Linear(10, 3)).double()
    space = hd.Space({"lr": hd.Real(0.2, low=1e-4, high=2.0, log=True),
                      "weight_decay": hd.Real(1e-3, low=1e-6, high=1e-1, log=True)})
    return hd.Problem(model, optimizer=optimizer or hd.optim.SGD(momentum=0.9), space=space,
                      train=(x[:48], y[:48]), val=(x[48:], y[48:]), batch_size=batch_size,
                      val_batch_size=24, distributed=distributed)


def _stn(distributed: bool) -> hd.stn.STNTrainer:
    """A self-tuning MLP with tuned dropout and input noise (perturbations, masks and noise all
    drawn per example), each rank starting from different weights until rank 0's are broadcast."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(72, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (72,), generator=g)
    torch.manual_seed(1 + (dp.rank() if distributed else 0))
    space = hd.Space({"dropout0": hd.Real(0.3, low=0.0, high=0.9),
                      "noise": hd.Real(0.3, low=0.0, high=1.5)})
    seq = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Dropout(0.3),
                              torch.nn.Linear(10, 3)).double()
    model = hd.stn.from_sequential(seq, space, dropout=["dropout0"], centred=False).double()
    return hd.stn.STNTrainer(model, space, (x[:48], y[:48]), (x[48:], y[48:]), batch_size=12,
                             val_batch_size=12, lr=0.1, hyper_lr=0.05, train_steps=2,
                             augment=hd.stn.Augmentation(noise="noise"),
                             distributed=distributed)


def _results(distributed: bool) -> dict:
    """Everything the test compares, from one process or from one rank."""
    out = {}
    tuner = hd.OnlineTuner(_problem(distributed), method="forward", meta_lr=0.05)
    tuner.run(steps=STEPS)
    out["online_hparams"] = torch.tensor([[r["hparams"]["lr"], r["hparams"]["weight_decay"]]
                                          for r in tuner.history], dtype=torch.float64)
    out["online_train_loss"] = torch.tensor([r["train_loss"] for r in tuner.history],
                                            dtype=torch.float64)
    out["online_weights"] = torch.cat([p.reshape(-1) for p in tuner.state.params.values()])
    for method, options in (("forward", {}), ("reverse", {}), ("truncated", {"window": 3}),
                            ("reversible", {}), ("forward", {"batched_rows": True})):
        res = hd.hypergrad(_problem(distributed), steps=8, method=method, **options)
        if options.get("batched_rows"):  # all Hessian-vector rows in one vmapped backward
            out["forward_batched_grad"] = torch.stack([res.grad["lr"], res.grad["weight_decay"]])
            continue
        out[f"{method}_grad"] = torch.stack([res.grad["lr"], res.grad["weight_decay"]])
        out[f"{method}_value"] = torch.tensor(res.value, dtype=torch.float64)
    fds = hd.OfflineTuner(_problem(distributed), method="fds", steps=6, meta_steps=2)
    fds.run()
    out["fds_hparams"] = torch.stack([fds.hparams["lr"], fds.hparams["weight_decay"]])
    adam = hd.hypergrad(_problem(distributed, optimizer=hd.optim.Adam()), steps=6,
                        method="reverse", hparams={"lr": 0.01})
    out["reverse_adam_grad"] = torch.stack([adam.grad["lr"], adam.grad["weight_decay"]])
    stn = _stn(distributed).run(STEPS)
    out["stn_hparams"] = torch.tensor([[r["hparams"]["dropout0"], r["hparams"]["noise"]]
                                       for r in stn.history], dtype=torch.float64)
    out["stn_scale"] = torch.tensor(list(stn.scale.values()), dtype=torch.float64)
    out["stn_train_loss"] = torch.tensor([r["train_loss"] for r in stn.history],
                                         dtype=torch.float64)
    out["stn_weights"] = torch.cat([p.detach().reshape(-1) for p in stn.model.parameters()])
    return out


def _worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank,
                            world_size=WORLD)
    try:
        torch.save(_results(True), os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("dp"))
    # fork: the children inherit the imported library instead of importing it again
    mp.start_processes(_worker, args=(tmp,), nprocs=WORLD, join=True, start_method="fork")
    return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    return _results(False)


@pytest.mark.parametrize("key", ["online_hparams", "online_train_loss", "online_weights",
                                 "forward_grad", "forward_value", "reverse_grad",
                                 "reverse_value", "truncated_grad", "reverse_adam_grad",
                                 "reversible_grad", "fds_hparams", "forward_batched_grad",
                                 "stn_hparams", "stn_scale", "stn_train_loss", "stn_weights"])
def test_two_ranks_equal_one_process_on_the_whole_batch(ranks, single, key):
    want = single[key]
    assert want.abs().max() > 0
    for got in ranks:
        torch.testing.assert_close(got[key], want, rtol=1e-6, atol=1e-12)


def test_the_trajectory_moved(single):
    # the comparison above means something only if the tuners changed their hyperparameters
    for key in ("online_hparams", "stn_hparams"):
        hp = single[key]
        assert (hp[-1] - hp[0]).abs().max() > 1e-4


def test_ranks_take_disjoint_halves_of_each_batch(monkeypatch):
    monkeypatch.setattr(dp, "world_size", lambda: 2)
    x, y = torch.arange(12.0).reshape(6, 2), torch.arange(6)
    parts = []
    for r in range(2):
        monkeypatch.setattr(dp, "rank", lambda r=r: r)
        parts.append(dp.shard((x, y), "train"))
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
    with pytest.raises(DataError, match="train"):
        dp.shard((x[:5], y[:5]), "train")


def test_distributed_without_a_process_group_or_torchrun_is_refused(monkeypatch):
    for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(HyperdescentError, match="torchrun"):
        _problem(True)


def test_only_rank_zero_writes(monkeypatch, tmp_path):
    from hyperdescent.tuners.record import save_record
    monkeypatch.setattr(dp, "rank", lambda: 1)
    save_record(tmp_path / "r.pt", {"a": torch.ones(1)}, "OnlineTuner")
    assert not (tmp_path / "r.pt").exists()
    from hyperdescent.experiment.rundir import RunDir
    run = RunDir(tmp_path)
    run.log({"kind": "x"})
    run.write_summary({"a": 1})
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "summary.json").exists()
    monkeypatch.setattr(dp, "rank", lambda: 0)
    save_record(tmp_path / "r.pt", {"a": torch.ones(1)}, "OnlineTuner")
    assert (tmp_path / "r.pt").exists()
    run.log({"kind": "x"})
    run.close()
    assert run.records() == [{"kind": "x"}]


def test_backend_is_nccl_for_cuda_models_and_gloo_otherwise(monkeypatch):
    # no GPU needed: the choice is made from the device of the model's first parameter
    assert dp.default_backend("cpu") == "gloo"
    assert dp.default_backend(torch.device("cuda", 1)) == "nccl"
    assert dp.default_backend("cuda") == "nccl"
    assert dp.default_backend("meta") == "gloo"
    chosen = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend: chosen.append(backend))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    for v, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"),
                     ("MASTER_PORT", "29500")):
        monkeypatch.setenv(v, value)

    class OnDevice(torch.nn.Module):  # parameters that say they live on `device`
        def __init__(self, device):
            super().__init__()
            self.device = device

        def parameters(self, recurse=True):
            return iter([type("P", (), {"device": torch.device(self.device)})()])

    for device, want in (("cuda:0", "nccl"), ("cpu", "gloo")):
        chosen.clear()
        assert dp.setup(OnDevice(device)) is True
        assert chosen == [want]
    chosen.clear()
    dp.init("cuda", backend="gloo")  # an explicit backend wins
    assert chosen == ["gloo"]
