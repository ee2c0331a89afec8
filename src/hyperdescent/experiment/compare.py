"""`compare(cfg)`: every method x seed on one task under one budget, into one run directory.

Writes config.toml first, metrics.jsonl as the runs go, and at the end (also after an
interruption) summary.json, the PNG plots and report.md via `hyperdescent.report.build_report`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from .config import Config, Method
from .executors import run_all
from .rundir import RunDir
from .runners import build_space, resolve_steps


def _warm_up() -> None:
    """Pay one-time lazy imports (torch.optim pulls in torch._dynamo) before any clock starts."""
    p = torch.zeros(1, requires_grad=True)
    torch.optim.SGD([p], lr=0.1)
    torch.optim.Adam([p], lr=0.1)
    import optuna.samplers  # noqa: F401

    from ..blackbox import search  # noqa: F401
    from ..tuners.online import OnlineTuner  # noqa: F401


class _Display:
    """A rich progress bar per method on stderr; one plain line per finished run when not a TTY."""

    def __init__(self, cfg: Config, enabled: bool, console=None):
        from rich.console import Console
        self.cfg = cfg
        self.console = console or Console(stderr=True)
        b = cfg.budget
        self.unit, self.unit_key = ((b.wall_clock_s, "elapsed_s") if b.wall_clock_s else
                                    (b.inner_steps, "inner_steps") if b.inner_steps else
                                    (b.trials, "trials"))
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal
        self.progress = None
        self.tasks: dict[str, Any] = {}
        self.done: dict[str, int] = {m.label: 0 for m in cfg.methods}
        self.trials: dict[tuple, int] = {}

    def __enter__(self) -> _Display:
        if self.live:
            from rich.progress import (
                BarColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            self.progress = Progress(TextColumn("{task.description:<22}"), BarColumn(),
                                     TaskProgressColumn(), TimeElapsedColumn(),
                                     TextColumn("{task.fields[status]}"),
                                     console=self.console, transient=False)
            self.progress.__enter__()
            for m in self.cfg.methods:
                self.tasks[m.label] = self.progress.add_task(
                    m.label, total=self.unit * len(self.cfg.seeds), status="waiting",
                    start=False)
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def update(self, rec: dict[str, Any]) -> None:
        """Advance the method's bar from a metrics record."""
        if not self.enabled:
            return
        label, kind = rec.get("method"), rec.get("kind")
        if kind == "run_end":
            self.done[label] += 1
            if not self.live:
                self.console.print(
                    f"{label} seed {rec['seed']}: best val loss {_f(rec.get('best_val_loss'))}, "
                    f"test loss {_f(rec.get('test_loss'))}, {rec.get('inner_steps')} inner "
                    f"steps, {rec.get('elapsed_s', 0):.1f} s ({rec.get('stopped_by')})",
                    highlight=False, soft_wrap=True)
        if self.progress is None or label not in self.tasks:
            return
        if kind == "run_start":
            self.progress.start_task(self.tasks[label])
        if kind == "trial":
            key = (label, rec["seed"])
            self.trials[key] = self.trials.get(key, 0) + 1
        if kind == "run_end":
            completed = self.done[label] * self.unit
        else:
            here = (self.trials.get((label, rec.get("seed")), 0) if self.unit_key == "trials"
                    else rec.get(self.unit_key, 0) or 0)
            completed = self.done[label] * self.unit + min(here, self.unit)
        status = f"seed {rec.get('seed')}  best val {_f(rec.get('best_val_loss'))}"
        if kind == "trial":
            status += f"  trial {rec.get('trial')}"
        elif kind == "oho_step":
            status += f"  step {rec.get('step')}"
        self.progress.update(self.tasks[label], completed=completed, status=status)


def _f(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else "—"


def results_table(summary: dict[str, Any], title: str | None = None):
    """A rich Table of the summary: best val loss, test loss/acc, time to target, steps, wall time."""
    from rich.table import Table

    from ..report.markdown import TABLE_COLUMNS, table_rows
    target = summary.get("target_val_loss")
    name = summary["name"] if summary["name"] == summary["task"] else \
        f"{summary['name']} ({summary['task']})"
    t = Table(title=title or f"{name}: target val loss {_f(target)} "
              f"(from {summary.get('target_from')})")
    for i, c in enumerate(TABLE_COLUMNS):
        t.add_column(c, justify="left" if i == 0 else "right")
    for row in table_rows(summary):
        t.add_row(*row)
    return t


def compare(cfg: Config, out: str | Path | None = None, progress: bool = True,
            threads: int | None = 1, console=None, resume: str | Path | None = None) -> Path:
    """Run every method x seed of `cfg` under its budget; write the run directory and return its path.

    `out` is the run directory itself (default `<output_dir or runs>/<date>-<time>-<name>/`);
    `threads` sets torch's intra-op threads during the runs (1: fastest for these small models
    and the same for every method; None leaves torch's setting alone). `resume` continues an
    interrupted run directory started with the same config: finished method x seed runs are
    kept, an unfinished black-box run continues its study (kept in the run directory), other
    unfinished runs run again from their start (seeded, so as they would have run).
    """
    from .. import tasks
    from ..report.markdown import build_report

    task = tasks.get(cfg.task)
    for m in cfg.methods:  # fail before creating anything on a bad space override
        build_space(task, cfg, m)
    resolve_steps(task, cfg)
    done: set = set()
    if resume is not None:
        rd, done = RunDir.reopen(resume, cfg)
    else:
        rd = RunDir.create(cfg.name, out, parent=cfg.output_dir)
        rd.write_config(cfg)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        _warm_up()
        with _Display(cfg, progress, console) as display:
            def log(rec: dict[str, Any]) -> None:
                rd.log(rec)
                display.update(rec)

            run_all(task, cfg, log, done=done, run_dir=rd.path)
    except BaseException as e:  # interrupted or failed: keep what was written, report it, re-raise
        with contextlib.suppress(AttributeError, TypeError):
            e.run_dir = rd.path  # type: ignore[attr-defined]
        rd.close()
        torch.set_num_threads(old_threads)
        with contextlib.suppress(Exception):
            build_report(rd.path)
        raise
    rd.close()
    torch.set_num_threads(old_threads)
    build_report(rd.path)
    return rd.path


def single(cfg: Config, method: str | None = None) -> Config:
    """`cfg` restricted to one method (the one labelled `method`, else the first)."""
    m: Method = cfg.method(method) if method else cfg.methods[0]
    target = cfg.target_val_loss if not isinstance(cfg.target_val_loss, str) else None
    return cfg.model_copy(update={"methods": [m], "target_val_loss": target})


def run(cfg: Config, out: str | Path | None = None, method: str | None = None,
        progress: bool = True, console=None, resume: str | Path | None = None) -> Path:
    """One tuning run: `compare` with the config's single method (or the one labelled `method`)."""
    return compare(single(cfg, method), out=out, progress=progress, console=console,
                   resume=resume)
