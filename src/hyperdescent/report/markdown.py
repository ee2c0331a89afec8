"""Summaries and report.md, rebuilt from a run directory's metrics.jsonl and config.toml alone.

`summarize(cfg, records)` reduces the records of every (method, seed) run to per-method medians
over seeds; `build_report(run_dir)` writes summary.json, the PNG plots and report.md, for a
finished run or an interrupted one (runs without a ``run_end`` record are summarised from the
records they left and flagged as incomplete).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..experiment.config import Config
from ..experiment.rundir import RunDir

CURVE_KINDS = ("oho_step", "trial", "meta_step", "pbt_step")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _median(xs: list) -> float | None:
    xs = [x for x in xs if _finite(x)]
    return statistics.median(xs) if xs else None


def runs_of(records: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """Records grouped by (method label, seed): start, curve records, end (None if interrupted)."""
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    for r in records:
        if "method" not in r or "seed" not in r:
            continue
        run = runs.setdefault((r["method"], r["seed"]),
                              {"start": None, "curve": [], "trials": [], "end": None})
        if r["kind"] == "run_start":
            run["start"] = r
        elif r["kind"] in CURVE_KINDS:
            run["curve"].append(r)
            if r["kind"] == "trial":
                run["trials"].append(r)
        elif r["kind"] == "run_end":
            run["end"] = r
    return runs


def _run_summary(run: dict[str, Any], target: float | None) -> dict[str, Any]:
    """Totals of one (method, seed) run and its time / inner steps to reach `target`."""
    curve, end = run["curve"], run["end"]
    last = curve[-1] if curve else {}
    src = end or last
    best = src.get("best_val_loss")
    if end is None:
        test_loss, test_acc = last.get("test_loss"), last.get("test_acc")
    else:
        test_loss, test_acc = end.get("test_loss"), end.get("test_acc")
    t_hit = s_hit = None
    if _finite(target):
        for r in curve:
            if _finite(r.get("best_val_loss")) and r["best_val_loss"] <= target:
                t_hit, s_hit = r["elapsed_s"], r["inner_steps"]
                break
    return {"best_val_loss": best if _finite(best) else None, "test_loss": test_loss,
            "test_acc": test_acc, "time_to_target_s": t_hit, "steps_to_target": s_hit,
            "inner_steps": src.get("inner_steps", 0), "wall_time_s": src.get("elapsed_s", 0.0),
            "n_trials": len(run["trials"]) if run["trials"] else None,
            "stopped_by": end.get("stopped_by") if end else "interrupted",
            "complete": end is not None}


def _median_or_never(xs: list) -> float | None:
    """Median with 'never reached' as +inf; None when the median itself is never reached."""
    vals = [x if _finite(x) else math.inf for x in xs]
    if not vals:
        return None
    m = statistics.median(sorted(vals))
    return m if math.isfinite(m) else None


def summarize(cfg: Config, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-method medians over seeds: best val loss, test loss/acc, time to target, inner steps, wall time."""
    runs = runs_of(records)
    by_method: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for (label, seed), run in runs.items():
        by_method[label].append((seed, run))
    target_label = cfg.target_label()
    if target_label is None:
        target, target_from = float(cfg.target_val_loss), "config"
    else:
        finals = [_run_summary(run, None)["best_val_loss"] for _, run in by_method[target_label]]
        target, target_from = _median(finals), target_label
    methods: dict[str, Any] = {}
    for m in cfg.methods:
        per_seed = {seed: _run_summary(run, target)
                    for seed, run in sorted(by_method.get(m.label, []))}
        ps = list(per_seed.values())
        reached = sum(1 for s in ps if s["time_to_target_s"] is not None)
        methods[m.label] = {
            "kind": m.kind, "pruner": m.pruner, "seeds_run": len(ps),
            "best_val_loss": _median([s["best_val_loss"] for s in ps]),
            "test_loss": _median([s["test_loss"] for s in ps]),
            "test_acc": _median([s["test_acc"] for s in ps]),
            "time_to_target_s": _median_or_never([s["time_to_target_s"] for s in ps]),
            "steps_to_target": _median_or_never([s["steps_to_target"] for s in ps]),
            "reached_target": f"{reached}/{len(ps)}",
            "inner_steps": _median([s["inner_steps"] for s in ps]),
            "wall_time_s": _median([s["wall_time_s"] for s in ps]),
            "per_seed": {str(k): v for k, v in per_seed.items()},
        }
    expected = len(cfg.methods) * len(cfg.seeds)
    done = sum(1 for run in runs.values() if run["end"] is not None)
    return {"name": cfg.name, "task": cfg.task, "seeds": cfg.seeds,
            "budget": cfg.budget.model_dump(exclude_none=True), "steps": cfg.steps,
            "target_val_loss": target, "target_from": target_from,
            "complete": done >= expected, "runs_finished": done, "runs_expected": expected,
            "methods": methods}


# -- report.md ----------------------------------------------------------------------------------
def _fmt(x: Any, spec: str = ".4f") -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


TABLE_COLUMNS = ("method", "best val loss", "test loss", "test acc", "time to target (s)",
                 "inner steps", "wall time (s)")


def table_rows(summary: dict[str, Any]) -> list[list[str]]:
    """The results table as strings, one row per method (columns: TABLE_COLUMNS)."""
    rows = []
    for label, s in summary["methods"].items():
        ttt = _fmt(s["time_to_target_s"], ".1f")
        if s["seeds_run"] > 1 or s["time_to_target_s"] is None:
            ttt += f" ({s['reached_target']})"
        rows.append([label, _fmt(s["best_val_loss"]), _fmt(s["test_loss"]),
                     _fmt(s["test_acc"], ".3f"), ttt,
                     _fmt(None if s["inner_steps"] is None else int(s["inner_steps"])),
                     _fmt(s["wall_time_s"], ".1f")])
    return rows


def write_markdown(run_dir: Path, cfg: Config, summary: dict[str, Any],
                   plots: dict[str, Path]) -> Path:
    """Write report.md: settings, results table, embedded PNGs."""
    b = summary["budget"]
    budget = ", ".join(f"{k} = {v}" for k, v in b.items())
    lines = [f"# {cfg.name}" if cfg.name == cfg.task else f"# {cfg.name}: {cfg.task}", ""]
    if not summary["complete"]:
        lines += [f"> **Incomplete run**: {summary['runs_finished']} of "
                  f"{summary['runs_expected']} (method, seed) runs finished; the rest are "
                  "summarised from the records they left.", ""]
    target = summary["target_val_loss"]
    tsrc = ("set in the config" if summary["target_from"] == "config" else
            f"median final best val loss of `{summary['target_from']}`")
    lines += [
        f"- task: `{cfg.task}`, seeds: {cfg.seeds}, inner steps per training run: "
        f"{summary.get('steps_resolved') or cfg.steps or 'task default'}",
        f"- budget per method and seed: {budget}",
        f"- target val loss: {_fmt(target)} ({tsrc})",
        "- methods: " + ", ".join(
            f"`{m.label}` ({m.kind}{', ' + m.pruner if m.pruner else ''})" for m in cfg.methods),
        "", "## Results", "",
        "Medians over seeds. Best val loss: the lowest full-validation loss seen (gradient "
        "methods: along the training run; black-box: the best completed trial). Test loss/acc: "
        "the final weights of the gradient run; the best trial's model for black-box. Time to "
        "target: measured wall time until the best val loss first reached the target "
        "(reached/seeds in parentheses).", "",
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(summary)]
    captions = {
        "best_val_vs_time": "Best validation loss vs measured wall time (median over seeds, "
                            "band: min–max).",
        "best_val_vs_steps": "Best validation loss vs inner training steps spent (all trials, "
                             "pruned ones included).",
        "hparam_trajectories": "Hyperparameters along the gradient methods' training runs.",
        "pbt_schedule": "PBT's explore/exploit schedule (each member's values; x: it copied a "
                        "better member) beside the gradient methods' learned trajectories.",
        "blackbox_samples": "Points sampled by the black-box searches, coloured by final "
                            "validation loss (x: pruned trials).",
        "offline_schedules": "Schedules an offline tuner learned, one line per meta-step.",
    }
    if plots:
        lines += ["", "## Plots", ""]
        for key, path in plots.items():
            lines += [f"### {captions.get(key, key)}", "", f"![{key}]({path.name})", ""]
    p = run_dir / "report.md"
    p.write_text("\n".join(lines).rstrip() + "\n")
    return p


def build_report(run_dir: str | Path, plots: bool = True) -> dict[str, Any]:
    """Rebuild summary.json, the PNG plots and report.md from config.toml + metrics.jsonl."""
    from .plots import make_plots

    rd = RunDir(run_dir)
    cfg = rd.config()
    records = rd.records()
    summary = summarize(cfg, records)
    steps = {r.get("steps") for r in records if r.get("kind") == "run_start"}
    if len(steps) == 1:
        summary["steps_resolved"] = steps.pop()
    made = make_plots(rd.path, cfg, records, summary) if plots else {}
    summary["plots"] = [p.name for p in made.values()]
    rd.write_summary(summary)
    write_markdown(rd.path, cfg, summary, made)
    return summary
