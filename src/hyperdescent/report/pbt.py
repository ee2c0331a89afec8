"""The schedule Population Based Training found (each member's values along its run, with its
exploit steps marked) beside the gradient methods' learned trajectories."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..experiment.config import Config


def plot_pbt(path: Path, cfg: Config, records: list[dict]) -> Path | None:
    """PBT members' hyperparameters vs inner step (x: exploit), OHO-style trajectories beside."""
    from .markdown import runs_of
    from .plots import _colors, _figure, _leaves, _style_trajectory_axis, _trajectory
    pbt = [r for r in records if r.get("kind") == "pbt_step" and r.get("seed") == cfg.seeds[0]]
    if not pbt:
        return None
    names = list(dict.fromkeys(n for r in pbt for n in r["hparams"]))
    colors = _colors(cfg)
    grad = {m.label for m in cfg.methods if m.gradient}
    fig, axes = _figure(1, len(names), size=(6.0, 5.0))
    for j, name in enumerate(names):
        ax = axes[0, j]
        members = defaultdict(list)
        for r in pbt:
            members[(r["method"], r["member"])].append(r)
        for (label, member), rs in sorted(members.items()):
            # the values a report carries are those of the steps since the previous report
            xs = [rs[0]["step"] - rs[0].get("executed", rs[0]["step"])] + [r["step"] for r in rs]
            ys = [rs[0]["hparams"][name]] + [r["hparams"][name] for r in rs]
            ax.step(xs, ys, where="pre", color=colors[label], alpha=0.7, lw=1.0,
                    label=f"{label} (one line per member)" if member == 0 else None)
            ex = [(r["step"], r["hparams"][name]) for r in rs if r.get("event") == "exploit"]
            if ex:
                ax.plot(*zip(*ex), "x", color=colors[label], ms=5)
        for (label, seed), run in runs_of(records).items():
            if label in grad and seed == cfg.seeds[0]:
                pts = [(s, v) for s, hp in _trajectory(run)
                       for v in _leaves(hp.get(name), name).values()]
                if pts:
                    ax.plot(*zip(*pts), color=colors[label], lw=1.5, label=label)
        _style_trajectory_axis(
            ax, name, "inner step (x: a member copied a better one and moved its values)",
            f"{name}: PBT's schedule and the learned trajectories")
    fig.savefig(path, dpi=110)
    return path
