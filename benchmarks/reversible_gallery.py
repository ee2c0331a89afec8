"""The gallery of Maclaurin, Duvenaud & Adams 2015 (Sec. 3), by `hd.hypergrad(method="reversible")`.

(a) per-layer, per-step learning-rate and momentum schedules of the digits MLP (64-128-128-10,
    100 inner steps), Adam on the raw coordinates (`hd.OfflineTuner(method="reversible")`);
(b) per-weight L2 penalties (weight decay per element) of logistic regression on digits, drawn
    as one 8x8 image per class;
(c) 10 training images (one per class) learned from blank: the training inputs themselves are
    the hyperparameter (the reserved name "train_inputs" of the space), a logistic regression
    trained on them, the loss on 1000 real digits as the objective;
(d) initial-weight scales per layer of the digits MLP (the reserved name "init_scale",
    per="layer", log scale: its raw gradient is Σ θ0 ⊙ dE/dθ0).

    python benchmarks/reversible_gallery.py                # 50 meta-steps each
    python benchmarks/reversible_gallery.py --meta-steps 5 --quick

Writes benchmarks/results/reversible_gallery.{json,md} and reversible_gallery_{a,b,c,d}.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import hyperdescent as hd
from hyperdescent.tuners.meta import MetaOptimizer

RESULTS = Path(__file__).resolve().parent / "results"
T = 100


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _float64(task):
    return (task.train[0].double(), task.train[1]), (task.val[0].double(), task.val[1])


def schedules(meta_steps: int, out: Path) -> dict:
    """(a) per-layer, per-step lr and momentum schedules."""
    task = hd.tasks.get("digits_mlp")
    space = hd.Space({
        "lr": hd.Real(0.05, low=1e-4, high=1.0, log=True, per="layer", schedule=hd.Piecewise(T)),
        "momentum": hd.Real(0.9, low=0.05, high=0.99, per="layer", schedule=hd.Piecewise(T))})
    problem = hd.Problem(task.make_model(0), optimizer=hd.optim.SGD(momentum=0.9), space=space,
                         train=task.train, val=task.val, batch_size=128,
                         val_batch_size=len(task.val[0]))
    tuner = hd.OfflineTuner(problem, method="reversible", steps=T, meta_steps=meta_steps,
                            meta_lr=0.05, meta_optimizer="adam", fresh_init=False)
    t0 = time.perf_counter()
    tuner.run()
    wall = time.perf_counter() - t0
    hp = tuner.hparams
    losses = [h.get("value", h.get("val_loss")) for h in tuner.history]
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, ax in zip(("lr", "momentum"), axes):
        for layer, x in hp[name].items():
            if layer.endswith("weight"):
                ax.plot(x.detach().numpy(), label=layer)
        ax.set_xlabel("inner step")
        ax.set_title(f"learned {name} per layer (weights)")
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(out / "reversible_gallery_a.png", dpi=110)
    plt.close(fig)
    return {"meta_steps": meta_steps, "wall_s": wall, "val_loss": losses,
            "lr": {k: v.tolist() for k, v in hp["lr"].items()},
            "momentum": {k: v.tolist() for k, v in hp["momentum"].items()}}


def _meta_loop(meta_steps, raw, lr, evaluate):
    """Adam on raw tensors: evaluate(raw) -> (value, raw gradients)."""
    meta = MetaOptimizer(raw, kind="adam", lr=lr)
    losses = []
    for _ in range(meta_steps):
        value, grads = evaluate(meta.values())
        losses.append(value)
        meta.step(grads)
    return meta.values(), losses


def l2_penalties(meta_steps: int, out: Path) -> dict:
    """(b) a weight decay per weight of logistic regression on digits."""
    task = hd.tasks.get("digits_logreg")
    train, val = _float64(task)
    space = hd.Space({"weight_decay": hd.Real(1e-3, low=1e-8, high=10.0, log=True,
                                              per="parameter")})
    problem = hd.Problem(task.make_model(0).double(), optimizer=hd.optim.SGD(lr=0.5,
                                                                             momentum=0.9),
                         space=space, train=train, val=val, batch_size=128,
                         val_batch_size=len(val[0]))

    def evaluate(raw):
        problem.set_raw_hparams(hd.space.unflatten(raw, problem.raw_hparams))
        res = hd.hypergrad(problem, steps=T, method="reversible")
        return res.value, hd.space.flatten(res.raw_grad)

    raw, losses = _meta_loop(meta_steps, hd.space.flatten(problem.raw_hparams), 0.1, evaluate)
    problem.set_raw_hparams(hd.space.unflatten(raw, problem.raw_hparams))
    wd = problem.hparams["weight_decay"]
    name = next(k for k in wd if k.endswith("weight"))
    img = torch.log10(wd[name]).reshape(10, 8, 8)
    plt = _plt()
    fig, axes = plt.subplots(1, 10, figsize=(12, 1.6))
    for c, ax in enumerate(axes):
        ax.imshow(img[c].numpy(), cmap="viridis")
        ax.set_title(str(c))
        ax.axis("off")
    fig.suptitle("log10 weight decay per weight of logistic regression (one 8x8 image a class)",
                 fontsize=9)
    fig.savefig(out / "reversible_gallery_b.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return {"meta_steps": meta_steps, "val_loss": losses,
            "log10_wd_range": [float(img.min()), float(img.max())]}


def training_images(meta_steps: int, out: Path) -> dict:
    """(c) 10 training images learned from blank."""
    task = hd.tasks.get("digits_logreg")
    _, val = _float64(task)
    real = (task.train[0][:1000].double(), task.train[1][:1000])
    labels = torch.arange(10)
    # the training inputs are the reserved hyperparameter "train_inputs" (docs/architecture.md)
    space = hd.Space({"lr": hd.Real(0.5, low=1e-3, high=5.0, log=True),
                      "train_inputs": hd.Real(0.0)})
    x0 = {"x": torch.zeros(10, 64, dtype=torch.float64)}
    problem = hd.Problem(task.make_model(0).double(), optimizer=hd.optim.SGD(momentum=0.5),
                         space=space, train=(x0["x"], labels), val=real, batch_size=10,
                         val_batch_size=1000)

    def evaluate(raw):
        problem.set_hparams({"train_inputs": raw["x"]})
        res = hd.hypergrad(problem, steps=T, method="reversible")
        return res.value, {"x": res.grad["train_inputs"]}

    raw, losses = _meta_loop(meta_steps, x0, 0.05, evaluate)
    plt = _plt()
    fig, axes = plt.subplots(1, 10, figsize=(12, 1.6))
    for c, ax in enumerate(axes):
        ax.imshow(raw["x"][c].reshape(8, 8).numpy(), cmap="gray")
        ax.set_title(str(c))
        ax.axis("off")
    fig.suptitle("training images learned from blank (one per class)", fontsize=9)
    fig.savefig(out / "reversible_gallery_c.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return {"meta_steps": meta_steps, "real_digits_loss": losses, "val_split": len(val[0])}


def init_scales(meta_steps: int, out: Path) -> dict:
    """(d) initial-weight scales per layer of the digits MLP."""
    task = hd.tasks.get("digits_mlp")
    base = task.make_model(0)
    names = [n for n, _ in base.named_parameters()]
    # the reserved hyperparameter "init_scale" per layer; its raw coordinate is the log scale
    space = hd.Space({"lr": hd.Real(0.05, low=1e-4, high=1.0, log=True),
                      "init_scale": hd.Real(1.0, low=1e-3, high=1e3, log=True, per="layer")})
    problem = hd.Problem(base, optimizer=hd.optim.SGD(momentum=0.9), space=space,
                         train=task.train, val=task.val, batch_size=128,
                         val_batch_size=len(task.val[0]))

    def evaluate(raw):
        problem.set_hparams({"init_scale": {n: torch.exp(raw[n]) for n in names}})
        res = hd.hypergrad(problem, steps=T, method="reversible")
        g = res.raw_grad["init_scale"]  # dE/dlog s
        return res.value, {n: g[n].detach().clone() for n in names}

    raw0 = {n: torch.tensor(0.0) for n in names}
    history = []

    def tracked(raw):
        history.append({n: float(torch.exp(v)) for n, v in raw.items()})
        return evaluate(raw)

    raw, losses = _meta_loop(meta_steps, raw0, 0.05, tracked)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for n in names:
        ax.plot([h[n] for h in history], label=n)
    ax.set_xlabel("meta-step")
    ax.set_ylabel("initial-weight scale")
    ax.set_title("learned initial-weight scale per layer (digits MLP)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "reversible_gallery_d.png", dpi=110)
    plt.close(fig)
    return {"meta_steps": meta_steps, "val_loss": losses,
            "scales": {n: float(torch.exp(v)) for n, v in raw.items()}}


def markdown(results: dict, meta: dict) -> str:
    lines = ["# Reversible learning: the gallery of Maclaurin et al. 2015", "",
             f"Command: `{meta['command']}`", "",
             f"Generated {meta['date']}; {meta['threads']} thread(s); T = {T} inner steps; "
             f"total {meta['total_min']:.1f} min (a shared, loaded machine).", ""]
    for key, title in (("a", "per-layer, per-step lr and momentum (digits MLP)"),
                       ("b", "per-weight L2 penalties (logistic regression)"),
                       ("c", "10 training images from blank"),
                       ("d", "initial-weight scale per layer (digits MLP)")):
        r = results.get(key)
        if r is None:
            continue
        if "error" in r:
            lines += [f"## ({key}) {title}", "", f"failed: `{r['error']}`", ""]
            continue
        loss = r.get("val_loss") or r.get("real_digits_loss")
        lines += [f"## ({key}) {title}", "",
                  f"{r['meta_steps']} meta-steps of Adam; validation loss "
                  f"{loss[0]:.4f} at the first meta-step, {min(loss):.4f} at best, "
                  f"{loss[-1]:.4f} at the last. Plot: `reversible_gallery_{key}.png`.", ""]
        if key == "d":
            lines += ["Learned scales: " + ", ".join(f"{n} {s:.3f}" for n, s in
                                                     r["scales"].items()), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--meta-steps", type=int, default=50)
    ap.add_argument("--only", nargs="+", default=["a", "b", "c", "d"])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    out = RESULTS
    out.mkdir(exist_ok=True)
    parts = {"a": schedules, "b": l2_penalties, "c": training_images, "d": init_scales}
    results = {}
    for key in args.only:
        t1 = time.time()
        try:
            results[key] = parts[key](args.meta_steps, out)
        except Exception as e:  # one failed panel should not lose the others
            results[key] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(key, f"{time.time() - t1:.0f}s", json.dumps(results[key])[:200], flush=True)
    meta = {"command": "python benchmarks/reversible_gallery.py " + " ".join(
        os.sys.argv[1:] if argv is None else argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "threads": torch.get_num_threads(), "total_min": (time.time() - t0) / 60}
    stem = "reversible_gallery_quick" if args.quick else "reversible_gallery"
    if (out / f"{stem}.json").exists():  # --only reruns some panels: keep the others' results
        old = json.loads((out / f"{stem}.json").read_text())
        results = {**{k: v for k, v in old.get("results", {}).items() if k not in results},
                   **results}
        results = dict(sorted(results.items()))
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (out / f"{stem}.md").write_text(markdown(results, meta))
    print(math.nan if not results else (out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
