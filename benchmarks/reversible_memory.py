"""Reversible learning on digits_mlp: buffer size, memory and time (Maclaurin et al. 2015).

Task: `hd.tasks.get("digits_mlp")` (64-128-128-10 ReLU MLP, float32, batch 128), SGD with a fixed
momentum β in {0.9, 0.98}, lr = 0.5·(1-β) (the same effective step for both β) and weight decay
1e-4, both tuned; validation loss on the whole validation split after T steps.

For each (β, T) one fresh process (one thread) runs `hd.hypergrad(method="reversible")` and
reports

* buffer bits per parameter-step (heads included) against the bound log2(1/β), and the bound
  plus the heads' 64 bits a parameter spread over T steps;
* memory: the buffer's bytes, the process's peak RSS above the RSS after setup (ru_maxrss), the
  float32 weights of every step (4·|θ|·T bytes) and `method="reverse"`'s peak in its own fresh
  process (T <= 1000: beyond that it is extrapolated linearly in T, marked "est.");
* time: seconds per step (forward + reverse) divided by one plain torch.optim.SGD step
  (forward, backward, step on the same model and batches) timed in blocks just before and
  after the run in the same process (on each side T/2 steps, at least 250, in blocks of 50;
  the median block), so that the plain steps sample the load over a time comparable to the
  run's and load from other processes hits both alike; `--reps` such interleaved (plain, run,
  plain) repetitions, the median ratio reported.

    python benchmarks/reversible_memory.py                 # T = 100 1000 5000
    python benchmarks/reversible_memory.py --T 100 --quick  # one small cell (*_quick.*)
    python benchmarks/reversible_memory.py --T 1000 --betas 0.9 --quick  # a subset

Writes benchmarks/results/reversible_memory.{json,md} and reversible_bits.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
WD = 1e-4
DENOM = 1 << 16


def lr_for(beta: float) -> float:
    return 0.5 * (1 - beta)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def build(beta: float):
    import torch

    import hyperdescent as hd

    torch.set_num_threads(1)
    task = hd.tasks.get("digits_mlp")
    lr = lr_for(beta)
    space = hd.Space({"lr": hd.Real(lr, low=1e-5, high=2.0, log=True),
                      "weight_decay": hd.Real(WD, low=1e-7, high=1e-1, log=True)})
    problem = hd.Problem(task.make_model(0), optimizer=hd.optim.SGD(momentum=beta), space=space,
                         train=task.train, val=task.val, batch_size=128,
                         val_batch_size=len(task.val[0]))
    return hd, torch, task, problem


class Plain:
    """torch.optim.SGD steps on the task's model and the problem's batches."""

    def __init__(self, torch, task, problem, beta):
        self.torch, self.problem, self.t = torch, problem, 0
        self.net = task.make_model(0)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=lr_for(beta), momentum=beta,
                                   weight_decay=WD)

    def seconds_per_step(self, steps=50, blocks=5) -> tuple[float, float]:
        """(wall, process CPU) seconds per step, medians over blocks."""
        F = self.torch.nn.functional
        walls, cpus = [], []
        for _ in range(blocks):
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                x, y = self.problem.train_batch(self.t)
                self.opt.zero_grad(set_to_none=True)
                F.cross_entropy(self.net(x), y).backward()
                self.opt.step()
                self.t += 1
            walls.append((time.perf_counter() - t0) / steps)
            cpus.append((time.process_time() - c0) / steps)
        return statistics.median(walls), statistics.median(cpus)


def worker(method: str, beta: float, T: int, reps: int = 3) -> dict:
    """One cell in this (fresh) process."""
    hd, torch, task, problem = build(beta)
    plain = Plain(torch, task, problem, beta)
    hd.hypergrad(problem, steps=3, method=method)  # warm-up: lazy imports, allocator
    plain.seconds_per_step(5, 1)
    base = rss_mb()
    walls, cpus, plains, plain_cpus, ratios, cpu_ratios = [], [], [], [], [], []
    for _ in range(reps):  # interleaved: plain, run, plain; ratios per repetition, then medians
        before = plain.seconds_per_step(50, max(5, T // 100))
        t0, c0 = time.perf_counter(), time.process_time()
        res = hd.hypergrad(problem, steps=T, method=method)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        after = plain.seconds_per_step(50, max(5, T // 100))
        walls.append(wall)
        cpus.append(cpu)
        plains.append(statistics.mean([before[0], after[0]]))
        plain_cpus.append(statistics.mean([before[1], after[1]]))
        ratios.append(wall / T / plains[-1])
        cpu_ratios.append(cpu / T / plain_cpus[-1])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    wall, plain_s, plain_cpu = (statistics.median(x) for x in (walls, plains, plain_cpus))
    n_params = sum(p.numel() for p in problem.params0.values())
    out = {"method": method, "beta": beta, "T": T, "params": n_params, "wall_s": wall,
           "reps": reps, "s_per_step": wall / T, "plain_s_per_step": plain_s,
           "ratio_to_plain": statistics.median(ratios), "ratios": ratios,
           "cpu_ratio_to_plain": statistics.median(cpu_ratios), "cpu_ratios": cpu_ratios,
           "plain_cpu_s_per_step": plain_cpu,
           "peak_rss_mb": max(0.0, peak), "value": res.value,
           "grad": {k: float(v) for k, v in res.grad.items()},
           "load_avg": os.getloadavg()[0]}
    if method == "reversible":
        st = res.stats
        out.update(reversal_exact=st["reversal_exact"], bits_per_param_step=st[
            "buffer_bits_per_param_step"], buffer_mb=st["buffer_bits"] / 8 / 2 ** 20,
            momentum_used=st["momentum_used"])
    return out


def spawn(method: str, beta: float, T: int, reps: int = 3, timeout: float = 3600) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, str(beta), str(T), "--reps", str(reps)]
    proc = subprocess.run(cmd, env={**os.environ, **THREAD_ENV}, capture_output=True,
                          text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        return {"method": method, "beta": beta, "T": T, "error": proc.stderr[-800:]}
    return json.loads(lines[-1][len("RESULT "):])


def bound_bits(beta: float) -> float:
    """log2(d/n) for the quantised momentum n/d, and log2(1/β)."""
    n = round(beta * DENOM)
    return math.log2(DENOM / n)


def summarise(records: list[dict]) -> list[dict]:
    rev = {r["T"]: r for r in records if r["method"] == "reverse" and "error" not in r}
    rows = []
    for r in records:
        if r["method"] != "reversible" or "error" in r:
            continue
        T, beta, P = r["T"], r["beta"], r["params"]
        bound = math.log2(1 / beta)
        traj_mb = 4 * P * T / 2 ** 20
        if T in rev:
            rev_mb, est = rev[T]["peak_rss_mb"], False
        elif rev:
            t_ref = max(rev)
            rev_mb, est = rev[t_ref]["peak_rss_mb"] * T / t_ref, True
        else:
            rev_mb, est = math.nan, True
        rev_time = rev[T]["ratio_to_plain"] if T in rev else math.nan
        rev_cpu = rev[T].get("cpu_ratio_to_plain", math.nan) if T in rev else math.nan
        rows.append({
            "beta": beta, "T": T, "reversal_exact": r["reversal_exact"],
            "bits_per_param_step": r["bits_per_param_step"], "bound_log2_1_over_beta": bound,
            "bits_over_bound": r["bits_per_param_step"] / bound,
            "target_bits": 1.1 * bound + 64 / T,
            "buffer_mb": r["buffer_mb"], "peak_rss_mb": r["peak_rss_mb"],
            "float32_trajectory_mb": traj_mb,
            "trajectory_over_buffer": traj_mb / r["buffer_mb"],
            "reverse_peak_mb": rev_mb, "reverse_peak_estimated": est,
            "reverse_over_reversible_peak": rev_mb / max(r["peak_rss_mb"], 1e-9),
            "ratio_to_plain": r["ratio_to_plain"], "reverse_ratio_to_plain": rev_time,
            "cpu_ratio_to_plain": r.get("cpu_ratio_to_plain", math.nan),
            "reverse_cpu_ratio_to_plain": rev_cpu,
            "plain_ms": r["plain_s_per_step"] * 1e3, "load_avg": r["load_avg"]})
    return rows


def markdown(rows: list[dict], records: list[dict], meta: dict) -> str:
    lines = [
        "# Reversible learning on digits_mlp: buffer, memory, time",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Generated {meta['date']} on {meta['machine']}; torch {meta['torch']}; one thread per "
        f"process; total {meta['total_min']:.1f} min. The machine was shared with other jobs "
        f"(1-min load average in the last column): times are ratios to a plain step measured "
        f"in the same process just before and after each run, the median over "
        f"{meta.get('reps', 1)} interleaved repetitions.",
        "",
        "digits_mlp (64-128-128-10 ReLU, 26,122 weights, float32, batch 128), SGD with fixed "
        "momentum β (used as n/65536), lr = 0.5·(1-β), weight_decay = 1e-4; lr and weight decay "
        "tuned. Bits: every bit the buffer holds after the forward pass (the 64-bit heads "
        "included) ÷ (weights × T); bound: log2(1/β); target: 1.1 × bound + 64/T. float32 "
        "trajectory: 4 bytes × weights × T. Peak: ru_maxrss − RSS after setup in a fresh "
        "process; reverse at T > 1000 is extrapolated linearly from T = 1000 (est.).",
        "",
        "| β | T | exact | bits/param-step | bound | target | float32 traj / buffer | "
        "buffer MB | peak MB | reverse peak MB | reverse / reversible peak | time / plain step "
        "| reverse time / plain | CPU time / plain (reverse) | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        est = " (est.)" if r["reverse_peak_estimated"] else ""
        lines.append(
            f"| {r['beta']} | {r['T']} | {r['reversal_exact']} | {r['bits_per_param_step']:.4f} "
            f"| {r['bound_log2_1_over_beta']:.4f} | {r['target_bits']:.4f} | "
            f"{r['trajectory_over_buffer']:.0f}× | {r['buffer_mb']:.3f} | "
            f"{r['peak_rss_mb']:.1f} | {r['reverse_peak_mb']:.0f}{est} | "
            f"{r['reverse_over_reversible_peak']:.0f}× | {r['ratio_to_plain']:.2f}× | "
            f"{r['reverse_ratio_to_plain']:.2f}× | {r['cpu_ratio_to_plain']:.2f}× "
            f"({r['reverse_cpu_ratio_to_plain']:.2f}×) | {r['load_avg']:.1f} |")
    errors = [r for r in records if "error" in r]
    if errors:
        lines += ["", "Failed cells:", ""]
        lines += [f"- {r['method']} β={r['beta']} T={r['T']}: `{r['error'][-200:]}`"
                  for r in errors]
    lines += ["", "Plot: `reversible_bits.png` (bits per parameter-step against T, with the "
              "bound and the bound plus the heads).", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for beta, color in ((0.9, "C0"), (0.98, "C1")):
        rs = sorted((r for r in rows if r["beta"] == beta), key=lambda r: r["T"])
        if not rs:
            continue
        ts = [r["T"] for r in rs]
        ax.plot(ts, [r["bits_per_param_step"] for r in rs], "o-", color=color,
                label=f"buffer, β={beta}")
        grid = [ts[0] * (ts[-1] / ts[0]) ** (i / 50) for i in range(51)] if len(ts) > 1 else ts
        b = math.log2(1 / beta)
        ax.plot(grid, [b + 64 / t for t in grid], ":", color=color,
                label=f"log2(1/β) + 64/T, β={beta}")
        ax.axhline(b, color=color, ls="--", lw=0.8, label=f"log2(1/β) = {b:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("T (inner steps)")
    ax.set_ylabel("buffer bits per parameter-step")
    ax.set_title("Reversible learning on digits_mlp: information buffer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, nargs="+", default=[100, 1000, 5000])
    ap.add_argument("--betas", type=float, nargs="+", default=[0.9, 0.98])
    ap.add_argument("--reverse-max-T", type=int, default=1000)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions a cell")
    ap.add_argument("--worker", nargs=3, metavar=("METHOD", "BETA", "T"))
    args = ap.parse_args(argv)
    if args.worker:
        method, beta, T = args.worker
        print("RESULT " + json.dumps(worker(method, float(beta), int(T), args.reps)), flush=True)
        return
    t0 = time.time()
    records = []
    for T in args.T:
        if T <= args.reverse_max_T:
            records.append(spawn("reverse", args.betas[0], T, args.reps))
            print(json.dumps(records[-1])[:300], flush=True)
        for beta in args.betas:
            records.append(spawn("reversible", beta, T, args.reps))
            print(json.dumps(records[-1])[:300], flush=True)
    rows = summarise(records)
    import torch

    meta = {"command": "python benchmarks/reversible_memory.py " + " ".join(
        sys.argv[1:] if argv is None else argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "torch": torch.__version__, "total_min": (time.time() - t0) / 60, "reps": args.reps}
    stem = "reversible_memory_quick" if args.quick else "reversible_memory"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows,
                                                      "records": records}, indent=1))
    (RESULTS / f"{stem}.md").write_text(markdown(rows, records, meta))
    if not args.quick:
        plot(rows, RESULTS / "reversible_bits.png")
    print((RESULTS / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
