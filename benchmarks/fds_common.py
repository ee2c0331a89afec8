"""Shared set-up of the FDS experiments (Micaelli & Storkey 2021): bundled tasks as problems."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

import hyperdescent as hd

RESULTS = Path(__file__).resolve().parent / "results"


def make_problem(task, space, seed=0, momentum=None):
    """A Problem on a bundled task's splits with SGD (momentum fixed unless the space tunes it)."""
    mom = task.momentum if momentum is None else momentum
    opt = hd.optim.SGD() if "momentum" in list(space) else hd.optim.SGD(momentum=mom)
    return hd.Problem(task.make_model(seed), loss=task.loss, optimizer=opt, space=space,
                      train=task.train, val=task.val, test=task.test,
                      batch_size=task.batch_size, val_batch_size=len(task.val[0]), seed=seed)


def epochs_to_steps(task, epochs):
    """Inner steps of `epochs` passes over the task's training split."""
    return int(epochs * (len(task.train[0]) // task.batch_size))


def write(name, payload):
    """Write benchmarks/results/<name>.json with the machine described."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "cpu": platform.processor()},
               **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path
