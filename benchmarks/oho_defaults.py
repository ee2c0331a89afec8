"""Pick OnlineTuner defaults by experiment: meta_lr x reset_every x hyper_every from poor starts.

Run: .venv/bin/python benchmarks/oho_defaults.py [--tasks digits_mlp mnist1d_mlp] [--steps 600]
Writes benchmarks/results/oho_defaults.json and prints a table of final test loss per setting.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

import hyperdescent as hd

BENCH_ARGS = []  # what `make bench` (benchmarks/run_all.py) passes
BENCH_QUICK_ARGS = ["--tasks", "digits_mlp", "--steps", "100", "--meta-lrs", "0.03", "--resets", "50"]


def oho_run(task, lr0, steps, seed=0, **tuner_kw):
    """Final test loss/acc of one OHO run from initial learning rate lr0."""
    space = hd.Space({"lr": hd.Real(lr0, low=1e-5, high=2.0, log=True),
                      "weight_decay": hd.Real(1e-4, low=1e-7, high=1e-1, log=True)})
    p = hd.Problem(task.make_model(seed), optimizer=hd.optim.SGD(momentum=task.momentum),
                   space=space, train=task.train, val=task.val, test=task.test,
                   batch_size=task.batch_size, val_batch_size=128, seed=seed)
    t0 = time.perf_counter()
    tuner = hd.OnlineTuner(p, **tuner_kw)
    try:
        tuner.run(steps)
        ev = tuner.evaluate("test")
    except FloatingPointError:
        ev = {"loss": float("inf"), "acc": 0.0}
    return {"lr0": lr0, "seed": seed, "test_loss": ev["loss"], "test_acc": ev["acc"],
            "final_lr": float(tuner.hparams["lr"]), "rollbacks": tuner.rollbacks,
            "seconds": time.perf_counter() - t0}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", nargs="+", default=["digits_mlp", "mnist1d_mlp"])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--meta-lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    ap.add_argument("--resets", nargs="+", default=["none", "50"])
    ap.add_argument("--hyper-every", type=int, nargs="+", default=[1],
                    help="meta-step intervals; each meta_lr is scaled by the interval, so that "
                         "the hyperparameters may move as far per inner step")
    ap.add_argument("--seeds", type=int, default=1, help="seeds per starting learning rate")
    ap.add_argument("--out", default="benchmarks/results/oho_defaults.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    records = []
    for name in args.tasks:
        task = hd.tasks.get(name)
        base = task.space["lr"].init
        starts = [base / 100, base, base * 10]
        for base_mlr, reset, every in itertools.product(args.meta_lrs, args.resets,
                                                        args.hyper_every):
            reset_every = None if reset == "none" else int(reset)
            mlr = base_mlr * every
            runs = [oho_run(task, lr0, args.steps, meta_lr=mlr, reset_every=reset_every,
                            hyper_every=every, seed=seed)
                    for lr0 in starts for seed in range(args.seeds)]
            rec = {"task": name, "meta_lr": mlr, "seeds": args.seeds, "reset_every": reset_every,
                   "hyper_every": every, "runs": runs,
                   "worst_test_loss": max(r["test_loss"] for r in runs),
                   "median_test_loss": statistics.median(r["test_loss"] for r in runs)}
            records.append(rec)
            print(f"{name:12s} meta_lr={mlr:<5} reset={str(reset_every):5s} every={every} "
                  + " ".join(f"{r['lr0']:.0e}->{r['test_loss']:.3f}(lr {r['final_lr']:.3g})"
                             for r in runs), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    main()
