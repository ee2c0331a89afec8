"""STN on MNIST-1D: per-layer dropout and input noise tuned during training (MacKay et al. 2019, Table 1 logic).

Run: .venv/bin/python benchmarks/stn_mnist1d.py [--steps 6000] [--seed 0] [--starts ...]
     .venv/bin/python benchmarks/stn_mnist1d.py --only-overhead   (stn_overhead.json)
Writes benchmarks/results/stn_mnist1d.json and stn_mnist1d.png: STN and Δ-STN runs from each
start, a 7-point fixed-dropout grid, retraining from scratch with each STN schedule against
fixed values at the STN's final ones, and wall time per training step against the plain model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from stn_common import step_time, train_plain, with_dropout

import hyperdescent as hd
from hyperdescent import stn

RESULTS = Path(__file__).parent / "results"
DROPS = ["dropout_in", "dropout_h1", "dropout_h2"]
NAMES = DROPS + ["noise"]
GRID = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7]

BENCH_ARGS = ["--steps", "6000"]
BENCH_QUICK_ARGS = ["--steps", "300", "--starts", "0.3", "--grid", "0.0", "0.3", "--out",
                    "/tmp/hyperdescent_quick/stn_mnist1d.json"]


def space_from(start: float) -> hd.Space:
    """Three dropout rates in (0, 0.9) (stretched sigmoid) and input-noise std in (0, 1.5)."""
    hp = {n: hd.Real(start, low=0.0, high=0.9) for n in DROPS}
    hp["noise"] = hd.Real(start, low=0.0, high=1.5)
    return hd.Space(hp)


def make_trainer(task, start, centred, seed, args):
    """An STNTrainer on the task's MLP with dropout before every Linear layer."""
    space = space_from(start)
    seq = with_dropout(task.make_model(seed), [start] * 3)
    model = stn.from_sequential(seq, space, dropout=DROPS, centred=centred, seed=seed)
    return stn.STNTrainer(model, space, task.train, task.val, task.test,
                          batch_size=task.batch_size, lr=args.lr, momentum=0.9,
                          warmup_steps=args.warmup, train_steps=2, val_steps=1,
                          hyper_lr=args.hyper_lr, tau=args.tau,
                          augment=stn.Augmentation(noise="noise"), seed=seed)


def stn_run(task, start, centred, seed, args):
    tr = make_trainer(task, start, centred, seed, args)
    t0 = time.perf_counter()
    diverged = None
    try:
        tr.run(args.steps)
    except FloatingPointError as e:   # the guard ran out of rollbacks: report, keep going
        diverged = str(e)
    wall = time.perf_counter() - t0
    val, test = tr.evaluate("val"), tr.evaluate("test")
    hist = [{"step": r["step"], **r["hparams"]} for r in tr.history
            if "event" not in r and (r["step"] % 25 == 0 or r["step"] == 1)]
    return tr, {"start": start, "centred": centred, "wall_s": wall, "val_loss": val["loss"],
                "val_acc": val["acc"], "test_loss": test["loss"], "test_acc": test["acc"],
                "final_hparams": tr.hparams, "final_scale": tr.scale, "trajectory": hist,
                "rollbacks": sum(1 for r in tr.history if "event" in r), "diverged": diverged,
                "steps_done": tr.t}


def plain_run(task, values_at, seed, args):
    model = with_dropout(task.make_model(seed), [0.0] * 3)
    aug = stn.Augmentation(noise="noise")
    return train_plain(model, task, args.steps, values_at, DROPS, augment=aug, seed=seed,
                       lr=args.lr, eval_every=max(1, args.steps // 20))


def overhead(task, seed, args):
    """Seconds per weight step: plain model, STN, Δ-STN (interleaved rounds in one process)."""
    plain = with_dropout(task.make_model(seed), [0.3] * 3)
    opt = torch.optim.SGD(plain.parameters(), lr=args.lr, momentum=0.9)
    x, y = task.train[0][:task.batch_size], task.train[1][:task.batch_size]

    def plain_step():
        plain.train()
        loss = torch.nn.functional.cross_entropy(plain(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    trainers = {"stn": make_trainer(task, 0.3, False, seed, args),
                "delta_stn": make_trainer(task, 0.3, True, seed, args)}
    times = {"plain": [], "stn": [], "delta_stn": [], "stn_hyper": []}
    for _ in range(args.overhead_rounds):
        times["plain"] += step_time(plain_step, rounds=1)
        for k, tr in trainers.items():
            times[k] += step_time(tr.train_step, rounds=1)
        times["stn_hyper"] += step_time(trainers["stn"].hyper_step, rounds=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"seconds_per_step_median": med,
            "ratio_stn_train_step": med["stn"] / med["plain"],
            "ratio_delta_stn_train_step": med["delta_stn"] / med["plain"],
            # a cycle of 2 weight steps and 1 hyperparameter step, per weight step
            "ratio_stn_per_weight_step_with_hyper": (2 * med["stn"] + med["stn_hyper"])
            / (2 * med["plain"])}


def plot(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [c for c in (False, True) if any(r["centred"] == c for r in runs)]
    fig, axes = plt.subplots(len(rows), 4, figsize=(15, 3.3 * len(rows)), sharex=True,
                             squeeze=False)
    for row, centred in enumerate(rows):
        for col, name in enumerate(NAMES):
            ax = axes[row, col]
            for r in runs:
                if r["centred"] != centred:
                    continue
                ax.plot([h["step"] for h in r["trajectory"]], [h[name] for h in r["trajectory"]],
                        label=f"start {r['start']}")
            ax.set_title(f"{'Δ-STN' if centred else 'STN'}: {name}")
            ax.set_xlabel("weight step")
    axes[-1, 0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--starts", type=float, nargs="+", default=[0.05, 0.3, 0.5, 0.7])
    ap.add_argument("--grid", type=float, nargs="+", default=GRID)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--hyper-lr", type=float, default=0.01)
    ap.add_argument("--tau", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=235)      # 5 epochs of 47 batches
    ap.add_argument("--variants", nargs="+", default=["stn", "delta_stn"],
                    choices=["stn", "delta_stn"])
    ap.add_argument("--overhead-rounds", type=int, default=15)
    ap.add_argument("--only-overhead", action="store_true",
                    help="measure the step overhead only, into stn_overhead.json")
    ap.add_argument("--out", default=str(RESULTS / "stn_mnist1d.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    task = hd.tasks.get("mnist1d_mlp", seed=args.seed)
    if args.only_overhead:
        res = {"args": vars(args), "torch": torch.__version__, **overhead(task, args.seed, args)}
        path = RESULTS / "stn_overhead.json"
        path.write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1))
        return
    out = {"args": vars(args), "task": "mnist1d_mlp", "torch": torch.__version__}

    runs = []
    for centred in [v == "delta_stn" for v in args.variants]:
        for start in args.starts:
            tr, r = stn_run(task, start, centred, args.seed, args)
            sched = tr.schedule()
            r["retrain_schedule"] = plain_run(task, sched.at, args.seed, args)
            final = dict(tr.hparams)
            r["retrain_fixed_final"] = plain_run(task, lambda t, f=final: f, args.seed, args)
            runs.append(r)
            print(f"{'Δ-STN' if centred else 'STN  '} start {start}: val {r['val_loss']:.4f} "
                  f"test {r['test_loss']:.4f} acc {r['test_acc']:.3f} | retrain sched val "
                  f"{r['retrain_schedule']['val_loss']:.4f} test "
                  f"{r['retrain_schedule']['test_loss']:.4f} | fixed-final val "
                  f"{r['retrain_fixed_final']['val_loss']:.4f} test "
                  f"{r['retrain_fixed_final']['test_loss']:.4f} | "
                  f"{ {k: round(v, 3) for k, v in r['final_hparams'].items()} } "
                  f"{r['wall_s']:.1f}s", flush=True)
    out["stn_runs"] = runs
    grid = []
    for p in args.grid:
        vals = {**{n: p for n in DROPS}, "noise": 0.0}
        g = plain_run(task, lambda t, v=vals: v, args.seed, args)
        grid.append({"dropout": p, **g})
        print(f"fixed dropout {p}: val {g['val_loss']:.4f} (best seen {g['best_val_loss']:.4f}) "
              f"test {g['test_loss']:.4f} acc {g['test_acc']:.3f}", flush=True)
    out["fixed_grid"] = grid
    best = min(grid, key=lambda g: g["val_loss"])
    out["summary"] = {
        "best_fixed": {"dropout": best["dropout"], "val_loss": best["val_loss"],
                       "test_loss": best["test_loss"]},
        **{v: {"val_loss": [r["val_loss"] for r in runs if r["centred"] == c],
               "test_loss": [r["test_loss"] for r in runs if r["centred"] == c],
               "retrain_schedule_test": [r["retrain_schedule"]["test_loss"] for r in runs
                                         if r["centred"] == c],
               "retrain_fixed_final_test": [r["retrain_fixed_final"]["test_loss"] for r in runs
                                            if r["centred"] == c],
               "final_dropout_in": [r["final_hparams"]["dropout_in"] for r in runs
                                    if r["centred"] == c]}
           for v, c in (("stn", False), ("delta_stn", True))}}
    out["overhead"] = overhead(task, args.seed, args)
    print(json.dumps(out["summary"], indent=1))
    print(json.dumps(out["overhead"], indent=1))
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    plot(runs, path.with_suffix(".png"))
    print(path)


if __name__ == "__main__":
    main()
