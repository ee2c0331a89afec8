"""STN vs random search vs TPE at equal wall time: a small CNN on 8x8 digits with dropout and
continuous (noise, translation) and discrete (cutout holes and length) augmentation tuned.

Run: .venv/bin/python benchmarks/stn_digits_cnn.py [--steps 1000] [--seeds 0 1 2]
Each seed: one STN run (Δ-STN parameterisation) of `steps` weight steps, timed; then
hd.blackbox.search with sampler "random" and "tpe" under that wall time as timeout, each trial a
plain training run of the same `steps`. Compares the val and test loss of the STN's final model
with those of the best trial (by val loss). Writes benchmarks/results/stn_digits_cnn.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from stn_common import train_plain
from torch import nn

import hyperdescent as hd
from hyperdescent import stn
from hyperdescent.tasks.base import Task
from hyperdescent.tasks.prep import split_indices

RESULTS = Path(__file__).parent / "results"
DROPS = ["dropout1", "dropout2"]

BENCH_ARGS = ["--steps", "1000"]
BENCH_QUICK_ARGS = ["--steps", "100", "--seeds", "0", "--out", "/tmp/hyperdescent_quick/stn_digits_cnn.json"]


def digits_images(seed: int) -> Task:
    """Digits as 1x8x8 images on [0, 1] (1000/400/397 split by seed, as the digits tasks)."""
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.int64)
    tr, va, te = (torch.as_tensor(i) for i in split_indices(len(y), (1000, 400, 397), seed))
    return Task(name="digits_cnn", make_model=lambda s=seed: cnn(s), train=(x[tr], y[tr]),
                val=(x[va], y[va]), test=(x[te], y[te]), space=hd.Space({}), batch_size=64)


def cnn(seed: int, rates=(0.0, 0.0)) -> nn.Sequential:
    """conv16-conv32-pool-dropout-fc64-dropout-fc10 on 8x8 inputs."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Dropout(rates[0]), nn.Linear(32 * 16, 64), nn.ReLU(),
                         nn.Dropout(rates[1]), nn.Linear(64, 10))


def stn_space() -> hd.Space:
    """Dropout (stretched sigmoid to (0, 0.9)), noise std, translation, cutout holes and length
    declared as Reals (the STN rounds holes and length where cutout applies them)."""
    return hd.Space({"dropout1": hd.Real(0.1, low=0.0, high=0.9),
                     "dropout2": hd.Real(0.1, low=0.0, high=0.9),
                     "noise": hd.Real(0.05, low=0.0, high=1.0),
                     "translate": hd.Real(0.05, low=0.0, high=0.3),
                     "holes": hd.Real(1.0, low=0.0, high=4.0),
                     "length": hd.Real(2.0, low=0.0, high=6.0)})


def blackbox_space() -> hd.Space:
    """The same ranges for black-box search, with holes and length as integers."""
    return hd.Space({"dropout1": hd.Real(0.1, low=0.0, high=0.9),
                     "dropout2": hd.Real(0.1, low=0.0, high=0.9),
                     "noise": hd.Real(0.05, low=0.0, high=1.0),
                     "translate": hd.Real(0.05, low=0.0, high=0.3),
                     "holes": hd.Int(1, 0, 4), "length": hd.Int(2, 0, 6)})


AUG = stn.Augmentation(noise="noise", translate="translate", cutout=("holes", "length"))


def run_stn(task, seed, args):
    space = stn_space()
    model = stn.from_sequential(cnn(seed), space, dropout=DROPS, centred=True, seed=seed)
    tr = stn.STNTrainer(model, space, task.train, task.val, task.test,
                        batch_size=task.batch_size, lr=args.lr, warmup_steps=args.warmup,
                        hyper_lr=args.hyper_lr, tau=args.tau, augment=AUG, seed=seed)
    t0 = time.perf_counter()
    tr.run(args.steps)
    wall = time.perf_counter() - t0
    val, test = tr.evaluate("val"), tr.evaluate("test")
    return {"wall_s": wall, "val_loss": val["loss"], "val_acc": val["acc"],
            "test_loss": test["loss"], "test_acc": test["acc"], "final_hparams": tr.hparams,
            "trajectory": [{"step": r["step"], **r["hparams"]} for r in tr.history
                           if "event" not in r and r["step"] % 50 == 0]}


def run_search(task, seed, sampler, timeout, args):
    trials = []

    def objective(values, trial):
        t0 = time.perf_counter()
        model = cnn(seed, (values["dropout1"], values["dropout2"]))
        r = train_plain(model, task, args.steps, lambda t: values, DROPS, augment=AUG,
                        seed=seed, lr=args.lr)
        trials.append({**r, "params": values, "wall_s": time.perf_counter() - t0})
        return r["val_loss"]

    t0 = time.perf_counter()
    hd.blackbox.search(objective, blackbox_space(), sampler=sampler, n_trials=None,
                       timeout=timeout, seed=seed)
    wall = time.perf_counter() - t0
    best = min(trials, key=lambda r: r["val_loss"])
    return {"wall_s": wall, "n_trials": len(trials), "val_loss": best["val_loss"],
            "val_acc": best["val_acc"], "test_loss": best["test_loss"],
            "test_acc": best["test_acc"], "best_params": best["params"], "trials": trials}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--hyper-lr", type=float, default=0.01)
    ap.add_argument("--tau", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=75)       # 5 epochs of 15 batches
    ap.add_argument("--out", default=str(RESULTS / "stn_digits_cnn.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = {"args": vars(args), "torch": torch.__version__, "seeds": {}}
    for seed in args.seeds:
        task = digits_images(seed)
        s = run_stn(task, seed, args)
        rs = {"stn": s}
        for sampler in ("random", "tpe"):
            rs[sampler] = run_search(task, seed, sampler, s["wall_s"], args)
        out["seeds"][seed] = rs
        print(f"seed {seed}: " + " | ".join(
            f"{k} val {v['val_loss']:.4f} test {v['test_loss']:.4f} acc {v['test_acc']:.3f} "
            f"{v['wall_s']:.1f}s" + (f" ({v['n_trials']} trials)" if "n_trials" in v else "")
            for k, v in rs.items()), flush=True)
        print(f"  STN final {({k: round(v, 3) for k, v in s['final_hparams'].items()})}")
    out["summary"] = {k: {"median_test_loss": statistics.median(
        r[k]["test_loss"] for r in out["seeds"].values()), "median_val_loss": statistics.median(
        r[k]["val_loss"] for r in out["seeds"].values()), "median_test_acc": statistics.median(
        r[k]["test_acc"] for r in out["seeds"].values())} for k in ("stn", "random", "tpe")}
    print(json.dumps(out["summary"], indent=1))
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=float))
    print(path)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
