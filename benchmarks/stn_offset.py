"""Why the non-centred STN drifts on MNIST-1D: feed its hypernetwork λ̃ - λ0 (a constant offset,
the starting point) instead of λ̃ (MacKay et al. 2019) or λ̃ - stopgrad(λ) (Bae & Grosse 2020).

Run: .venv/bin/python benchmarks/stn_offset.py [--steps 6000] [--starts 0.05 0.3]
Same task, model, settings and seeds as stn_mnist1d.py. If only the mean of the hypernetwork input
matters (a large constant input lets the correction act as a second set of general weights, so
its slope in λ is not the response), removing it at the start should remove most of the drift;
if tracking λ matters, only Δ-STN's centring does. Writes benchmarks/results/stn_offset.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from stn_mnist1d import RESULTS, make_trainer

import hyperdescent as hd

BENCH_QUICK_ARGS = ["--steps", "300", "--starts", "0.3", "--out",
                    "/tmp/hyperdescent_quick/stn_offset.json"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--starts", type=float, nargs="+", default=[0.05, 0.3])
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--hyper-lr", type=float, default=0.01)
    ap.add_argument("--tau", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=235)
    ap.add_argument("--out", default=str(RESULTS / "stn_offset.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    task = hd.tasks.get("mnist1d_mlp", seed=args.seed)
    runs = []
    for start in args.starts:
        tr = make_trainer(task, start, False, args.seed, args)
        lam0 = tr.meta.values()["lambda"].clone()
        tr._hnet = lambda raw_tilde, lam, lam0=lam0: raw_tilde - lam0  # the diagnostic's one change
        t0 = time.perf_counter()
        try:
            tr.run(args.steps)
            diverged = None
        except FloatingPointError as e:
            diverged = str(e)
        val, test = tr.evaluate("val"), tr.evaluate("test")
        r = {"start": start, "hnet_input": "lambda_tilde - lambda_0", "val_loss": val["loss"],
             "test_loss": test["loss"], "test_acc": test["acc"], "final_hparams": tr.hparams,
             "wall_s": time.perf_counter() - t0, "diverged": diverged,
             "trajectory": [{"step": h["step"], **h["hparams"]} for h in tr.history
                            if "event" not in h and h["step"] % 250 == 0]}
        runs.append(r)
        print(f"start {start}: val {r['val_loss']:.4f} test {r['test_loss']:.4f} "
              f"{ {k: round(v, 3) for k, v in r['final_hparams'].items()} }", flush=True)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    print(path)


if __name__ == "__main__":
    main()
