"""The `hyperdescent` command: demo, run, compare, report .

Every command writes (or rewrites) a run directory and prints its path as the last line of
stdout. Config and data errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_BUDGET_S = 40.0
DEMO_STEPS = 800


def demo_config(budget: float = DEMO_BUDGET_S, seeds: int = 1, steps: int = DEMO_STEPS):
    """The demo: OHO vs random search vs TPE on digits_mlp at one wall-clock budget per method.

    OHO starts from a learning rate 100x below the task's default (5e-4) to show it recovering;
    the black-box methods search lr in [1e-5, 2] and weight decay in [1e-7, 1e-1] (log scale).
    """
    from .experiment.config import validate_config
    return validate_config({
        "name": "demo", "task": "digits_mlp", "seeds": list(range(seeds)), "steps": steps,
        "budget": {"wall_clock_s": float(budget)},
        "space": {"lr": {"init": 5e-4, "low": 1e-5, "high": 2.0, "log": True},
                  "weight_decay": {"init": 1e-4, "low": 1e-7, "high": 1e-1, "log": True}},
        "methods": [{"label": "OHO", "kind": "oho"},
                    {"label": "random search", "kind": "random"},
                    {"label": "TPE", "kind": "tpe"}],
    }, source="demo")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="hyperdescent",
        description="Gradient-based hyperparameter optimization with black-box baselines side "
                    "by side. Each command writes a run directory (config.toml, metrics.jsonl, "
                    "summary.json, PNG plots, report.md) and prints its path last.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser("demo", help="OHO vs random search vs TPE on digits_mlp, equal "
                                    "wall-clock budget (about 2 minutes)")
    d.add_argument("--out", help="run directory to write (default runs/<date>-<time>-demo)")
    d.add_argument("--budget", type=float, default=DEMO_BUDGET_S,
                   help=f"wall-clock seconds per method and seed (default {DEMO_BUDGET_S:g})")
    d.add_argument("--seeds", type=int, default=1, help="number of seeds (default 1)")
    d.add_argument("--steps", type=int, default=DEMO_STEPS,
                   help=f"inner steps of one training run (default {DEMO_STEPS})")
    r = sub.add_parser("run", help="one tuning run: the config's first (or --method) method")
    r.add_argument("config", help="experiment config (TOML)")
    r.add_argument("--out", help="run directory to write")
    r.add_argument("--method", help="label of the method to run (default: the first)")
    c = sub.add_parser("compare", help="every method of the config, same task, same budget")
    c.add_argument("config", help="experiment config (TOML)")
    c.add_argument("--out", help="run directory to write")
    for q in (r, c):
        q.add_argument("--resume", metavar="RUN_DIR",
                       help="continue an interrupted run directory (finished runs are kept, "
                            "unfinished black-box studies continue)")
    p = sub.add_parser("report", help="rebuild summary.json, plots and report.md of a run")
    p.add_argument("run_dir", help="a run directory (finished or interrupted)")
    for q in (d, r, c):
        q.add_argument("--no-progress", action="store_true", help="no progress display")
    return ap


def _fail(msg: str) -> int:
    print(f"hyperdescent: error: {msg}", file=sys.stderr)
    return 2


def _stdout_console():
    from rich.console import Console
    con = Console()
    return con if con.is_terminal else Console(width=120)


def _finish(path: Path, title: str | None = None) -> int:
    """Print the results table of the run directory, then its path (the last line)."""
    import json
    con = _stdout_console()
    summary_path = Path(path) / "summary.json"
    if summary_path.is_file():
        from .experiment.compare import results_table
        summary = json.loads(summary_path.read_text())
        con.print(results_table(summary, title))
        con.print(f"report: {Path(path) / 'report.md'}", highlight=False, soft_wrap=True)
    sys.stdout.flush()
    print(Path(path), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hyperdescent` command; returns the exit status (2 on bad input)."""
    args = _parser().parse_args(argv)
    from .errors import HyperdescentError
    try:
        if args.command == "report":
            from .report.markdown import build_report
            run_dir = Path(args.run_dir)
            if not (run_dir / "config.toml").is_file():
                return _fail(f"{str(run_dir)!r} is not a run directory (no config.toml)")
            build_report(run_dir)
            return _finish(run_dir)
        from .experiment.compare import compare, run
        from .experiment.config import load_config
        progress = not args.no_progress
        if args.command == "demo":
            if not 0 < args.budget < float("inf") or args.seeds < 1 or args.steps < 1:
                return _fail("--budget must be > 0, --seeds and --steps >= 1")
            cfg = demo_config(args.budget, args.seeds, args.steps)
            path = compare(cfg, out=args.out, progress=progress)
            return _finish(path, f"demo: {cfg.task}, {args.budget:g} s wall clock per method")
        cfg = load_config(args.config)
        if args.resume and args.out:
            return _fail("give --resume RUN_DIR or --out DIR, not both")
        if args.command == "run":
            path = run(cfg, out=args.out, method=args.method, progress=progress,
                       resume=args.resume)
        else:
            path = compare(cfg, out=args.out, progress=progress, resume=args.resume)
        return _finish(path)
    except HyperdescentError as e:
        return _fail(str(e).replace("\n", " "))
    except KeyboardInterrupt as e:
        path = getattr(e, "run_dir", None)
        print("hyperdescent: interrupted; the report covers the records written so far",
              file=sys.stderr)
        if path is not None:
            print(Path(path), flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
