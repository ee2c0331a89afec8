"""The benchmark task: digits, a 64-128-128-10 MLP, SGD with momentum, one thread; the plain
torch.optim step every cost is divided by."""

from __future__ import annotations

import statistics
import time

LR, WD, MOMENTUM, BATCH = 0.05, 1e-4, 0.9, 128
# every timed process runs on one thread, so that the ratios do not depend on the core count
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _torch():
    """torch, set to one intra-op and one inter-op thread."""
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    return torch


def load_digits_split():
    """Digits as float32 tensors, inputs / 16; a fixed split: 1297 train, 500 validation."""
    import numpy as np
    from sklearn.datasets import load_digits

    torch = _torch()
    d = load_digits()
    perm = np.random.default_rng(0).permutation(len(d.target))
    x = torch.tensor(d.data[perm] / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target[perm], dtype=torch.int64)
    return (x[:1297], y[:1297]), (x[1297:], y[1297:])


def make_model():
    """64-128-128-10 ReLU MLP, the same initial weights in every process (seed 0)."""
    torch = _torch()
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 10))


def make_problem(train, val, wd_only: bool = False, hd=None):
    """The hyperdescent problem; its replayable batches are the batches every impl uses.
    `hd` is the package to build it with (default `hyperdescent`; ab_reverse.py passes an
    older revision's)."""
    import torch.nn.functional as F

    if hd is None:
        import hyperdescent as hd

    space = {"weight_decay": hd.Real(WD, low=1e-7, high=1e-1, log=True)}
    if not wd_only:
        space = {"lr": hd.Real(LR, low=1e-5, high=2, log=True), **space}
    return hd.Problem(make_model(), loss=F.cross_entropy,
                      optimizer=hd.optim.SGD(lr=LR, momentum=MOMENTUM, weight_decay=WD),
                      space=hd.Space(space), train=train, val=val, batch_size=BATCH,
                      val_batch_size=len(val[0]), seed=0)


class Clock:
    """Wall (time.perf_counter) and process CPU time (time.process_time) since creation."""

    def __init__(self):
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        """Seconds (wall, cpu) since creation."""
        return time.perf_counter() - self.wall0, time.process_time() - self.cpu0


class PlainSGD:
    """The reference: plain torch.optim.SGD steps (forward + backward + step), same batches;
    compiled=True runs the model through torch.compile (the like-for-like baseline of a
    compiled method)."""

    def __init__(self, problem, compiled: bool = False):
        torch = _torch()
        self.problem, self.t = problem, 0
        self.net = make_model()
        if compiled:
            self.net = torch.compile(self.net)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=LR, momentum=MOMENTUM,
                                   weight_decay=WD)

    def steps(self, n: int) -> None:
        """Run n plain steps on the next batches."""
        import torch.nn.functional as F

        for _ in range(n):
            x, y = self.problem.train_batch(self.t)
            self.opt.zero_grad(set_to_none=True)
            F.cross_entropy(self.net(x), y).backward()
            self.opt.step()
            self.t += 1

    def time_step(self, steps: int = 20, blocks: int = 3) -> tuple[float, float]:
        """(wall, cpu) seconds per step: the median over `blocks` blocks of `steps` steps."""
        walls, cpus = [], []
        for _ in range(blocks):
            clock = Clock()
            self.steps(steps)
            w, c = clock.read()
            walls.append(w / steps)
            cpus.append(c / steps)
        return statistics.median(walls), statistics.median(cpus)
