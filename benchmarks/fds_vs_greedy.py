"""Non-greedy vs greedy (Micaelli & Storkey 2021, Sec. 5; Wu et al. 2018 short-horizon bias),
and FDS vs hand-made schedules, on mnist1d_mlp.

From one common start (lr 0.01 in Piecewise(5) blocks, momentum 0.5, weight decay 1e-4, bounds
of `fds_space`), per seed: FDS (OfflineTuner, `--meta-steps` whole runs of `--epochs` epochs,
then a retrain of the learned schedule on the training split), the online tuner with
method="greedy" (one-step lookahead) and with method="forward", reset_every=H (horizon H), each
over one run of the same length; test accuracy of the final weights. Hand-made schedules
(constant, step x0.1 at 50% and 75%, cosine; momentum 0.9, no weight decay) each take the
learning rate of a grid with the best mean validation accuracy over the seeds.
Parts "fds_zero" / "fds_common" run FDS alone from the paper's start (all three at 0) / the
common start, each retrained with the last values and with the best meta-step's. Part "online" reruns the two online tuners with a constant learning rate (`--online-K 1`): an
online tuner's trajectory is itself a schedule, while with Piecewise blocks each block starts
again from the initial value when training reaches it.

Run: .venv/bin/python benchmarks/fds_vs_greedy.py [--seeds 5] [--epochs 10] [--meta-steps 10]
Writes benchmarks/results/fds_vs_greedy.json and fds_vs_greedy.png.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

BENCH_ARGS = []
BENCH_QUICK_ARGS = ["--seeds", "1", "--epochs", "1", "--meta-steps", "2", "--lr-grid", "0.1"]
START = {"lr": 0.01, "momentum": 0.5, "weight_decay": 1e-4}


def space(K):
    from hyperdescent.tuners.offline import fds_space
    return fds_space(K=K, **START)


def fds(task, T, seed, meta_steps, K, start=None):
    from fds_common import make_problem

    import hyperdescent as hd
    t0 = time.perf_counter()
    from hyperdescent.tuners.offline import fds_space
    sp = space(K) if start is None else fds_space(K=K, **start)
    off = hd.OfflineTuner(make_problem(task, sp, seed=seed), method="fds", steps=T,
                          meta_steps=meta_steps, seed=seed).run()
    out = off.retrain(steps=T, on="train")
    seconds = time.perf_counter() - t0
    best = off.retrain(steps=T, on="train", values="best")
    return {"method": "fds", "seed": seed, "test_acc": out["test_acc"],
            "test_loss": out["test_loss"], "seconds": seconds,
            "test_acc_best_values": best["test_acc"], "test_loss_best_values": best["test_loss"],
            "best_meta_step": off._best["meta_step"],
            "inner_steps": off.inner_steps + T, "backtracks": off.backtracks,
            "schedule": [r["lr"] for r in off.schedule().values],
            "final": {k: v.tolist() for k, v in off.hparams.items()},
            "val_loss_per_meta_step": [r["val_loss"] for r in off.history]}


def online(task, T, seed, K, method, reset_every):
    from fds_common import make_problem

    import hyperdescent as hd
    t0 = time.perf_counter()
    prob = make_problem(task, space(K), seed=seed)
    tuner = hd.OnlineTuner(prob, method=method, reset_every=reset_every)
    try:
        tuner.run(T)
        ev = tuner.evaluate("test")
    except FloatingPointError:
        ev = {"loss": math.inf, "acc": 0.0}
    label = "greedy" if method == "greedy" else f"forward_reset{reset_every}"
    return {"method": label, "seed": seed, "test_acc": ev["acc"], "test_loss": ev["loss"],
            "seconds": time.perf_counter() - t0, "inner_steps": T,
            "schedule": [float(r["hparams"]["lr"]) for r in tuner.history],
            "final": {k: v.tolist() for k, v in tuner.hparams.items()}}


def hand_lrs(kind, lr, T):
    if kind == "constant":
        return [lr] * T
    if kind == "step":
        return [lr * (0.1 if t >= T // 2 else 1.0) * (0.1 if t >= 3 * T // 4 else 1.0)
                for t in range(T)]
    return [0.5 * lr * (1 + math.cos(math.pi * t / T)) for t in range(T)]


def hand(task, T, seed, kind, lr):
    """Plain training with a fixed per-step learning rate sequence: val and test metrics."""
    from fds_common import make_problem

    import hyperdescent as hd
    sp = hd.Space({"lr": hd.Real(lr, low=0.0, high=10.0, schedule=hd.Piecewise(T))})
    prob = make_problem(task, sp, seed=seed, momentum=0.9)
    values = {"lr": torch.tensor(hand_lrs(kind, lr, T), dtype=prob.dtype)}
    state = prob.init_state()
    for t in range(T):
        state, _ = prob.step(state, prob.train_batch(t), prob.hp_at(values, t, T))
    val = prob.evaluate(state.params, state.buffers, "val")
    test = prob.evaluate(state.params, state.buffers, "test")
    return {"kind": kind, "lr": lr, "seed": seed, "val_acc": val["acc"], "test_acc": test["acc"]}


def summary(runs):
    accs = [r["test_acc"] for r in runs]
    return {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "n": len(accs), "seconds_mean": statistics.mean(r["seconds"] for r in runs)}


def plot(path, results, T):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    colors = {"fds": "C0", "greedy": "C1"}
    for r in results:
        c = colors.get(r["method"], "C2")
        ax.plot(range(len(r["schedule"])), r["schedule"], color=c, alpha=0.6, lw=1.2,
                label=r["method"] if r["seed"] == 0 else None)
    ax.set_xlabel(f"inner step (of {T})")
    ax.set_ylabel("learning rate")
    ax.set_title("learned learning-rate schedules, mnist1d_mlp (one line per seed)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=float, default=10)
    ap.add_argument("--meta-steps", type=int, default=10)
    ap.add_argument("--K", type=int, default=5)
    ap.add_argument("--reset-every", type=int, default=50)
    ap.add_argument("--lr-grid", type=float, nargs="+", default=[0.03, 0.1, 0.3, 1.0])
    ap.add_argument("--parts", nargs="+", default=["tuners", "hand", "online"])
    ap.add_argument("--online-K", type=int, default=1)
    args = ap.parse_args(argv)
    from fds_common import RESULTS, epochs_to_steps, write

    import hyperdescent as hd
    torch.set_num_threads(1)
    task = hd.tasks.get("mnist1d_mlp")
    T = epochs_to_steps(task, args.epochs)
    out = {"task": "mnist1d_mlp", "steps": T, "epochs": args.epochs, "K": args.K,
           "start": START, "meta_steps": args.meta_steps, "seeds": args.seeds}
    if "tuners" in args.parts:
        runs = []
        for s in range(args.seeds):
            for r in (fds(task, T, s, args.meta_steps, args.K),
                      online(task, T, s, args.K, "greedy", None),
                      online(task, T, s, args.K, "forward", args.reset_every)):
                runs.append(r)
                print(f"{r['method']:18s} seed {s}: test_acc {r['test_acc']:.4f} "
                      f"final lr {[round(x, 3) for x in r['final']['lr']]} "
                      f"mom {r['final']['momentum']:.3f} ({r['seconds']:.0f}s)", flush=True)
            out["runs"] = runs
            out["summary"] = {m: summary([r for r in runs if r["method"] == m])
                              for m in dict.fromkeys(r["method"] for r in runs)}
            write("fds_vs_greedy", out)
        plot(RESULTS / "fds_vs_greedy.png", runs, T)
        for m, v in out["summary"].items():
            print(f"{m:18s} test acc {v['mean']:.4f} ± {v['std']:.4f} (n={v['n']})")
    for part, start in (("fds_common", None),  # FDS alone again, from the common start
                        ("fds_zero", {"lr": 0.0, "momentum": 0.0, "weight_decay": 0.0})):
        if part not in args.parts:  # fds_zero: the paper's start, every hyperparameter at 0
            continue
        path = RESULTS / "fds_vs_greedy.json"
        if "runs" not in out and path.exists():
            import json
            out = {**json.loads(path.read_text()), **out}
        runs = []
        for s in range(args.seeds):
            r = fds(task, T, s, args.meta_steps, args.K, start=start)
            runs.append(r)
            print(f"{part} seed {s}: test_acc {r['test_acc']:.4f} (best values "
                  f"{r['test_acc_best_values']:.4f}) final lr "
                  f"{[round(x, 3) for x in r['final']['lr']]} ({r['seconds']:.0f}s)", flush=True)
            best = [{"test_acc": r["test_acc_best_values"], "seconds": r["seconds"]}
                    for r in runs]
            out[part] = {"runs": runs, "summary": summary(runs),
                         "summary_best_values": summary(best)}
            write("fds_vs_greedy", out)
        v, b = out[part]["summary"], out[part]["summary_best_values"]
        print(f"{part}: test acc {v['mean']:.4f} ± {v['std']:.4f}, best values "
              f"{b['mean']:.4f} ± {b['std']:.4f} (n={v['n']})")
    if "online" in args.parts:
        path = RESULTS / "fds_vs_greedy.json"
        if "runs" not in out and path.exists():
            import json
            out = {**json.loads(path.read_text()), **{k: v for k, v in out.items()}}
        runs = []
        for s in range(args.seeds):
            for r in (online(task, T, s, args.online_K, "greedy", None),
                      online(task, T, s, args.online_K, "forward", args.reset_every)):
                runs.append(r)
                print(f"{r['method']:18s} K={args.online_K} seed {s}: test_acc "
                      f"{r['test_acc']:.4f} final lr {r['final']['lr']} ({r['seconds']:.0f}s)",
                      flush=True)
        key = f"online_K{args.online_K}"
        out[key] = {"runs": runs, "summary": {m: summary([r for r in runs if r["method"] == m])
                                              for m in dict.fromkeys(r["method"] for r in runs)}}
        for m, v in out[key]["summary"].items():
            print(f"{m:18s} K={args.online_K} test acc {v['mean']:.4f} ± {v['std']:.4f}")
        write("fds_vs_greedy", out)
        fds_runs = [r for r in out.get("runs", []) if r["method"] == "fds"]
        plot(RESULTS / "fds_vs_greedy.png", fds_runs + runs, T)
    if "hand" in args.parts:
        hand_runs = [hand(task, T, s, kind, lr) for kind in ("constant", "step", "cosine")
                     for lr in args.lr_grid for s in range(args.seeds)]
        best = {}
        for kind in ("constant", "step", "cosine"):
            by_lr = {lr: [r for r in hand_runs if r["kind"] == kind and r["lr"] == lr]
                     for lr in args.lr_grid}
            lr = max(by_lr, key=lambda x: statistics.mean(r["val_acc"] for r in by_lr[x]))
            accs = [r["test_acc"] for r in by_lr[lr]]
            best[kind] = {"lr": lr, "mean": statistics.mean(accs),
                          "std": statistics.stdev(accs) if len(accs) > 1 else 0.0}
            print(f"hand {kind:8s} best lr {lr}: test acc {best[kind]['mean']:.4f} ± "
                  f"{best[kind]['std']:.4f}", flush=True)
        out["hand_runs"], out["hand_best"] = hand_runs, best
        write("fds_vs_greedy", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
