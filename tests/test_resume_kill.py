"""OfflineTuner and STNTrainer killed with SIGKILL at a random step resume from their last
checkpoint to the end of an uninterrupted run, bit for bit (weights, hyperparameters, every
history record), in float64 and float32."""

import multiprocessing
import os
import random
import signal
import time

import pytest
import torch

import hyperdescent as hd
from hyperdescent import stn
from hyperdescent.tuners.offline import OfflineTuner

# (total steps, checkpoint interval): meta-steps for the offline tuner, steps for the STN
LENGTH = {"offline": (5, 1), "stn": (24, 3)}


def _data(dtype, n, d=5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    return x, torch.randint(0, classes, (n,), generator=g)


def _offline(dtype):
    x, y = _data(dtype, 48)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3)).to(dtype)
    space = hd.Space({"lr": hd.Real(0.1, low=0.0, high=1.0, schedule=hd.Piecewise(3)),
                      "weight_decay": hd.Real(1e-3, low=0.0, high=0.1)})
    problem = hd.Problem(model, optimizer=hd.optim.SGD(momentum=0.5), space=space,
                         train=(x, y), val=(x[:20] + 0.1, y[:20]), batch_size=12, seed=3)
    return problem


SPACE = hd.Space({"dropout": hd.Real(0.3, low=0.0, high=0.9),
                  "noise": hd.Real(0.1, low=0.0, high=1.0)})
STN_OPTS = dict(batch_size=16, lr=0.05, warmup_steps=3, hyper_lr=0.05, seed=3,
                augment=stn.Augmentation(noise="noise"))


def _stn_parts(dtype):
    train, val = _data(dtype, 64, 6), _data(dtype, 32, 6, seed=1)
    torch.manual_seed(1)
    seq = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                              torch.nn.Linear(16, 3)).to(dtype)
    return stn.from_sequential(seq, SPACE), train, val


def build(kind, dtype):
    if kind == "offline":
        return OfflineTuner(_offline(dtype), steps=6, meta_steps=LENGTH["offline"][0])
    model, train, val = _stn_parts(dtype)
    return stn.STNTrainer(model, SPACE, train, val, **STN_OPTS)


def load(kind, dtype, path):
    if kind == "offline":
        return OfflineTuner.load(path, _offline(dtype))
    model, train, val = _stn_parts(dtype)
    return stn.STNTrainer.load(path, model, SPACE, train, val, **STN_OPTS)


def position(tuner):
    return tuner.m if isinstance(tuner, OfflineTuner) else tuner.t


def finish(kind, tuner, **kw):
    total, _ = LENGTH[kind]
    return tuner.run(meta_steps=total, **kw) if kind == "offline" else tuner.run(total, **kw)


def _child(kind, dtype, path, kill_at, conn):
    """The run that is killed: reports each step's position, checkpointing as it goes; it
    waits for the kill a little after `kill_at` (and before its last step), so that the kill
    lands while it runs, anywhere in a step or a checkpoint write, yet never after its end."""
    total, _ = LENGTH[kind]

    def tick(tuner, record):
        conn.send(position(tuner))
        time.sleep(60 if position(tuner) >= min(kill_at + 2, total - 1) else 0.003)
    _, every = LENGTH[kind]
    finish(kind, build(kind, dtype), checkpoint=path, checkpoint_every=every, callback=tick)


def _plain(x):
    if isinstance(x, torch.Tensor):
        return (str(x.dtype), x.detach().tolist())
    if isinstance(x, dict):  # wall times and memory readings are measured; the rest computed
        return {k: _plain(v) for k, v in x.items()
                if "wall" not in str(k) and "memory" not in str(k)}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def outcome(tuner):
    out = {"history": _plain(tuner.history), "hparams": _plain(tuner.hparams),
           "weights": _plain(dict(tuner.model.state_dict())), "position": position(tuner)}
    for name in ("raw", "scale", "events"):
        if hasattr(tuner, name):
            out[name] = _plain(getattr(tuner, name))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kind", ["offline", "stn"])
def test_a_run_sigkilled_at_a_random_step_resumes_bit_identical(tmp_path, kind, dtype):
    total, every = LENGTH[kind]
    # position every + 1 is reported after the first checkpoint was written in full
    kill_at = random.randrange(every + 1, total)
    path = tmp_path / "ck.pt"
    # torch.optim imports torch._dynamo on first use (seconds): once here, not in each child
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    recv, send = multiprocessing.Pipe(duplex=False)
    # forked: the child starts at once, with torch and the package already imported
    child = multiprocessing.get_context("fork").Process(target=_child,
                                                        args=(kind, dtype, str(path), kill_at, send))
    child.start()
    last = 0
    while last < kill_at and recv.poll(60):
        last = recv.recv()
    os.kill(child.pid, signal.SIGKILL)
    child.join(60)
    assert child.exitcode == -signal.SIGKILL, "the child finished before the kill"
    assert path.exists(), f"no checkpoint written by step {last}"
    resumed = load(kind, dtype, path)
    start = position(resumed)
    assert every <= start < total  # from a checkpoint the killed run wrote
    finish(kind, resumed)
    whole = finish(kind, build(kind, dtype))
    assert outcome(resumed) == outcome(whole), f"killed after step {last}, resumed at {start}"
