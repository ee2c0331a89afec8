"""Pick OnlineTuner defaults by experiment: candidate settings, each from a learning rate 100x
too small (and optionally other starts) on every bundled task, judged by when the validation
loss first comes within 10% of its best (benchmarks/oho_recovery.py) and by the best and final
validation loss it reaches.

Run: .venv/bin/python benchmarks/oho_defaults.py [--tasks ...] [--steps 1500] [--seeds 2]
        [--starts 0.01] [--configs "" "meta_lr=0.1" "meta_lr=0.1,reset_every=none" ...]
Each config is comma-separated KEY=VALUE OnlineTuner options ("" is the defaults). Writes
benchmarks/results/oho_defaults.json (after every run, so a stopped sweep keeps what it ran)
and prints a table per config: median / worst fraction and median best and final val per task.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from oho_recovery import TASKS, parse_settings, recovery

import hyperdescent as hd

BENCH_ARGS: list[str] = []  # what `make bench` (benchmarks/run_all.py) passes
BENCH_QUICK_ARGS = ["--tasks", "digits_logreg", "--steps", "90", "--seeds", "1", "--configs",
                    "", "meta_lr=0.1", "--out", "benchmarks/results/oho_defaults_quick.json"]
# "" is the defaults (meta_lr 0.05); 0.03 was the default before, 0.04 the step between
CONFIGS = ["", "meta_lr=0.03", "meta_lr=0.04", "meta_lr=0.1", "meta_lr=0.1,reset_every=none",
           "meta_lr=0.3", "meta_lr=0.03,reset_every=none"]


def summary(records: list[dict], config: str, tasks: list[str]) -> str:
    """One table line per task for one config."""
    out = []
    for name in tasks:
        runs = [r for r in records if r["config"] == config and r["task"] == name]
        if not runs:
            continue
        frac = [r["within_10pct_at"] for r in runs]
        out.append(f"{config or 'defaults':38s} {name:14s} within10% median "
                   f"{statistics.median(frac):.2f} worst {max(frac):.2f}  best val "
                   f"{statistics.median(r['best_val'] for r in runs):.4f}  final val "
                   f"{statistics.median(r['final_val'] for r in runs):.4f}  rollbacks "
                   f"{sum(r['rollbacks'] for r in runs)}")
    return "\n".join(out)


def markdown(records: list[dict], tasks: list[str], steps: int, note: str = "") -> str:
    """A table: per config, per task the median / worst fraction and the median best val."""
    configs = list(dict.fromkeys(r["config"] for r in records))
    lines = [f"# OnlineTuner settings from a learning rate 100x too small ({steps} steps)", "",
             "Per task: fraction of the run at which the validation loss first comes within 10% "
             "of its best (median / worst over seeds), and the median best validation loss.",
             *([note] if note else []), "", "| config | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for config in configs:
        cells = []
        for name in tasks:
            runs = [r for r in records if r["config"] == config and r["task"] == name]
            frac = [r["within_10pct_at"] for r in runs]
            cells.append(f"{statistics.median(frac):.2f} / {max(frac):.2f} "
                         f"({statistics.median(r['best_val'] for r in runs):.4f}, "
                         f"{len(runs)} seeds)" if runs else "")
        lines.append(f"| {config or 'defaults'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--starts", type=float, nargs="+", default=[0.01],
                    help="initial learning rates as multiples of each task's default")
    ap.add_argument("--configs", nargs="+", default=CONFIGS)
    ap.add_argument("--out", default="benchmarks/results/oho_defaults.json")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="merge the records of earlier sweeps into --out and its .md table")
    ap.add_argument("--note", default="", help="a line for the .md table (what the sweep ran on)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.merge:
        records = [r for f in args.merge for r in json.loads(Path(f).read_text())["records"]]
        Path(args.out).write_text(json.dumps({"args": vars(args), "records": records}))
        Path(args.out).with_suffix(".md").write_text(markdown(records, args.tasks, args.steps,
                                                                   args.note))
        return 0
    settings = {c: parse_settings([kv for kv in c.split(",") if kv]) for c in args.configs}
    records = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.tasks:
        task = hd.tasks.get(name)
        # configs interleaved per seed and start, so a sweep stopped early has them all alike
        for seed in range(args.seeds):
            for start in args.starts:
                for config in args.configs:
                    r = recovery(task, seed, args.steps, args.every, start=start,
                                 **settings[config])
                    records.append({"config": config, **{k: v for k, v in r.items()
                                                         if k != "curve"}, "curve": r["curve"]})
                    out.write_text(json.dumps({"args": vars(args), "records": records}))
        for config in args.configs:
            print(summary(records, config, [name]), flush=True)
    print("\n".join(summary(records, c, args.tasks) for c in args.configs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
