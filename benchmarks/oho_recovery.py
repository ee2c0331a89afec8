"""How fast the online tuner recovers from a poor start: from a learning rate 100x below each
bundled task's default, at which fraction of the run does the validation loss first come within
10% of the best it reaches; beside it the same fraction for the best fixed learning rate of a
grid (by its best validation loss), so that the horizon is one where the task itself converges
early and the figure measures recovery, not the task's convergence; and for OHO started at the
task's default learning rate on the same seeds, where there is nothing to recover from.

    python benchmarks/oho_recovery.py [--tasks digits_mlp digits_logreg cancer_logreg mnist1d_mlp]
        [--seeds 3] [--steps 1500] [--start 0.01] [--set meta_lr=0.1 --set reset_every=none ...]
        [--tag NAME]

Results: benchmarks/results/oho_recovery[_TAG].{json,md}.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import statistics
from pathlib import Path

import torch

import hyperdescent as hd

BENCH_QUICK_ARGS = ["--tasks", "digits_logreg", "--seeds", "1", "--steps", "90", "--tag",
                    "quick"]
TASKS = ["digits_mlp", "digits_logreg", "cancer_logreg", "mnist1d_mlp"]
GRID = (1 / 100, 1 / 10, 1 / 3, 1, 3, 10)
RESULTS = Path(__file__).resolve().parent / "results"
TRACE_EVERY = 50  # steps between the trajectory points a run records


def _problem(task, lr0: float, seed: int) -> hd.Problem:
    space = hd.Space({"lr": hd.Real(lr0, low=1e-5, high=2.0, log=True),
                      "weight_decay": hd.Real(1e-4, low=1e-7, high=1e-1, log=True)})
    return hd.Problem(task.make_model(seed), optimizer=hd.optim.SGD(momentum=task.momentum),
                      space=space, train=task.train, val=task.val, test=task.test,
                      batch_size=task.batch_size, val_batch_size=128, seed=seed)


def within(curve: list[tuple[int, float]], steps: int, tol: float = 0.1,
           target: float | None = None) -> float:
    """The fraction of the run at which a (step, val loss) curve first comes within `tol` of
    `target` (default: its own best); 1.0 if it never does."""
    finite = [(t, v) for t, v in curve if math.isfinite(v)]
    if not finite:
        return 1.0
    goal = (1 + tol) * (min(v for _, v in finite) if target is None else target)
    return next((t / steps for t, v in finite if v <= goal), 1.0)


def running_mean(curve: list[tuple[int, float]], points: int = 5) -> list[tuple[int, float]]:
    """The curve averaged over its last `points` evaluations at each step (fewer at the start):
    the 114-example validation loss of cancer_logreg wanders by more than the tolerance, so the
    best of the raw curve is a late dip of the noise."""
    out = []
    for i, (t, _) in enumerate(curve):
        window = [v for _, v in curve[max(0, i - points + 1):i + 1]]
        out.append((t, sum(window) / len(window)))
    return out


def recovery(task, seed: int, steps: int, every: int, start: float = 0.01, **tuner_kw) -> dict:
    """One OHO run from `start` x the task's default lr: the full-validation loss every `every`
    steps, and when it first came within 10% of its best."""
    lr0 = task.space["lr"].init * start
    if "beta2" in tuner_kw:  # shorthand for meta_betas=(0.9, beta2) in comma-separated configs
        tuner_kw = dict(tuner_kw)
        tuner_kw["meta_betas"] = (0.9, tuner_kw.pop("beta2"))
    tuner = hd.OnlineTuner(_problem(task, lr0, seed), **tuner_kw)
    curve, trace = [], []
    try:
        while tuner.t < steps:
            tuner.run(min(steps, tuner.t + every))
            curve.append((tuner.t, tuner.evaluate("val")["loss"]))
            if tuner.t % TRACE_EVERY == 0 or tuner.t == steps:
                trace.append(_trace_point(tuner, TRACE_EVERY))
        test = tuner.evaluate("test")["loss"]
    except FloatingPointError:
        curve.append((steps, math.inf))
        test = math.inf
    finite = [v for _, v in curve if math.isfinite(v)]
    return {"task": task.name, "seed": seed, "start": start, "curve": curve,
            "best_val": min(finite, default=math.inf), "final_val": curve[-1][1],
            "test_loss": test, "within_10pct_at": within(curve, steps),
            "smoothed_within_10pct_at": within(running_mean(curve), steps),
            "final_lr": float(tuner.hparams["lr"]), "rollbacks": tuner.rollbacks,
            "trace": trace, "events": tuner.events}


def _trace_point(tuner, every: int) -> dict:
    """What the tuner did over its last `every` records: the values it ends with, the share of
    meta-steps whose hypergradient asked for a larger lr / weight decay, tangent resets by
    growth, the meta learning rate and the rollbacks so far."""
    recent = [r for r in tuner.history[-every:] if "hypergrad" in r]
    def up(name):
        return sum(1 for r in recent if r["hypergrad"][name] < 0) / max(1, len(recent))
    return {"t": tuner.t, "lr": float(tuner.hparams["lr"]),
            "weight_decay": float(tuner.hparams["weight_decay"]),
            "lr_up": up("lr"), "wd_up": up("weight_decay"),
            "growth_resets": sum(1 for r in tuner.history[-every:] if "tangent_reset" in r),
            "meta_lr": tuner.meta_lr, "rollbacks": tuner.rollbacks}


def fixed_curve(task, lr: float, seed: int, steps: int, every: int) -> list[tuple[int, float]]:
    """Plain training at a fixed learning rate on the tuner's batches: (step, val loss)."""
    p = _problem(task, lr, seed)
    state, hp = p.init_state(), p.hparams
    curve = []
    for t in range(steps):
        state, loss = p.step(state, p.train_batch(t), hp)
        if not torch.isfinite(loss):
            return curve + [(steps, math.inf)]
        if (t + 1) % every == 0 or t + 1 == steps:
            curve.append((t + 1, p.evaluate(state.params, state.buffers, "val")["loss"]))
    return curve


def best_fixed(task, steps: int, every: int, seed: int = 0) -> dict:
    """The grid's fixed learning rate with the lowest validation loss at any point of the run,
    and when that run first came within 10% of it."""
    curves = {task.space["lr"].init * f: fixed_curve(task, task.space["lr"].init * f, seed,
                                                     steps, every) for f in GRID}
    best = {lr: min((v for _, v in c if math.isfinite(v)), default=math.inf)
            for lr, c in curves.items()}
    lr = min(best, key=best.get)
    # a slow learning rate may win the grid by a hair late in the run while a faster one was
    # within 10% of it long before: the earliest any grid member gets there is the task's pace
    fastest = min(within(c, steps, target=best[lr]) for c in curves.values())
    return {"lr": lr, "best_val": best[lr], "within_10pct_at": within(curves[lr], steps),
            "grid_within_10pct_at": fastest, "grid": best, "curve": curves[lr]}


def trajectories(rows: list[dict], steps: int) -> list[str]:
    """Markdown lines: per task and seed, lr, weight decay, the share of the last meta-steps
    asking for a larger lr, growth resets, meta_lr and rollbacks at a few points of the run."""
    marks = sorted({m - m % TRACE_EVERY or TRACE_EVERY for m in
                    (steps // 30, steps // 10, steps // 5, steps // 3, steps // 2)} | {steps})
    out = ["", "Trajectories at steps " + ", ".join(map(str, marks)) + ": lr / weight decay "
           f"(the share of the {TRACE_EVERY} meta-steps before it whose hypergradient asked for a "
           "larger lr); "
           "then growth resets of the tangent, the final meta_lr and the rollbacks.", "",
           "| task | seed | " + " | ".join(f"step {m}" for m in marks)
           + " | growth resets | meta_lr | rollbacks |", "|---" * (len(marks) + 5) + "|"]
    for row in rows:
        for r in row["runs"]:
            pts = {p["t"]: p for p in r.get("trace", [])}
            cells = [f"{pts[m]['lr']:.3g} / {pts[m]['weight_decay']:.2g} ({pts[m]['lr_up']:.2f})"
                     if m in pts else "" for m in marks]
            last = r["trace"][-1] if r.get("trace") else {}
            out.append(f"| {row['task']} | {r['seed']} | " + " | ".join(cells) + " | "
                       f"{sum(p['growth_resets'] for p in r.get('trace', []))} | "
                       f"{last.get('meta_lr', math.nan):.3g} | {r['rollbacks']} |")
    return out


def parse_settings(pairs: list[str]) -> dict:
    """KEY=VALUE tuner options (Python literals; 'none' for None)."""
    out = {}
    for kv in pairs:
        key, _, text = kv.partition("=")
        out[key] = None if text.lower() == "none" else ast.literal_eval(text)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--start", type=float, default=0.01,
                    help="the initial lr as a multiple of the task's default")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an OnlineTuner option (default: the tuner's defaults), repeatable")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    kw = parse_settings(args.set)
    title = ("a learning rate 100x too small" if args.start == 0.01 else
             f"a learning rate {args.start:g} x the task's default")
    rows, lines = [], [f"# OHO from {title}", "",
                       f"{args.steps} steps, {args.seeds} seeds, tuner options {kw or 'defaults'}; "
                       "validation loss on the whole split every "
                       f"{args.every} steps. Fractions of the run (median / worst over seeds) "
                       "at which the validation loss first comes within 10% of: OHO's own best; "
                       "the best validation loss of the grid's best fixed lr (seed 0); for that "
                       "fixed lr, its own best; for the fastest fixed lr of the grid, the grid's "
                       "best; OHO's 5-point running mean, its own best; OHO started at the "
                       "task's default lr (no recovery needed, same seeds), its own best; the "
                       "poor start, the best of the default-start run of its seed.", "",
                       "| task | OHO, own best | OHO, grid's best | grid-best lr, own best "
                       "| fastest grid lr | OHO best val (median) | grid-best lr: best val "
                       "| OHO running mean | OHO from the default lr, own best "
                       "| poor start, default start's best |",
                       "|---|---|---|---|---|---|---|---|---|---|"]
    for name in args.tasks:
        task = hd.tasks.get(name)
        fixed = best_fixed(task, args.steps, args.every)
        runs = [recovery(task, s, args.steps, args.every, start=args.start, **kw)
                for s in range(args.seeds)]
        # the same seeds from the default lr: how fast the task itself lets OHO settle, so
        # that the poor start's figure can be read as recovery or as the task's own pace
        baseline = [recovery(task, s, args.steps, args.every, start=1.0, **kw)
                    for s in range(args.seeds)]
        for r, b in zip(runs, baseline):
            r["within_10pct_of_grid_at"] = within(r["curve"], args.steps,
                                                  target=fixed["best_val"])
            r["within_10pct_of_default_start_at"] = within(r["curve"], args.steps,
                                                           target=b["best_val"])
        rows.append({"task": name, "runs": runs, "best_fixed": fixed,
                     "default_start": [{k: b[k] for k in ("seed", "curve", "best_val",
                                                          "final_val", "test_loss",
                                                          "within_10pct_at", "final_lr",
                                                          "rollbacks")} for b in baseline]})
        own = [r["within_10pct_at"] for r in runs]
        grid = [r["within_10pct_of_grid_at"] for r in runs]
        smooth = [r["smoothed_within_10pct_at"] for r in runs]
        base = [b["within_10pct_at"] for b in baseline]
        caught = [r["within_10pct_of_default_start_at"] for r in runs]
        line = (f"| {name} | {statistics.median(own):.2f} / {max(own):.2f} | "
                f"{statistics.median(grid):.2f} / {max(grid):.2f} | "
                f"{fixed['within_10pct_at']:.2f} | {fixed['grid_within_10pct_at']:.2f} | "
                f"{statistics.median(r['best_val'] for r in runs):.4f} | "
                f"{fixed['best_val']:.4f} (lr {fixed['lr']:.3g}) | "
                f"{statistics.median(smooth):.2f} / {max(smooth):.2f} | "
                f"{statistics.median(base):.2f} / {max(base):.2f} | "
                f"{statistics.median(caught):.2f} / {max(caught):.2f} |")
        lines.append(line)
        print(line, flush=True)
    lines += trajectories(rows, args.steps)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "oho_recovery" + (f"_{args.tag}" if args.tag else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"args": vars(args), "rows": rows},
                                                     indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
