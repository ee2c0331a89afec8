"""The OHO experiments of seed 000: stability, perturbation, resets, granularity, overhead.

Run: .venv/bin/python benchmarks/oho_experiments.py EXPERIMENT [--tasks ...] [--seeds 5]
        [--set KEY=VALUE ...] [--tag NAME]
     EXPERIMENT in stability | perturbation | resets | granularity | overhead | all
Writes benchmarks/results/oho_<experiment>[_TAG].json and prints a summary per task; --set
passes OnlineTuner options to the OHO runs of stability and perturbation (default: its
defaults).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from oho_recovery import parse_settings

import hyperdescent as hd

RESULTS = Path(__file__).parent / "results"


BENCH_ARGS = ["all"]  # what `make bench` (benchmarks/run_all.py) passes
BENCH_QUICK_ARGS = ["overhead", "--seeds", "1", "--steps", "100", "--tasks", "digits_mlp"]


def make_problem(task, seed, lr0, wd0=1e-4, per="global"):
    """A Problem on a bundled task with lr and weight decay declared as log-scale Reals."""
    space = hd.Space({"lr": hd.Real(lr0, low=1e-5, high=2.0, log=True, per=per),
                      "weight_decay": hd.Real(wd0, low=1e-7, high=1e-1, log=True, per=per)})
    return hd.Problem(task.make_model(seed), optimizer=hd.optim.SGD(momentum=task.momentum),
                      space=space, train=task.train, val=task.val, test=task.test,
                      batch_size=task.batch_size, val_batch_size=128, seed=seed)


def fixed_run(task, seed, lr, steps, wd=1e-4):
    """Plain training at a fixed learning rate on the same batches; final test loss."""
    p = make_problem(task, seed, lr, wd)
    state, hp = p.init_state(), p.hparams
    for t in range(steps):
        state, loss = p.step(state, p.train_batch(t), hp)
        if not torch.isfinite(loss):
            return float("inf")
    loss = p.evaluate(state.params, state.buffers, "test")["loss"]
    return loss if np.isfinite(loss) else float("inf")


def oho_run(task, seed, lr0, steps, perturb_at=None, per="global", **kw):
    """One OHO run; optionally at `perturb_at` set lr to 10x and weight decay to its floor."""
    p = make_problem(task, seed, lr0, per=per)
    tuner = hd.OnlineTuner(p, **kw)
    t0 = time.perf_counter()
    try:
        if perturb_at is None:
            tuner.run(steps)
        else:
            tuner.run(perturb_at)
            hp = tuner.hparams
            lr = {k: v * 10 for k, v in hp["lr"].items()} if isinstance(hp["lr"], dict) \
                else hp["lr"] * 10
            raw = p.bound.to_raw({"lr": lr, "weight_decay": 1e-7 if per == "global" else
                                  {k: 1e-7 for k in hp["weight_decay"]}})
            with torch.no_grad():
                for k, v in hd.space.flatten(p.bound.project_raw(raw)).items():
                    tuner.raw[k].copy_(v)
            tuner.run(steps)
        test = tuner.evaluate("test")["loss"]
        val = tuner.evaluate("val")["loss"]
    except FloatingPointError:
        test = val = float("inf")
    return {"test_loss": test, "val_loss": val, "seconds": time.perf_counter() - t0,
            "rollbacks": tuner.rollbacks}


def iqr(xs):
    """Interquartile range (inf-safe)."""
    q1, q3 = np.percentile(np.array(xs, dtype=float), [25, 75])
    return float(q3 - q1)


def stability(task, seeds, steps, **kw):
    """8 initial learning rates over 3 orders of magnitude: OHO vs fixed-lr spread."""
    lrs = list(np.geomspace(task.space["lr"].init / 100, task.space["lr"].init * 10, 8))
    oho, fixed = [], []
    for seed in seeds:
        for lr in lrs:
            oho.append(oho_run(task, seed, lr, steps, **kw)["test_loss"])
            fixed.append(fixed_run(task, seed, lr, steps))
    finite_fixed = [x for x in fixed if np.isfinite(x)]
    out = {"lrs": lrs, "oho": oho, "fixed": fixed, "oho_iqr": iqr(oho),
           "fixed_iqr": iqr(fixed), "oho_worst": max(oho),
           "fixed_median": float(np.median(fixed)),
           "fixed_diverged": len(fixed) - len(finite_fixed)}
    out["pass_iqr"] = out["oho_iqr"] <= 0.5 * out["fixed_iqr"]
    out["pass_worst"] = out["oho_worst"] <= out["fixed_median"]
    return out


def perturbation(task, seeds, steps, **kw):
    """At half-way set lr to 10x and weight decay to its floor; final val loss vs unperturbed."""
    lr0 = task.space["lr"].init
    rows = []
    for seed in seeds:
        base = oho_run(task, seed, lr0, steps, **kw)
        pert = oho_run(task, seed, lr0, steps, perturb_at=steps // 2, **kw)
        rows.append({"seed": seed, "val": base["val_loss"], "perturbed_val": pert["val_loss"],
                     "ratio": pert["val_loss"] / base["val_loss"]})
    ratios = [r["ratio"] for r in rows]
    return {"rows": rows, "median_ratio": statistics.median(ratios),
            "pass": statistics.median(ratios) <= 1.10}


def resets(task, seeds, steps):
    """reset_every in {1, 10, 100, None}: final test loss per setting."""
    lr0 = task.space["lr"].init
    out = {}
    for reset in (1, 10, 100, None):
        losses = [oho_run(task, s, lr0, steps, reset_every=reset)["test_loss"] for s in seeds]
        out[str(reset)] = {"test_losses": losses, "median": statistics.median(losses)}
    return out


def granularity(task, seeds, steps):
    """Global vs per-layer lr + weight decay: final test loss and wall time."""
    lr0 = task.space["lr"].init
    out = {}
    for per in ("global", "layer"):
        runs = [oho_run(task, s, lr0, steps, per=per) for s in seeds]
        out[per] = {"test_losses": [r["test_loss"] for r in runs],
                    "median_test_loss": statistics.median(r["test_loss"] for r in runs),
                    "median_seconds": statistics.median(r["seconds"] for r in runs)}
    return out


def overhead(task, seeds, steps):
    """OHO wall time per step / plain torch.optim step, global and per-layer; forward also with
    compile=True (its compilation, in the 20 warm-up steps, reported apart)."""
    torch_model = task.make_model(0)
    opt = torch.optim.SGD(torch_model.parameters(), lr=0.05, momentum=task.momentum)
    p = make_problem(task, 0, 0.05)
    for t in range(20):  # warm-up
        x, y = p.train_batch(t)
        opt.zero_grad()
        task.loss(torch_model(x), y).backward()
        opt.step()
    t0 = time.perf_counter()
    for t in range(steps):
        x, y = p.train_batch(t)
        opt.zero_grad()
        task.loss(torch_model(x), y).backward()
        opt.step()
    plain = (time.perf_counter() - t0) / steps
    out = {"plain_step_ms": plain * 1e3}
    for per in ("global", "layer"):
        for method, kw in (("forward", {}), ("greedy", {}), ("forward_compiled", {"compile": True})):
            tuner = hd.OnlineTuner(make_problem(task, 0, 0.05, per=per),
                                   method=method.removesuffix("_compiled"), **kw)
            t0 = time.perf_counter()
            tuner.run(20)  # warm-up; compile=True compiles here
            if kw:
                out[f"{method}_{per}_compile_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            tuner.run(20 + steps)
            per_step = (time.perf_counter() - t0) / steps
            out[f"{method}_{per}_ratio"] = per_step / plain
    return out


EXPERIMENTS = {"stability": stability, "perturbation": perturbation, "resets": resets,
               "granularity": granularity, "overhead": overhead}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("experiment", choices=[*EXPERIMENTS, "all"])
    ap.add_argument("--tasks", nargs="+", default=["digits_mlp", "mnist1d_mlp"])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an OnlineTuner option for stability and perturbation, repeatable")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    args = ap.parse_args(argv)
    kw = parse_settings(args.set)
    torch.set_num_threads(1)
    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    RESULTS.mkdir(exist_ok=True)
    for name in names:
        result = {}
        for task_name in args.tasks:
            task = hd.tasks.get(task_name)
            result[task_name] = EXPERIMENTS[name](
                task, list(range(args.seeds)), args.steps,
                **(kw if name in ("stability", "perturbation") else {}))
            summary = {k: v for k, v in result[task_name].items()
                       if not isinstance(v, list)}
            print(name, task_name, json.dumps(summary, default=str)[:1500], flush=True)
        if kw:
            result["settings"] = kw
        stem = f"oho_{name}" + (f"_{args.tag}" if args.tag else "")
        (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
