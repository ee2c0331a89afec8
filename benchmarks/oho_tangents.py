"""Which tangent to pick when tuning many hyperparameters online: exact, summed, uoro, truncated.

Two experiments on the bundled MLP tasks, per-layer learning rates and weight decay from a
learning rate 100x below the task's default:

1. variance: at fixed hyperparameters, the uoro estimate (k = 1, 4, 16 samples) against the
   exact tangent on the same trajectory every 10 steps: cosine and relative error of the
   hypergradient (Tallec & Ollivier 2018 trade variance for cost; this measures the price);
2. quality: OnlineTuner runs with each tangent over several seeds: final validation and test
   loss and wall time.

    python benchmarks/oho_tangents.py [--tasks digits_mlp mnist1d_mlp] [--seeds 5] [--steps 400]

Results: benchmarks/results/oho_tangents.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import hyperdescent as hd
from hyperdescent.hypergrad.forward import ForwardTangent
from hyperdescent.hypergrad.uoro import UOROTangent

BENCH_QUICK_ARGS = ["--tasks", "digits_mlp", "--seeds", "1", "--steps", "60", "--variance-steps",
                    "30"]
VARIANTS = {
    "exact": {"tangent": "exact"},
    "summed": {"tangent": "summed"},
    "uoro (k=1)": {"tangent": "uoro"},
    "uoro (k=4)": {"tangent": "uoro", "uoro_samples": 4},
    "truncated (window 10)": {"method": "truncated", "window": 10},
}


def make_problem(task, seed: int) -> hd.Problem:
    """Per-layer lr (100x below the task's default) and per-layer weight decay."""
    lr0 = task.space["lr"].init / 100
    space = hd.Space({"lr": hd.Real(lr0, low=1e-5, high=2.0, log=True, per="layer"),
                      "weight_decay": hd.Real(1e-4, low=1e-7, high=1e-1, log=True,
                                              per="layer")})
    return hd.Problem(task.make_model(seed), optimizer=hd.optim.SGD(momentum=task.momentum),
                      space=space, train=task.train, val=task.val, test=task.test,
                      batch_size=task.batch_size, val_batch_size=256, seed=seed)


def variance(task, steps: int, samples=(1, 4, 16)) -> list[dict]:
    """uoro vs exact hypergradients along one trajectory at fixed hyperparameters."""
    p = make_problem(task, 0)
    leaves = {k: v.detach() for k, v in hd.space.flatten(p.real_hparams()).items()}
    exact = ForwardTangent(p, steps)
    uoro = {k: UOROTangent(p, steps, samples=k, seed=1) for k in samples}
    state, carry = p.init_state(), exact.init()
    carries = {k: e.init() for k, e in uoro.items()}
    out = []
    for t in range(steps):
        batch = p.train_batch(t)
        new_state, carry, _ = exact.step(carry, state, batch, leaves, t)
        for k, e in uoro.items():  # the same states: the weights do not depend on the tangent
            _, carries[k], _ = e.step(carries[k], state, batch, leaves, t)
        state = new_state
        if (t + 1) % 10 == 0:
            vb = p.val_batch(t + 1)
            _, g = exact.readout(carry, state, vb)
            ref = torch.cat([v.reshape(-1) for v in g.values()])
            for k, e in uoro.items():
                _, ge = e.readout(carries[k], state, vb)
                est = torch.cat([v.reshape(-1) for v in ge.values()])
                out.append({"task": task.name, "step": t + 1, "samples": k,
                            "cosine": float(torch.nn.functional.cosine_similarity(
                                est, ref, dim=0)),
                            "rel_error": float((est - ref).norm() / ref.norm())})
    return out


def quality(task, variant: str, seed: int, steps: int) -> dict:
    """Final val/test loss and wall time of one OnlineTuner run."""
    p = make_problem(task, seed)
    t0 = time.perf_counter()
    tuner = hd.OnlineTuner(p, **VARIANTS[variant])
    tuner.run(steps)
    return {"task": task.name, "variant": variant, "seed": seed,
            "val_loss": tuner.evaluate("val")["loss"], "test_loss": tuner.evaluate("test")["loss"],
            "seconds": time.perf_counter() - t0, "rollbacks": tuner.rollbacks}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["digits_mlp", "mnist1d_mlp"])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--variance-steps", type=int, default=100)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    var, runs = [], []
    for name in args.tasks:
        task = hd.tasks.get(name)
        var += variance(task, args.variance_steps)
        for variant in VARIANTS:
            for seed in range(args.seeds):
                runs.append(quality(task, variant, seed, args.steps))
                r = runs[-1]
                print(f"{name:12s} {variant:22s} seed {seed}: val {r['val_loss']:.4f} test "
                      f"{r['test_loss']:.4f} {r['seconds']:.1f} s", flush=True)
    lines = ["# Tangents for many hyperparameters (per-layer lr and weight decay, lr 100x too "
             "small at the start)", "",
             "## uoro against the exact tangent on one trajectory (fixed hyperparameters)", "",
             "| task | samples | median cosine | median relative error |", "|---|---|---|---|"]
    for name in args.tasks:
        for k in sorted({v["samples"] for v in var}):
            sel = [v for v in var if v["task"] == name and v["samples"] == k]
            lines.append(f"| {name} | {k} | {statistics.median(v['cosine'] for v in sel):.3f} | "
                         f"{statistics.median(v['rel_error'] for v in sel):.3f} |")
    lines += ["", f"## OnlineTuner runs ({args.steps} steps, {args.seeds} seeds: medians)", "",
              "| task | tangent | val loss | test loss | seconds |", "|---|---|---|---|---|"]
    for name in args.tasks:
        for variant in VARIANTS:
            sel = [r for r in runs if r["task"] == name and r["variant"] == variant]
            med = {k: statistics.median(r[k] for r in sel)
                   for k in ("val_loss", "test_loss", "seconds")}
            lines.append(f"| {name} | {variant} | {med['val_loss']:.4f} | {med['test_loss']:.4f} "
                         f"| {med['seconds']:.1f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "oho_tangents.json").write_text(json.dumps(
        {"args": vars(args), "variance": var, "runs": runs}, indent=1) + "\n")
    (out / "oho_tangents.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
