"""Sharing a hyperparameter over W steps cuts the hypergradient's variance (Micaelli & Storkey
2021, Theorem 4.1: MSE_W <= MSE_1/W + eps^2 (W^2 - 1)/12).

One learning rate per step (Piecewise(T)) on mnist1d_mlp (SGD, momentum 0.9, float32), the
exact per-step hypergradients g[s, t] = dE/dlr_t by reverse mode for `--seeds` seeds (seed =
initialisation and batch order). Sharing lr over windows of W steps makes the window's
hypergradient the sum of its steps' (same trajectory), so FDS's block-mean hypergradient is the
window mean of g. With mu_t the mean over seeds: MSE_1 = mean (g - mu)^2, MSE_W = mean over
seeds and steps of (window mean - mu_t)^2, eps = max_t |mu_{t+1} - mu_t| (measured on mu,
which is itself noisy; also from its 20-step moving average). Also the synthetic check of the paper (T=400, sigma=0.25, eps=0.08).

Run: .venv/bin/python benchmarks/fds_variance.py [--steps 400] [--seeds 20]
Writes benchmarks/results/fds_variance.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

BENCH_ARGS = []
BENCH_QUICK_ARGS = ["--steps", "40", "--seeds", "4"]


def window_stats(g: torch.Tensor, W: int) -> dict:
    """MSE of window means against the per-step mean over seeds; variance over seeds."""
    S, T = g.shape
    mu = g.mean(0)
    n = T // W
    gw = g[:, :n * W].reshape(S, n, W).mean(-1)                 # (S, windows)
    per_step = gw.repeat_interleave(W, dim=1)                   # window mean at every step
    mse = ((per_step - mu[:n * W]) ** 2).mean().item()
    var = gw.var(0, unbiased=False).mean().item()
    return {"W": W, "mse": mse, "var": var}


def theorem_check(g: torch.Tensor, widths, smooth: int = 20) -> dict:
    mu = g.mean(0)
    eps = (mu[1:] - mu[:-1]).abs().max().item()
    # the seeds' mean is itself noisy: eps also from its `smooth`-step moving average
    sm = torch.nn.functional.avg_pool1d(mu[None, None], min(smooth, len(mu)), 1).flatten()
    eps_smooth = (sm[1:] - sm[:-1]).abs().max().item() if len(sm) > 1 else 0.0
    mse1 = ((g - mu) ** 2).mean().item()
    rows = []
    for W in widths:
        r = window_stats(g, W)
        r["bound"] = mse1 / W + eps ** 2 * (W ** 2 - 1) / 12
        r["holds"] = r["mse"] <= r["bound"]
        r["bound_smooth_eps"] = mse1 / W + eps_smooth ** 2 * (W ** 2 - 1) / 12
        r["holds_smooth_eps"] = r["mse"] <= r["bound_smooth_eps"]
        r["var_ratio_to_W1_times_W"] = r["var"] / rows[0]["var"] * W if rows else 1.0
        rows.append(r)
    xs = [math.log(r["W"]) for r in rows]
    ys = [math.log(r["var"]) for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return {"eps": eps, "eps_smooth": eps_smooth, "smooth_steps": smooth, "mse1": mse1,
            "rows": rows, "log_var_vs_log_W_slope": slope}


def synthetic(T=400, sigma=0.25, eps=0.08, seeds=20, widths=(1, 2, 4, 5, 8, 10, 20, 40)):
    """The paper's checker: a mean drifting by eps per step plus Gaussian noise sigma."""
    g0 = torch.Generator().manual_seed(0)
    steps = torch.where(torch.rand(T - 1, generator=g0) < 0.5, -eps, eps)
    mu = torch.cat([torch.zeros(1), steps.cumsum(0)]).double()
    noise = torch.randn(seeds, T, generator=g0, dtype=torch.float64) * sigma
    out = theorem_check(mu + noise, widths)
    out["config"] = {"T": T, "sigma": sigma, "eps": eps, "seeds": seeds}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args(argv)
    from fds_common import make_problem, write

    import hyperdescent as hd
    torch.set_num_threads(1)
    T = args.steps
    task = hd.tasks.get("mnist1d_mlp")
    space = hd.Space({"lr": hd.Real(args.lr, low=0.0, high=1.0, schedule=hd.Piecewise(T))})
    grads, values = [], []
    t0 = time.perf_counter()
    for s in range(args.seeds):
        res = hd.hypergrad(make_problem(task, space, seed=s), T, "reverse")
        grads.append(res.grad["lr"].double())
        values.append(res.value)
        print(f"seed {s}: E={res.value:.4f} |g|={res.grad['lr'].norm():.3g} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
    g = torch.stack(grads)
    widths = [W for W in (1, 2, 4, 5, 8, 10, 16, 20, 25, 40, 50, 80, 100) if T % W == 0]
    real = theorem_check(g, widths)
    for r in real["rows"]:
        print(f"W={r['W']:4d} var={r['var']:.3e} var*W/var1={r['var_ratio_to_W1_times_W']:.2f} "
              f"mse={r['mse']:.3e} bound={r['bound']:.3e} holds={r['holds']} "
              f"bound(smoothed eps)={r['bound_smooth_eps']:.3e} holds={r['holds_smooth_eps']}")
    print(f"eps={real['eps']:.3e} smoothed eps={real['eps_smooth']:.3e} slope of log var vs log W: {real['log_var_vs_log_W_slope']:.2f}")
    syn = synthetic()
    print(f"synthetic: holds for all W: {all(r['holds'] for r in syn['rows'])}, "
          f"slope {syn['log_var_vs_log_W_slope']:.2f}")
    path = write("fds_variance", {
        "task": "mnist1d_mlp", "steps": T, "seeds": args.seeds, "lr": args.lr, "momentum": 0.9,
        "dtype": "float32 (statistics in float64)", "values": values,
        "mean_hypergrad_per_step": g.mean(0).tolist(), "real": real, "synthetic": syn,
        "wall_s": time.perf_counter() - t0})
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
