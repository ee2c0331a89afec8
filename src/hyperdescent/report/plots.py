"""PNG plots of a run directory's records (matplotlib, Agg canvas, no pyplot global state).

- best_val_vs_time.png / best_val_vs_steps.png: best validation loss so far vs measured wall
  time and vs inner steps, per method: median over seeds, min–max band;
- hparam_trajectories.png: the gradient methods' hyperparameters along their training runs;
- blackbox_samples.png: each black-box method's sampled points (lr vs weight decay) coloured by
  validation loss.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..experiment.config import Config
from .markdown import runs_of


def _figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (7.0, 4.5)):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _colors(cfg: Config) -> dict[str, Any]:
    from matplotlib import colormaps
    cmap = colormaps["tab10"]
    return {m.label: cmap(i % 10) for i, m in enumerate(cfg.methods)}


_STYLES = ("-", "--", "-.", (0, (5, 1, 1, 1, 1, 1)), ":", (0, (8, 2)))


def _styles(cfg: Config) -> dict[str, Any]:
    return {m.label: _STYLES[i % len(_STYLES)] for i, m in enumerate(cfg.methods)}


def _step_value(xs: np.ndarray, ys: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Right-continuous step function through (xs, ys) on `grid`; NaN outside [xs[0], xs[-1]]."""
    idx = np.searchsorted(xs, grid, side="right") - 1
    out = np.where(idx >= 0, ys[np.clip(idx, 0, len(ys) - 1)], np.nan)
    out[grid > xs[-1]] = np.nan
    return out


def _curves(cfg: Config, records: list[dict], x_key: str) -> dict[str, list[tuple]]:
    """Per method, per seed: (x, best val loss) arrays of its curve records."""
    out: dict[str, list[tuple]] = defaultdict(list)
    for (label, _seed), run in sorted(runs_of(records).items(), key=lambda kv: str(kv[0])):
        pts = [(r.get(x_key), r.get("best_val_loss")) for r in run["curve"]]
        pts = [(float(x), float(y)) for x, y in pts
               if x is not None and y is not None and math.isfinite(y)]
        if pts:
            xs, ys = map(np.asarray, zip(*pts))
            order = np.argsort(xs, kind="stable")
            out[label].append((xs[order], ys[order]))
    return out


def plot_best_val(path: Path, cfg: Config, records: list[dict], summary: dict,
                  x_key: str = "elapsed_s") -> Path | None:
    """Best val loss so far vs wall time (or inner steps) per method, median line, min-max band."""
    curves = _curves(cfg, records, x_key)
    if not curves:
        return None
    colors, styles = _colors(cfg), _styles(cfg)
    fig, axes = _figure()
    ax = axes[0, 0]
    for m in cfg.methods:
        seeds = curves.get(m.label)
        if not seeds:
            continue
        grid = np.unique(np.concatenate([xs for xs, _ in seeds]))
        vals = np.vstack([_step_value(xs, ys, grid) for xs, ys in seeds])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(vals, axis=0)
            lo, hi = np.nanmin(vals, axis=0), np.nanmax(vals, axis=0)
        label = m.label + (f" ({len(seeds)} seeds)" if len(seeds) > 1 else "")
        ax.step(grid, med, where="post", color=colors[m.label], label=label, lw=1.8,
                ls=styles[m.label])
        ax.plot(grid[:1], med[:1], "o", color=colors[m.label], ms=4)
        if len(seeds) > 1:
            ax.fill_between(grid, lo, hi, step="post", color=colors[m.label], alpha=0.12,
                            lw=0)
    target = summary.get("target_val_loss")
    if target is not None:
        ax.axhline(target, color="0.3", ls="--", lw=1,
                   label=f"target {target:.4g} ({summary.get('target_from')})")
    budget = cfg.budget.wall_clock_s if x_key == "elapsed_s" else cfg.budget.inner_steps
    if budget is not None:
        ax.axvline(budget, color="0.5", ls=":", lw=1, label="budget")
    ax.set_yscale("log")
    if x_key == "elapsed_s":
        ax.set_xlabel("wall time (s, measured)")
        ax.set_xlim(left=0)
    else:
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlim(left=0)
        ax.set_xlabel("inner training steps (cumulative, pruned trials included)")
    ax.set_ylabel("best validation loss so far")
    title = cfg.name if cfg.name == cfg.task else f"{cfg.name} ({cfg.task})"
    ax.set_title(f"{title}: best validation loss vs "
                 f"{'wall time' if x_key == 'elapsed_s' else 'inner steps'}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return path


def _leaves(value: Any, prefix: str = "") -> dict[str, float]:
    """A hyperparameter value (float, per-layer dict, schedule list) as named floats."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_leaves(v, f"{prefix}/{k}" if prefix else str(k)))
        return out
    if isinstance(value, (list, tuple)):
        return {f"{prefix}[{i}]": float(v) for i, v in enumerate(value) if v is not None}
    if value is None:
        return {}
    return {prefix: float(value)}


def _trajectory(run: dict) -> list[tuple[int, dict]]:
    """(step, hparams) points of a gradient run: the per-step traces, else the logged records."""
    pts: list[tuple[int, dict]] = []
    for r in run["curve"]:
        if r.get("kind") != "oho_step":
            continue
        for step, _loss, hp in r.get("trace") or []:
            pts.append((step, hp))
        if r.get("hparams") is not None:
            pts.append((r["step"], r["hparams"]))
    return pts


def _style_trajectory_axis(ax, name: str, xlabel: str, title: str) -> None:
    """Log-scaled hyperparameter axis with its legend below the plot (shared by the reports)."""
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(name)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2,
              frameon=False)


def plot_hparams(path: Path, cfg: Config, records: list[dict]) -> Path | None:
    """Gradient methods' hyperparameter trajectories (one panel per hyperparameter, log y)."""
    grad_labels = [m.label for m in cfg.methods if m.gradient]
    runs = runs_of(records)
    traj = {key: _trajectory(run) for key, run in runs.items() if key[0] in grad_labels}
    traj = {k: v for k, v in traj.items() if v}
    if not traj:
        return None
    names: list[str] = []
    for pts in traj.values():
        for _, hp in pts:
            for n in hp:
                if n not in names:
                    names.append(n)
    colors = _colors(cfg)
    fig, axes = _figure(1, len(names), size=(6.0, 5.0))
    bb_best = {}
    for (label, seed), run in sorted(runs.items(), key=lambda kv: str(kv[0])):
        if label not in grad_labels and run["end"] and run["end"].get("best_params") \
                and seed == cfg.seeds[0]:
            bb_best[label] = run["end"]["best_params"]
    for j, name in enumerate(names):
        ax = axes[0, j]
        labelled = set()
        for (label, _seed), pts in sorted(traj.items(), key=lambda kv: str(kv[0])):
            # split where the step goes back (a rollback): each segment is its own line, and
            # the abandoned end of the earlier one gets an x
            series: dict[str, list[list]] = defaultdict(lambda: [[]])
            prev = None
            for step, hp in pts:
                for leaf, v in _leaves(hp.get(name), name).items():
                    segs = series[leaf]
                    if prev is not None and step < prev and segs[-1]:
                        segs.append([])
                    segs[-1].append((step, v))
                prev = step
            many = len(series) > 1
            for segs in series.values():
                for k, seg in enumerate(segs):
                    if not seg:
                        continue
                    xs, ys = zip(*seg)
                    lab = None
                    if label not in labelled:
                        lab = label if not many else f"{label} (one line per layer)"
                        if len(cfg.seeds) > 1:
                            lab += f" ({len(cfg.seeds)} seeds)"
                        labelled.add(label)
                    ax.plot(xs, ys, color=colors[label], lw=1.0 if many else 1.5,
                            alpha=0.6 if many or len(cfg.seeds) > 1 else 1.0, label=lab)
                    if k < len(segs) - 1:
                        ax.plot(xs[-1:], ys[-1:], "x", color=colors[label], ms=5)
        for label, params in bb_best.items():
            if name in params and params[name] > 0:
                ax.axhline(params[name], color=colors[label], ls="--", lw=1,
                           label=f"{label}: best {name} (seed {cfg.seeds[0]})")
        _style_trajectory_axis(ax, name, "inner step (x: abandoned by a rollback)",
                               f"{name} along the training run")
    fig.savefig(path, dpi=110)
    return path


def _pick_dims(params: list[dict]) -> tuple[str | None, str | None]:
    keys: list[str] = []
    for p in params:
        for k, v in p.items():
            if k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.append(k)
    x = next((k for k in keys if k == "lr" or k.startswith("lr")), keys[0] if keys else None)
    y = next((k for k in keys if k.startswith("weight_decay")),
             next((k for k in keys if k != x), None))
    return x, y


def plot_blackbox(path: Path, cfg: Config, records: list[dict]) -> Path | None:
    """Sampled points of each black-box method: lr vs weight decay, coloured by val loss."""
    from matplotlib.colors import LogNorm

    bb = [m for m in cfg.methods if not m.gradient]
    trials = {m.label: [r for r in records if r.get("kind") == "trial"
                        and r.get("method") == m.label and r.get("params")] for m in bb}
    trials = {k: v for k, v in trials.items() if v}
    if not trials:
        return None
    values = [r["value"] for v in trials.values() for r in v
              if r.get("value") is not None and r["value"] > 0]
    norm = LogNorm(vmin=min(values), vmax=max(values)) if values else None
    n = len(trials)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = _figure(nrows, ncols, size=(5.0, 4.2))
    sc = None
    for i, (label, rs) in enumerate(trials.items()):
        ax = axes[i // ncols, i % ncols]
        x, y = _pick_dims([r["params"] for r in rs])
        done = [r for r in rs if r.get("value") is not None]
        pruned = [r for r in rs if r.get("value") is None]
        def yv(r: dict, y: str | None = y) -> float:
            return r["params"][y] if y else r["value"]

        if done:
            sc = ax.scatter([r["params"][x] for r in done], [yv(r) for r in done],
                            c=[r["value"] for r in done], cmap="viridis_r", norm=norm, s=28,
                            edgecolors="k", linewidths=0.3)
            best = min(done, key=lambda r: r["value"])
            ax.scatter([best["params"][x]], [yv(best)], marker="*", s=220, facecolors="none",
                       edgecolors="red", linewidths=1.5, label=f"best {best['value']:.4g}")
        if pruned and y:
            ax.scatter([r["params"][x] for r in pruned], [r["params"][y] for r in pruned],
                       marker="x", color="0.55", s=18, lw=0.8, label=f"pruned ({len(pruned)})")
        dims = next((r.get("dimensions") for r in records if r.get("kind") == "run_start"
                     and r.get("method") == label and r.get("dimensions")), None) or {}
        for dim, setlim, setscale in ((x, ax.set_xlim, ax.set_xscale),
                                      (y, ax.set_ylim, ax.set_yscale)):
            d = dims.get(dim) if dim else None
            if d and d.get("low") is not None and d.get("high") is not None:
                lo, hi = d["low"], d["high"]
                if d.get("log"):
                    setscale("log")
                    pad = (hi / lo) ** 0.03
                    setlim(lo / pad, hi * pad)
                else:
                    pad = (hi - lo) * 0.03
                    setlim(lo - pad, hi + pad)
            elif dim:
                setscale("log")
        if not y:
            ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(y or "val loss")
        seeds = sorted({r["seed"] for r in rs})
        ax.set_title(f"{label}: {len(rs)} trials" + (f", seeds {seeds}" if len(seeds) > 1 else ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for j in range(n, nrows * ncols):
        axes[j // ncols, j % ncols].set_visible(False)
    if sc is not None:
        fig.colorbar(sc, ax=axes.ravel().tolist(), label="final validation loss", shrink=0.9)
    fig.savefig(path, dpi=110)
    return path


def _offline(path: Path, cfg: Config, records: list[dict]) -> Path | None:
    from .schedules import plot_offline_schedules
    return plot_offline_schedules(path, cfg, records)


def _pbt(path: Path, cfg: Config, records: list[dict]) -> Path | None:
    from .pbt import plot_pbt
    return plot_pbt(path, cfg, records)


def make_plots(run_dir: Path, cfg: Config, records: list[dict], summary: dict) -> dict[str, Path]:
    """Write every plot that has data into `run_dir`; returns key -> PNG path."""
    run_dir = Path(run_dir)
    out = {}
    made = {
        "best_val_vs_time": plot_best_val(run_dir / "best_val_vs_time.png", cfg, records,
                                          summary, "elapsed_s"),
        "best_val_vs_steps": plot_best_val(run_dir / "best_val_vs_steps.png", cfg, records,
                                           summary, "inner_steps"),
        "hparam_trajectories": plot_hparams(run_dir / "hparam_trajectories.png", cfg, records),
        "blackbox_samples": plot_blackbox(run_dir / "blackbox_samples.png", cfg, records),
        "offline_schedules": _offline(run_dir / "offline_schedules.png", cfg, records),
        "pbt_schedule": _pbt(run_dir / "pbt_schedule.png", cfg, records),
    }
    for k, p in made.items():
        if p is not None:
            out[k] = p
    return out
