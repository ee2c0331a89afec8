"""How fast the online tuner recovers from a poor start: from a learning rate 100x below each
bundled task's default, at which fraction of the run does the validation loss first come within
10% of the best it reaches, and how does it end against the best fixed learning rate of a grid.

    python benchmarks/oho_recovery.py [--tasks digits_mlp digits_logreg cancer_logreg mnist1d_mlp]
        [--seeds 2] [--steps 600] [--meta-lr 0.03] [--reset-every 50]

Results: benchmarks/results/oho_recovery.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

import hyperdescent as hd

BENCH_QUICK_ARGS = ["--tasks", "digits_logreg", "--seeds", "1", "--steps", "90"]
TASKS = ["digits_mlp", "digits_logreg", "cancer_logreg", "mnist1d_mlp"]
GRID = (1 / 100, 1 / 10, 1 / 3, 1, 3, 10)


def _problem(task, lr0: float, seed: int) -> hd.Problem:
    space = hd.Space({"lr": hd.Real(lr0, low=1e-5, high=2.0, log=True),
                      "weight_decay": hd.Real(1e-4, low=1e-7, high=1e-1, log=True)})
    return hd.Problem(task.make_model(seed), optimizer=hd.optim.SGD(momentum=task.momentum),
                      space=space, train=task.train, val=task.val, test=task.test,
                      batch_size=task.batch_size, val_batch_size=128, seed=seed)


def recovery(task, seed: int, steps: int, every: int, **tuner_kw) -> dict:
    """One OHO run from lr/100: the full-validation loss every `every` steps."""
    lr0 = task.space["lr"].init / 100
    tuner = hd.OnlineTuner(_problem(task, lr0, seed), **tuner_kw)
    curve = []
    while tuner.t < steps:
        tuner.run(min(steps, tuner.t + every))
        curve.append((tuner.t, tuner.evaluate("val")["loss"]))
    best = min(v for _, v in curve)
    first = next(t for t, v in curve if v <= 1.1 * best)
    return {"task": task.name, "seed": seed, "curve": curve, "best_val": best,
            "final_val": curve[-1][1], "test_loss": tuner.evaluate("test")["loss"],
            "within_10pct_at": first / steps, "rollbacks": tuner.rollbacks}


def best_fixed(task, steps: int, seed: int) -> dict:
    """The grid's best fixed learning rate (meta_lr 0: the tuner's inner loop, no tuning)."""
    out = {}
    for f in GRID:
        lr = task.space["lr"].init * f
        tuner = hd.OnlineTuner(_problem(task, lr, seed), meta_lr=0.0, max_rollbacks=0)
        try:
            tuner.run(steps)
            out[lr] = tuner.evaluate("val")["loss"]
        except FloatingPointError:
            out[lr] = math.inf
    lr = min(out, key=out.get)
    return {"lr": lr, "val_loss": out[lr], "grid": out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--meta-lr", type=float, default=None, help="default: OnlineTuner's")
    ap.add_argument("--reset-every", default=None, help="an integer or 'none'; default: the tuner's")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    kw = {}
    if args.meta_lr is not None:
        kw["meta_lr"] = args.meta_lr
    if args.reset_every is not None:
        kw["reset_every"] = None if args.reset_every == "none" else int(args.reset_every)
    rows, lines = [], ["# OHO from a learning rate 100x too small", "",
                       f"{args.steps} steps, {args.seeds} seeds, tuner options {kw or 'defaults'}",
                       "", "| task | within 10% of best at (fraction of run, median) | worst "
                       "| OHO final val (median) | best fixed lr of the grid: val |",
                       "|---|---|---|---|---|"]
    for name in args.tasks:
        task = hd.tasks.get(name)
        runs = [recovery(task, s, args.steps, args.every, **kw) for s in range(args.seeds)]
        fixed = best_fixed(task, args.steps, 0)
        rows.append({"task": name, "runs": runs, "best_fixed": fixed})
        frac = [r["within_10pct_at"] for r in runs]
        line = (f"| {name} | {statistics.median(frac):.2f} | {max(frac):.2f} | "
                f"{statistics.median(r['final_val'] for r in runs):.4f} | "
                f"{fixed['val_loss']:.4f} (lr {fixed['lr']:.3g}) |")
        lines.append(line)
        print(line, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "oho_recovery.json").write_text(json.dumps({"args": vars(args), "rows": rows},
                                                      indent=1) + "\n")
    (out / "oho_recovery.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
