"""Plot of the schedules an offline tuner learned, one line per meta-step (Micaelli & Storkey
2021, Fig. 4 style: hyperparameter value against the fraction of training)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..experiment.config import OFFLINE_KINDS, Config


def plot_offline_schedules(path: Path, cfg: Config, records: list[dict]) -> Path | None:
    """One panel per hyperparameter and offline method (first seed): its values over the
    fraction of training at every meta-step, darker for later meta-steps."""
    from .plots import _figure
    labels = [m.label for m in cfg.methods if m.kind in OFFLINE_KINDS]
    steps = {lab: [r for r in records if r.get("kind") == "meta_step" and r.get("method") == lab
                   and r.get("seed") == cfg.seeds[0]] for lab in labels}
    steps = {k: v for k, v in steps.items() if v}
    if not steps:
        return None
    names = list(dict.fromkeys(n for recs in steps.values() for r in recs for n in r["hparams"]))
    from matplotlib import colormaps
    fig, axes = _figure(len(steps), len(names), size=(4.5, 3.5))
    cmap = colormaps["viridis"]
    for i, (label, recs) in enumerate(steps.items()):
        for j, name in enumerate(names):
            ax = axes[i, j]
            for k, r in enumerate(recs):
                v = r["hparams"].get(name)
                if isinstance(v, dict):  # per layer: the mean across layers
                    vals = [x if isinstance(x, list) else [x] for x in v.values()]
                    v = list(np.mean(np.array(vals, dtype=float), axis=0))
                ys = np.atleast_1d(np.asarray(v, dtype=float))
                xs = np.linspace(0.0, 1.0, len(ys) + 1)
                ax.stairs(ys, xs, color=cmap(k / max(1, len(recs) - 1)), lw=1.5,
                          label=f"meta-step {k}" if k in (0, len(recs) - 1) else None)
            ax.set_xlabel("fraction of training")
            ax.set_ylabel(name)
            ax.set_title(f"{label}: {name}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return path
