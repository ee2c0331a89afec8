"""Pick OfflineTuner(method="fds") defaults by experiment on the bundled tasks.

From the paper's start (learning rate, momentum and weight decay all 0; lr as Piecewise(5))
and its 10 meta-steps, grid the initial learning-rate step size and the clamps (inner gradient
±3 and H·Z ±1 as in the reference code, or none), on digits_mlp and mnist1d_mlp with a horizon of
`--epochs` epochs; each setting's learned schedule is retrained on the training split and
scored on the test split. The momentum / weight-decay step sizes stay the paper's (0.1 / 3e-4).

Run: .venv/bin/python benchmarks/fds_defaults.py [--tasks digits_mlp mnist1d_mlp] [--epochs 10]
Writes benchmarks/results/fds_defaults.json.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch

BENCH_ARGS = []
BENCH_QUICK_ARGS = ["--tasks", "digits_mlp", "--epochs", "2", "--meta-steps", "2",
                    "--lr-steps", "0.1", "--clamps", "off"]


def fds_run(task, epochs, meta_steps, lr_step, clamps, seed=0, lr_high=1.0):
    """One FDS tuning from zero, then a retrain on the training split: test metrics."""
    from fds_common import epochs_to_steps, make_problem

    import hyperdescent as hd
    from hyperdescent.tuners.offline import fds_space
    T = epochs_to_steps(task, epochs)
    prob = make_problem(task, fds_space(K=5, lr_high=lr_high), seed=seed)
    kw = {"clamp_grad": 3.0, "clamp_hz": 1.0} if clamps == "on" else {}
    t0 = time.perf_counter()
    off = hd.OfflineTuner(prob, method="fds", steps=T, meta_steps=meta_steps,
                          meta_lr={"lr": lr_step}, seed=seed, **kw)
    try:
        off.run()
        out = off.retrain(steps=T, on="train", values="last")
        best = off.retrain(steps=T, on="train", values="best")
        out["test_acc_best_values"] = best["test_acc"]
    except FloatingPointError as e:
        out = {"test_loss": float("inf"), "test_acc": 0.0, "error": str(e)}
    return {"task": task.name, "steps": T, "lr_step": lr_step, "clamps": clamps, "seed": seed,
            "lr_high": lr_high, "test_loss": out["test_loss"], "test_acc": out["test_acc"],
            "test_acc_best_values": out.get("test_acc_best_values"),
            "final": {k: (v.tolist()) for k, v in off.hparams.items()},
            "val_loss_per_meta_step": [r["val_loss"] for r in off.history],
            "backtracks": off.backtracks, "seconds": time.perf_counter() - t0}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", nargs="+", default=["digits_mlp", "mnist1d_mlp"])
    ap.add_argument("--epochs", type=float, default=10)
    ap.add_argument("--meta-steps", type=int, default=10)
    ap.add_argument("--lr-steps", type=float, nargs="+", default=[0.03, 0.1])
    ap.add_argument("--clamps", nargs="+", default=["off", "on"])
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--lr-high", type=float, default=1.0, help="upper bound of the learning rate")
    ap.add_argument("--out-name", default="fds_defaults")
    args = ap.parse_args(argv)
    from fds_common import write

    import hyperdescent as hd
    torch.set_num_threads(1)
    runs = []
    for name in args.tasks:
        task = hd.tasks.get(name)
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        for lr_step, clamps, seed in itertools.product(args.lr_steps, args.clamps, seeds):
            r = fds_run(task, args.epochs, args.meta_steps, lr_step, clamps, seed, args.lr_high)
            runs.append(r)
            print(f"{name:12s} lr_step={lr_step:<5} clamps={clamps:3s} seed={seed} "
                  f"test_acc={r['test_acc']:.4f} (best values {r['test_acc_best_values']}) "
                  f"test_loss={r['test_loss']:.4f} "
                  f"lr={[round(x, 3) for x in r['final']['lr']]} "
                  f"mom={r['final']['momentum']:.3f} wd={r['final']['weight_decay']:.2e} "
                  f"({r['seconds']:.0f}s)", flush=True)
    write(args.out_name, {"epochs": args.epochs, "meta_steps": args.meta_steps,
                          "lr_high": args.lr_high,
                          "start": "lr = momentum = weight decay = 0, lr Piecewise(5)",
                          "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
