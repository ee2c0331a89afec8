"""What a hypergradient costs: time per inner step and peak memory, ours vs torchopt and higher.

Task: scikit-learn digits (inputs / 16), a 64-128-128-10 ReLU MLP, batch 128, float32, SGD with
momentum 0.9, lr = 0.05 and weight_decay = 1e-4 as the hyperparameters; validation loss on
the whole held-out split after T inner steps.

For each T and each method (hyperdescent: reverse, reverse with checkpoint_every=round(sqrt(T)),
truncated(window=10), forward, greedy, implicit(neumann, terms=20); torchopt and higher: reverse
through the same unroll; torchopt: implicit with a 20-term Neumann series) the script reports

* seconds per inner step divided by one plain `torch.optim.SGD` step (forward, backward, step on
  the same model and batches), both measured in the same process;
* peak memory: every (impl, method, T) runs in a fresh subprocess, and the peak is
  `ru_maxrss` at the end minus the RSS after setup (data, model, a warm-up call), because the
  RSS sampled inside one long-lived process is not reliable on CPU.

Timing runs on one thread (OMP_NUM_THREADS=MKL_NUM_THREADS=1 and torch.set_num_threads(1)),
with time.perf_counter, median of 3 repetitions for T <= 1000 (one for larger T).

    python benchmarks/hypergrad_cost.py                 # T = 10 100 1000
    python benchmarks/hypergrad_cost.py --T 10 100
    python benchmarks/hypergrad_cost.py --quick         # T = 10, one repetition (*_quick.*)
    python benchmarks/hypergrad_cost.py --profile forward --T 100   # where the time goes

Writes benchmarks/results/hypergrad_cost.json and benchmarks/results/hypergrad_cost.md
(hypergrad_cost_quick.* with --quick).
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

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LR, WD, MOMENTUM, BATCH = 0.05, 1e-4, 0.9, 128
HD_METHODS = ["reverse", "reverse_ckpt", "truncated", "forward", "forward_compiled", "greedy",
              "implicit"]
PEER_METHODS = {"torchopt": ["reverse", "implicit"], "higher": ["reverse"]}
MEMORY_LIMIT_MB = 8000.0
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------------------------
# the task (imported lazily so that the orchestrating process stays light)
# ----------------------------------------------------------------------------------------------
def _torch():
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    return torch


def load_digits_split():
    """Digits as float32 tensors, inputs / 16; a fixed split: 1297 train, 500 validation."""
    import numpy as np
    from sklearn.datasets import load_digits

    torch = _torch()
    d = load_digits()
    perm = np.random.default_rng(0).permutation(len(d.target))
    x = torch.tensor(d.data[perm] / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target[perm], dtype=torch.int64)
    return (x[:1297], y[:1297]), (x[1297:], y[1297:])


def make_model():
    """64-128-128-10 ReLU MLP, the same initial weights in every process (seed 0)."""
    torch = _torch()
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 10))


def make_problem(train, val, wd_only: bool = False, hd=None):
    """The hyperdescent problem; its replayable batches are the batches every impl uses.
    `hd` is the package to build it with (default `hyperdescent`; ab_reverse.py passes an
    older revision's)."""
    import torch.nn.functional as F

    if hd is None:
        import hyperdescent as hd

    space = {"weight_decay": hd.Real(WD, low=1e-7, high=1e-1, log=True)}
    if not wd_only:
        space = {"lr": hd.Real(LR, low=1e-5, high=2, log=True), **space}
    return hd.Problem(make_model(), loss=F.cross_entropy,
                      optimizer=hd.optim.SGD(lr=LR, momentum=MOMENTUM, weight_decay=WD),
                      space=hd.Space(space), train=train, val=val, batch_size=BATCH,
                      val_batch_size=len(val[0]), seed=0)


# ----------------------------------------------------------------------------------------------
# measured functions: each returns (grads {name: float}, timing extras)
# ----------------------------------------------------------------------------------------------
class Clock:
    """Wall (time.perf_counter) and process CPU time (time.process_time) since creation."""

    def __init__(self):
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall0, time.process_time() - self.cpu0


class PlainSGD:
    """The reference: plain torch.optim.SGD steps (forward + backward + step), same batches;
    compiled=True runs the model through torch.compile (the like-for-like baseline of a
    compiled method)."""

    def __init__(self, problem, compiled: bool = False):
        torch = _torch()
        self.problem, self.t = problem, 0
        self.net = make_model()
        if compiled:
            self.net = torch.compile(self.net)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=LR, momentum=MOMENTUM,
                                   weight_decay=WD)

    def steps(self, n: int) -> None:
        import torch.nn.functional as F

        for _ in range(n):
            x, y = self.problem.train_batch(self.t)
            self.opt.zero_grad(set_to_none=True)
            F.cross_entropy(self.net(x), y).backward()
            self.opt.step()
            self.t += 1

    def time_step(self, steps: int = 20, blocks: int = 3) -> tuple[float, float]:
        """(wall, cpu) seconds per step: the median over `blocks` blocks of `steps` steps."""
        walls, cpus = [], []
        for _ in range(blocks):
            clock = Clock()
            self.steps(steps)
            w, c = clock.read()
            walls.append(w / steps)
            cpus.append(c / steps)
        return statistics.median(walls), statistics.median(cpus)


def run_hyperdescent(problem, method: str, T: int) -> tuple[dict, dict]:
    import importlib

    import hyperdescent as hd

    # the module, not the function of the same name that hyperdescent.hypergrad re-exports
    implicit_module = importlib.import_module("hyperdescent.hypergrad.implicit")

    extra: dict = {}
    if method == "forward_compiled":
        res = hd.hypergrad(problem, steps=T, method="forward", compile=True)
    elif method == "reverse_ckpt":
        res = hd.hypergrad(problem, steps=T, method="reverse",
                           checkpoint_every=max(1, round(math.sqrt(T))))
    elif method == "truncated":
        res = hd.hypergrad(problem, steps=T, method="truncated", window=10)
    elif method == "implicit":
        # time the T no-graph inner steps apart from the IFT solve: wrap the module's run_plain
        inner = implicit_module.run_plain
        spent = []

        def timed_run_plain(*args, **kwargs):
            clock = Clock()
            out = inner(*args, **kwargs)
            spent.append(clock.read())
            return out

        implicit_module.run_plain = timed_run_plain
        try:
            res = hd.hypergrad(problem, steps=T, method="implicit", solver="neumann", terms=20)
        finally:
            implicit_module.run_plain = inner
        extra["inner"] = tuple(map(sum, zip(*spent)))  # (wall, cpu)
    else:
        res = hd.hypergrad(problem, steps=T, method=method)
    grads = {k: float(v) for k, v in res.grad.items()}
    extra.update(value=res.value, hvps=res.stats.get("hvps"),
                 stats_wall_time_s=res.stats.get("wall_time_s"))
    return grads, extra


def _l2(params, wd):
    return 0.5 * wd * sum((p * p).sum() for p in params)


def run_torchopt_reverse(problem, T: int) -> tuple[dict, dict]:
    """torchopt.MetaSGD through the unroll; lr a tensor, wd as a 0.5*wd*||θ||² loss term."""
    import torch.nn.functional as F
    import torchopt

    torch = _torch()
    net = make_model()
    lr = torch.tensor(LR, requires_grad=True)
    wd = torch.tensor(WD, requires_grad=True)
    opt = torchopt.MetaSGD(net, lr=lr, momentum=MOMENTUM, moment_requires_grad=True)
    for t in range(T):
        x, y = problem.train_batch(t)
        opt.step(F.cross_entropy(net(x), y) + _l2(net.parameters(), wd))
    xv, yv = problem.val_batch(T)
    value = F.cross_entropy(net(xv), yv)
    g_lr, g_wd = torch.autograd.grad(value, [lr, wd])
    return {"lr": float(g_lr), "weight_decay": float(g_wd)}, {"value": value.item()}


def run_higher_reverse(problem, T: int) -> tuple[dict, dict]:
    """higher.innerloop_ctx over torch.optim.SGD, lr and weight_decay overridden by tensors."""
    import higher
    import torch.nn.functional as F

    torch = _torch()
    net = make_model()
    lr = torch.tensor(LR, requires_grad=True)
    wd = torch.tensor(WD, requires_grad=True)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    with higher.innerloop_ctx(net, opt, copy_initial_weights=True,
                              override={"lr": [lr], "weight_decay": [wd]}) as (fnet, diffopt):
        for t in range(T):
            x, y = problem.train_batch(t)
            diffopt.step(F.cross_entropy(fnet(x), y))
        xv, yv = problem.val_batch(T)
        value = F.cross_entropy(fnet(xv), yv)
        g_lr, g_wd = torch.autograd.grad(value, [lr, wd])
    return {"lr": float(g_lr), "weight_decay": float(g_wd)}, {"value": value.item()}


def run_torchopt_implicit(problem, T: int, terms: int = 20) -> tuple[dict, dict]:
    """torchopt.diff.implicit.custom_root, F(θ, wd) = ∇L(θ; batch T-1) + wd·θ, Neumann solve.

    The inner solver is T plain torch.optim.SGD steps; the linear solve is
    torchopt.linear_solve.solve_inv(ns=True, maxiter=terms, alpha=lr), the same truncated
    series as hyperdescent's solver="neumann" (alpha = lr).
    """
    import torch.nn.functional as F
    import torchopt
    from torch.func import functional_call

    torch = _torch()
    net = make_model()
    names = [n for n, _ in net.named_parameters()]
    x_last, y_last = problem.train_batch(T - 1)
    hvps = [0]

    def optimality(params, wd):
        def train_loss(p):
            return F.cross_entropy(functional_call(net, dict(zip(names, p)), (x_last,)), y_last)

        g = torch.func.grad(train_loss)(params)
        return tuple(gi + wd * pi for gi, pi in zip(g, params))

    neumann = torchopt.linear_solve.solve_inv(ns=True, maxiter=terms, alpha=LR)

    def counting_solve(matvec, b):
        def mv(u):
            hvps[0] += 1
            return matvec(u)

        return neumann(mv, b)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=counting_solve)
    def solve_inner(params, wd):
        inner = make_model()
        with torch.no_grad():
            for p, p0 in zip(inner.parameters(), params):
                p.copy_(p0)
        opt = torch.optim.SGD(inner.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=float(wd))
        with torch.enable_grad():  # custom_root runs the solver inside autograd's no-grad forward
            for t in range(T):
                x, y = problem.train_batch(t)
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(inner(x), y).backward()
                opt.step()
        return tuple(p.detach().clone() for p in inner.parameters())

    wd = torch.tensor(WD, requires_grad=True)
    params0 = tuple(p.detach().clone() for p in net.parameters())
    clock = Clock()
    theta = solve_inner(params0, wd)
    inner = clock.read()
    xv, yv = problem.val_batch(T)
    value = F.cross_entropy(functional_call(net, dict(zip(names, theta)), (xv,)), yv)
    (g_wd,) = torch.autograd.grad(value, [wd])
    return {"weight_decay": float(g_wd)}, {"value": value.item(), "inner": inner,
                                           "hvps": hvps[0]}


def run_impl(problem, impl: str, method: str, T: int) -> tuple[dict, dict]:
    if impl == "hyperdescent":
        return run_hyperdescent(problem, method, T)
    if (impl, method) == ("torchopt", "reverse"):
        return run_torchopt_reverse(problem, T)
    if (impl, method) == ("torchopt", "implicit"):
        return run_torchopt_implicit(problem, T)
    if (impl, method) == ("higher", "reverse"):
        return run_higher_reverse(problem, T)
    raise ValueError(f"no benchmark for impl={impl!r} method={method!r}")


# ----------------------------------------------------------------------------------------------
# one (impl, method, T) in a fresh process
# ----------------------------------------------------------------------------------------------
def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def worker(job: dict) -> dict:
    """Setup, warm-up, baseline RSS, then repetitions each flanked by plain-step timings.

    Per repetition the ratio is (method time / T) / (plain step time), the plain step being
    the mean of the medians of 3 blocks of plain steps just before and just after it, so that
    load from other processes on the machine hits both alike; the reported ratio is the median
    over repetitions. Wall (perf_counter) and process CPU time (process_time) are both kept.
    """
    import gc

    torch = _torch()
    impl, method, T, reps = job["impl"], job["method"], job["T"], job["reps"]
    block = job.get("plain_steps", 20)
    train, val = load_digits_split()
    problem = make_problem(train, val, wd_only=(method == "implicit"))
    plain = PlainSGD(problem)
    plain.steps(5)  # warm-up
    compiled_plain = None
    if method.endswith("_compiled"):
        compiled_plain = PlainSGD(problem, compiled=True)
        compiled_plain.steps(5)  # compiles the model's forward and backward
    clock = Clock()
    # warm-up: lazy initialisation, code paths, and torch.compile's compilation
    run_impl(problem, impl, method, min(T, 2))
    warmup_s = clock.read()[0]
    gc.collect()
    base_rss, setup_max = rss_mb(), maxrss_mb()
    load0 = os.getloadavg()[0]
    runs = []
    for _ in range(reps):
        before = plain.time_step(block)
        clock = Clock()
        grads, extra = run_impl(problem, impl, method, T)
        wall, cpu = clock.read()
        after = plain.time_step(block)
        pw, pc = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
        iw, ic = extra.get("inner", (wall, cpu))  # implicit: the T inner steps only
        runs.append({"wall_s": wall, "cpu_s": cpu, "plain_step_s": pw, "plain_step_cpu_s": pc,
                     "ratio": iw / T / pw, "cpu_ratio": ic / T / pc,
                     "inner_s": iw, "ift_solve_s": wall - iw, "ift_solve_cpu_s": cpu - ic})
        if compiled_plain is not None:
            cw = compiled_plain.time_step(block)[0]
            runs[-1].update(plain_compiled_step_s=cw, ratio_to_compiled=iw / T / cw)
    peak_max = maxrss_mb()

    def med(key):
        return statistics.median(r[key] for r in runs)

    rec = {"impl": impl, "method": method, "T": T, "reps": reps,
           "ratio_to_plain_step": med("ratio"), "cpu_ratio_to_plain_step": med("cpu_ratio"),
           "seconds_per_step": med("inner_s") / T, "wall_s": med("wall_s"),
           "plain_step_s": med("plain_step_s"), "plain_step_cpu_s": med("plain_step_cpu_s"),
           "peak_memory_mb": max(0.0, peak_max - base_rss), "hvps": extra.get("hvps"),
           "grad": grads, "value": extra.get("value"), "runs": runs,
           "baseline_rss_mb": base_rss, "maxrss_mb": peak_max,
           "peak_not_above_setup": peak_max <= setup_max,
           "loadavg_1min": [load0, os.getloadavg()[0]], "torch_threads": torch.get_num_threads()}
    rec["warmup_s"] = warmup_s
    if compiled_plain is not None:
        rec.update(plain_compiled_step_s=med("plain_compiled_step_s"),
                   ratio_to_compiled_plain_step=med("ratio_to_compiled"))
    if "inner" in extra:  # implicit: the T inner steps apart from the IFT solve
        rec.update(ift_solve_s=med("ift_solve_s"),
                   ift_solve_plain_steps=med("ift_solve_s") / rec["plain_step_s"],
                   ift_solve_cpu_plain_steps=med("ift_solve_cpu_s") / rec["plain_step_cpu_s"])
    return rec


def correctness(T: int = 10) -> dict:
    """Our hypergradients vs torchopt's and higher's on the same T-step unroll (float32)."""
    train, val = load_digits_split()
    problem = make_problem(train, val)
    ours = {m: run_hyperdescent(problem, m, T)[0]
            for m in ("reverse", "reverse_ckpt", "forward", "forward_compiled", "truncated")}
    peers = {}
    for impl, fn in (("torchopt", run_torchopt_reverse), ("higher", run_higher_reverse)):
        try:
            peers[impl] = fn(problem, T)[0]
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            peers[impl] = {"error": f"{type(e).__name__}: {e}"}
    ref = ours["reverse"]
    out = {"T": T, "hyperdescent_reverse": ref, "rel_err_vs_hyperdescent_reverse": {}}

    def rel(a, b):
        return abs(a - b) / max(abs(b), 1e-30)

    for name, g in [*((f"hyperdescent_{m}", v) for m, v in ours.items() if m != "reverse"),
                    *((f"{k}_reverse", v) for k, v in peers.items())]:
        out["rel_err_vs_hyperdescent_reverse"][name] = (
            g if "error" in g else {k: rel(g[k], ref[k]) for k in ref})
        out[name] = g
    wd_problem = make_problem(train, val, wd_only=True)
    ours_imp = run_hyperdescent(wd_problem, "implicit", T)[0]
    try:
        peer_imp = run_torchopt_implicit(wd_problem, T)[0]
        out["implicit"] = {"hyperdescent": ours_imp, "torchopt": peer_imp,
                           "rel_err": rel(peer_imp["weight_decay"], ours_imp["weight_decay"])}
    except Exception as e:  # noqa: BLE001
        out["implicit"] = {"hyperdescent": ours_imp, "torchopt": f"{type(e).__name__}: {e}"}
    return out


def head_to_head(T: int, reps: int) -> dict:
    """Ours vs the peers timed in one process, run after run in turn (same machine state).

    The per-record table times each implementation in its own process; when the machine's
    speed drifts between those processes, their ratio drifts with it. Here every repetition
    runs hyperdescent, torchopt and higher back to back on the same unroll (and the two
    implicit solves), and the ratios are of the medians.
    """
    _torch()
    train, val = load_digits_split()
    problem = make_problem(train, val)
    wd_problem = make_problem(train, val, wd_only=True)
    runners = {"hyperdescent": lambda: run_hyperdescent(problem, "reverse", T),
               "torchopt": lambda: run_torchopt_reverse(problem, T),
               "higher": lambda: run_higher_reverse(problem, T)}
    solves = {"hyperdescent": lambda: run_hyperdescent(wd_problem, "implicit", T)[1],
              "torchopt": lambda: run_torchopt_implicit(wd_problem, T)[1]}
    for fn in runners.values():  # warm-up
        fn()
    times = {k: [] for k in runners}
    solve_times = {k: [] for k in solves}
    for _ in range(reps):
        for name, fn in runners.items():
            clock = Clock()
            fn()
            times[name].append(clock.read()[0] / T)
        for name, fn in solves.items():
            clock = Clock()
            extra = fn()
            wall = clock.read()[0]
            solve_times[name].append(wall - extra["inner"][0])  # minus the T inner steps
    med = {k: statistics.median(v) for k, v in times.items()}
    smed = {k: statistics.median(v) for k, v in solve_times.items()}
    return {"T": T, "reps": reps, "reverse_s_per_step": med, "ift_solve_s": smed,
            "reverse_vs_torchopt": med["hyperdescent"] / med["torchopt"],
            "reverse_vs_higher": med["hyperdescent"] / med["higher"],
            "ift_solve_vs_torchopt": smed["hyperdescent"] / smed["torchopt"]}


def profile(method: str, T: int, verbose: bool = True) -> dict:
    """cProfile (and, verbose, torch.profiler) of one hyperdescent method at horizon T.

    Returns the per-step cost and the functions with the most own time, per inner step.
    """
    import cProfile
    import pstats

    _torch()
    train, val = load_digits_split()
    problem = make_problem(train, val, wd_only=(method == "implicit"))
    plain = PlainSGD(problem)
    plain.steps(5)
    plain_s = plain.time_step(50)[0]
    run_hyperdescent(problem, method, 2)
    t0 = time.perf_counter()
    run_hyperdescent(problem, method, T)
    wall = time.perf_counter() - t0
    prof = cProfile.Profile()
    prof.enable()
    run_hyperdescent(problem, method, T)
    prof.disable()
    stats = pstats.Stats(prof)
    total = stats.total_tt
    def rows(key: int, n: int, keep=lambda file, cum: True) -> list[dict]:
        items = sorted(stats.stats.items(), key=lambda kv: kv[1][key], reverse=True)
        out = []
        for (file, line, func), (_cc, ncalls, tottime, cumtime, _callers) in items:
            if not keep(file, cumtime):
                continue
            where = file if file == "~" else f"{Path(file).name}:{line}"
            out.append({"function": f"{func} ({where})", "calls_per_step": ncalls / T,
                        "own_ms_per_step": tottime / T * 1e3,
                        "cum_ms_per_step": cumtime / T * 1e3,
                        "share": (tottime if key == 2 else cumtime) / total})
            if len(out) == n:
                break
        return out

    # hyperdescent's own functions and autograd calls below the per-step entry point
    def inside(file, cum):
        return ("hyperdescent" in file or "autograd" in file) and cum < 0.9 * total

    out = {"method": method, "T": T, "ms_per_step": wall / T * 1e3,
           "plain_step_ms": plain_s * 1e3, "ratio": wall / T / plain_s,
           "profiled_ms_per_step": total / T * 1e3, "top_own_time": rows(2, 10),
           "top_cumulative": rows(3, 10, inside)}
    if verbose:
        print(f"{method} T={T}: {wall / T * 1e3:.2f} ms/step, plain step {plain_s * 1e3:.3f} ms "
              f"-> ratio {wall / T / plain_s:.1f}")
        stats.sort_stats("cumulative").print_stats(30)
        stats.sort_stats("tottime").print_stats(20)
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as tprofile

        with tprofile(activities=[ProfilerActivity.CPU]) as tp:
            run_hyperdescent(problem, method, T)
        print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return out


# ----------------------------------------------------------------------------------------------
# orchestration
# ----------------------------------------------------------------------------------------------
def spawn(payload: dict, timeout: float) -> dict:
    env = {**os.environ, **THREAD_ENV}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(payload)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1][len("RESULT "):])


def peer_status() -> dict:
    """Installed peer versions, or why a peer cannot run."""
    code = ("import importlib, importlib.metadata, json; out = {}\n"
            "for m in ('torchopt', 'higher'):\n"
            "    try:\n"
            "        importlib.import_module(m); out[m] = importlib.metadata.version(m)\n"
            "    except Exception as e:\n"
            "        out[m] = 'unavailable: %s: %s' % (type(e).__name__, e)\n"
            "import torch; out['torch'] = torch.__version__; print(json.dumps(out))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **THREAD_ENV})
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"torchopt": "unavailable: " + proc.stderr[-200:], "higher": "unavailable"}


def notes_for(impl: str, method: str, T: int) -> str:
    if impl == "hyperdescent":
        return {"reverse": "",
                "reverse_ckpt": f"checkpoint_every={max(1, round(math.sqrt(T)))}",
                "truncated": "window=10" + (" (= reverse at T<=10)" if T <= 10 else ""),
                "forward": "2 tangent columns (lr, wd)",
                "forward_compiled": "forward, compile=True; compilation apart (warmup_s)",
                "greedy": "T-1 plain steps + 1 differentiated step",
                "implicit": "wd only (lr fixed); neumann terms=20, alpha=lr; "
                            "ratio = the T inner steps, IFT solve reported apart"}[method]
    if method == "implicit":
        return ("wd only; custom_root + solve_inv(ns=True, maxiter=20, alpha=lr); inner solver = "
                "T torch.optim.SGD steps; ratio = inner steps, IFT solve reported apart")
    if impl == "torchopt":
        return "MetaSGD, lr as a tensor; wd as a 0.5*wd*||θ||² loss term (torchopt wd is a float)"
    return "innerloop_ctx, override lr and weight_decay with tensors"


def run_all(Ts: list[int], reps_small: int, quick: bool, timeout: float,
            impls: list[str]) -> dict:
    versions = peer_status()
    jobs = [("hyperdescent", m) for m in HD_METHODS]
    for peer, methods in PEER_METHODS.items():
        if peer in impls:
            jobs += [(peer, m) for m in methods]
    jobs = [j for j in jobs if j[0] in impls]
    records: list[dict] = []
    t_start = time.perf_counter()
    for T in sorted(Ts):
        reps = reps_small if T <= 1000 else 1
        for impl, method in jobs:
            rec = {"impl": impl, "method": method, "T": T, "notes": notes_for(impl, method, T)}
            if impl != "hyperdescent" and str(versions.get(impl, "")).startswith("unavailable"):
                rec.update(skipped=True, notes=f"{impl} {versions[impl]}")
                records.append(rec)
                continue
            est = estimate_memory(records, impl, method, T)
            if est is not None:
                rec["notes"] = (rec["notes"] + "; " if rec["notes"] else "") + (
                    f"est. peak {est:.0f} MB from the smaller T "
                    f"({'>' if est > MEMORY_LIMIT_MB else '<='} {MEMORY_LIMIT_MB:.0f} MB limit)")
            if est is not None and est > MEMORY_LIMIT_MB:
                rec.update(skipped=True, estimated_peak_memory_mb=est,
                           notes=f"skipped: estimated {est:.0f} MB > {MEMORY_LIMIT_MB:.0f} MB")
                records.append(rec)
                continue
            payload = {"impl": impl, "method": method, "T": T, "reps": reps,
                       "plain_steps": 10 if quick else 20}
            t0 = time.perf_counter()
            out = spawn(payload, timeout)
            if "error" in out:
                rec.update(skipped=True, notes=f"{rec['notes']}; failed: {out['error']}")
            else:
                rec = {**out, "notes": rec["notes"]}
                if est is not None:
                    rec["estimated_peak_memory_mb"] = est
                if rec.get("peak_not_above_setup"):
                    rec["notes"] += "; peak within setup's RSS (memory is an upper bound)"
                if method.endswith("_compiled"):
                    rec["notes"] += (f"; compiled in {rec['warmup_s']:.0f} s; "
                                     f"{rec['ratio_to_compiled_plain_step']:.2f}x a plain step "
                                     f"with the model compiled")
                if method == "implicit":
                    rec["notes"] += (f"; IFT solve {rec['ift_solve_s'] * 1e3:.1f} ms = "
                                     f"{rec['ift_solve_plain_steps']:.1f} plain steps")
            records.append(rec)
            status = ("skipped: " + rec["notes"]) if rec.get("skipped") else (
                f"{rec['ratio_to_plain_step']:.2f}x plain (cpu {rec['cpu_ratio_to_plain_step']:.2f}x)"
                f", {rec['peak_memory_mb']:.1f} MB")
            print(f"  T={T:<5d} {impl:<12s} {method:<13s} {status}   "
                  f"[{time.perf_counter() - t0:.1f} s]", flush=True)
    return {"records": records, "versions": versions,
            "total_wall_s": time.perf_counter() - t_start}


def estimate_memory(records: list[dict], impl: str, method: str, T: int) -> float | None:
    """Linear-in-T estimate from the largest smaller T, for the O(T)-memory methods."""
    if method != "reverse":
        return None
    prev = [r for r in records if r["impl"] == impl and r["method"] == method
            and not r.get("skipped") and r["T"] < T]
    if not prev:
        return None
    last = max(prev, key=lambda r: r["T"])
    return last["peak_memory_mb"] * T / last["T"]


# ----------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------
ORDER = [("hyperdescent", m) for m in HD_METHODS] + [
    (p, m) for p, ms in PEER_METHODS.items() for m in ms]


def _cell(r: dict | None, kind: str = "wall") -> str:
    if r is None:
        return "—"
    if r.get("skipped"):
        est = r.get("estimated_peak_memory_mb")
        return f"skipped (est. {est:.0f} MB)" if est else "skipped"
    if kind == "cpu":
        return f"{r['cpu_ratio_to_plain_step']:.2f}×"
    return f"{r['ratio_to_plain_step']:.2f}× / {r['peak_memory_mb']:.1f} MB"


def table_rows(result: dict, kind: str = "wall") -> tuple[list[int], list[list[str]]]:
    recs = result["records"]
    Ts = sorted({r["T"] for r in recs})
    rows = []
    for impl, method in ORDER:
        cells = [next((r for r in recs if (r["impl"], r["method"], r["T"]) == (impl, method, T)),
                      None) for T in Ts]
        if all(c is None for c in cells):
            continue
        rows.append([impl, method, *(_cell(c, kind) for c in cells)])
    return Ts, rows


def print_table(result: dict) -> None:
    Ts, rows = table_rows(result)
    headers = ["impl", "method", *(f"T={T}: ratio / peak" for T in Ts)]
    try:
        from rich.console import Console
        from rich.table import Table

        tab = Table(title="hypergradient cost: time per inner step ÷ plain SGD step / peak memory")
        for h in headers:
            tab.add_column(h)
        for row in rows:
            tab.add_row(*row)
        Console(width=200).print(tab)
    except ImportError:
        print(" | ".join(headers))
        for row in rows:
            print(" | ".join(row))
    for T, p in result["plain_step_s"].items():
        print(f"plain torch.optim.SGD step at T={T}: {p * 1e3:.3f} ms (median over workers)")


def skip_line(result: dict) -> str:
    """Which O(T)-memory runs were skipped, from the peak extrapolated off the smaller T."""
    est = [r for r in result["records"] if r.get("estimated_peak_memory_mb") is not None]
    if not est:
        return "No run needed a memory estimate."
    skipped = [r for r in est if r.get("skipped")]
    desc = ", ".join(f"{r['impl']} {r['method']} T={r['T']}: est. "
                     f"{r['estimated_peak_memory_mb']:.0f} MB" for r in est)
    verdict = ("skipped: " + ", ".join(f"{r['impl']} {r['method']} T={r['T']}" for r in skipped)
               if skipped else "none exceeded it, so none was skipped")
    return (f"Reverse runs are skipped when their peak, extrapolated linearly in T from the "
            f"largest smaller T, exceeds {MEMORY_LIMIT_MB:.0f} MB ({desc}); {verdict}.")


def markdown(result: dict, command: str) -> str:
    Ts, rows = table_rows(result)
    out = ["# Hypergradient cost: hyperdescent vs torchopt vs higher", "",
           f"Command: `{command}`", "",
           f"Generated {result['meta']['date']} on {result['meta']['machine']}; "
           f"torch {result['versions'].get('torch')}, torchopt {result['versions'].get('torchopt')}"
           f", higher {result['versions'].get('higher')}; one thread "
           "(OMP_NUM_THREADS=MKL_NUM_THREADS=1, torch.set_num_threads(1)); total "
           f"{result['total_wall_s'] / 60:.1f} min.", "",
           "Digits MLP 64-128-128-10 (ReLU), batch 128, float32, SGD momentum 0.9, lr=0.05, "
           "weight_decay=1e-4; validation loss on 500 held-out digits after T steps. "
           "Each cell: wall time per inner step ÷ one plain `torch.optim.SGD` step measured in the "
           f"same process (median of {result['meta']['reps']} repetitions, 1 for T > 1000), and peak memory "
           "(ru_maxrss − RSS after setup, a fresh process per cell). The plain step is timed in "
           "blocks just before and just after every repetition, so that load from other "
           "processes hits both alike (the 1-min load average is in the records table).", "",
           skip_line(result), "",
           "| impl | method | " + " | ".join(f"T={T}" for T in Ts) + " |",
           "|---|---|" + "---|" * len(Ts)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    _, cpu_rows = table_rows(result, "cpu")
    out += ["", "The same ratios in process CPU time (time.process_time; less sensitive to other "
            "processes on the machine):", "",
            "| impl | method | " + " | ".join(f"T={T}" for T in Ts) + " |",
            "|---|---|" + "---|" * len(Ts)]
    out += ["| " + " | ".join(r) + " |" for r in cpu_rows]
    out += ["", "Plain `torch.optim.SGD` step (median over the workers): " + ", ".join(
        f"T={T}: {p * 1e3:.3f} ms" for T, p in result["plain_step_s"].items()), ""]
    out += ["## All records", "",
            "| impl | method | T | s/step | ratio (wall) | ratio (CPU) | peak MB | hvps | "
            "load avg | notes |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["records"]:
        if r.get("skipped"):
            out.append(f"| {r['impl']} | {r['method']} | {r['T']} | — | — | — | — | — | — | "
                       f"{r['notes']} |")
            continue
        hvps = "—" if r.get("hvps") is None else r["hvps"]
        load = "–".join(f"{x:.1f}" for x in r.get("loadavg_1min", []))
        out.append(f"| {r['impl']} | {r['method']} | {r['T']} | "
                   f"{r['seconds_per_step'] * 1e3:.3f} ms | {r['ratio_to_plain_step']:.2f} | "
                   f"{r['cpu_ratio_to_plain_step']:.2f} | {r['peak_memory_mb']:.1f} | {hvps} | "
                   f"{load} | {r['notes']} |")
    out += ["", "hvps: Hessian-vector products as counted in `res.stats` (hyperdescent) or by wrapping "
            "the linear solver's matvec (torchopt implicit); hyperdescent's reverse-type methods "
            "count one vector-Hessian product per step they backpropagate through (done inside "
            "autograd's graph); the peers' reverse runs are not counted."]
    if result.get("head_to_head"):
        out += ["", "## Head-to-head in one process", "",
                "The table above times each implementation in its own process, so a drift of "
                "the machine's speed between processes moves the ratios. Here one process runs "
                "hyperdescent, torchopt and higher (and the two IFT solves) in turn, "
                "repetition after repetition; medians:", "",
                *head_to_head_lines(result["head_to_head"])]
    p = result.get("profile")
    if p and "error" not in p:
        out += ["", f"## Where forward mode's time goes (cProfile, T={p['T']})", "",
                f"{p['ms_per_step']:.2f} ms per inner step = {p['ratio']:.1f}× a plain step "
                f"({p['plain_step_ms']:.3f} ms); under cProfile {p['profiled_ms_per_step']:.2f} ms. "
                "Functions with the most own time, per inner step:", "",
                "| own ms/step | share | calls/step | function |", "|---|---|---|---|"]
        out += [f"| {r['own_ms_per_step']:.3f} | {r['share']:.1%} | {r['calls_per_step']:.1f} | "
                f"`{r['function']}` |" for r in p["top_own_time"]]
        out += ["", "Cumulative time of hyperdescent's and autograd's functions, per inner step:",
                "", "| cum. ms/step | share | calls/step | function |", "|---|---|---|---|"]
        out += [f"| {r['cum_ms_per_step']:.3f} | {r['share']:.1%} | {r['calls_per_step']:.1f} | "
                f"`{r['function']}` |" for r in p["top_cumulative"]]
    c = result.get("correctness")
    if c:
        out += ["", f"## Correctness at T={c['T']} (float32, same unroll)", "",
                f"hyperdescent reverse: {c['hyperdescent_reverse']}", "",
                "| vs hyperdescent reverse | rel. err. d/dlr | rel. err. d/dwd |", "|---|---|---|"]
        for name, e in c["rel_err_vs_hyperdescent_reverse"].items():
            if "error" in e:
                out.append(f"| {name} | {e['error']} | |")
            else:
                out.append(f"| {name} | {e['lr']:.2e} | {e['weight_decay']:.2e} |")
        imp = c.get("implicit", {})
        if "rel_err" in imp:
            out += ["", f"implicit d/dwd: hyperdescent {imp['hyperdescent']['weight_decay']:.6g}, "
                        f"torchopt {imp['torchopt']['weight_decay']:.6g}, rel. err. "
                        f"{imp['rel_err']:.2e}"]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=None, help="horizons (default 10 100 1000)")
    ap.add_argument("--quick", action="store_true", help="T=10 only, one repetition")
    ap.add_argument("--reps", type=int, default=3, help="repetitions for T <= 1000 (1 above)")
    ap.add_argument("--impls", nargs="+", default=["hyperdescent", "torchopt", "higher"])
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness check")
    ap.add_argument("--no-profile", action="store_true",
                    help="skip the cProfile summary of forward mode (T=100) in the report")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the results")
    ap.add_argument("--name", help="file stem (default hypergrad_cost, or hypergrad_cost_quick "
                                   "with --quick, so a quick run keeps the full results)")
    ap.add_argument("--profile", metavar="METHOD", help="profile one hyperdescent method")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--check-worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--profile-worker", help=argparse.SUPPRESS)
    ap.add_argument("--h2h-worker", help=argparse.SUPPRESS)
    ap.add_argument("--h2h-reps", type=int, default=7,
                    help="repetitions of the one-process head-to-head timing (0: skip it)")
    args = ap.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    if args.profile_worker:
        method, T = args.profile_worker.split(":")
        print("RESULT " + json.dumps(profile(method, int(T), verbose=False)), flush=True)
        return 0
    if args.h2h_worker:
        T, reps = map(int, args.h2h_worker.split(":"))
        print("RESULT " + json.dumps(head_to_head(T, reps)), flush=True)
        return 0
    if args.check_worker:
        print("RESULT " + json.dumps(correctness(args.check_worker)), flush=True)
        return 0
    if args.profile:
        os.environ.update(THREAD_ENV)
        profile(args.profile, (args.T or [100])[0])
        return 0

    Ts = args.T or ([10] if args.quick else [10, 100, 1000])
    reps = 1 if args.quick else args.reps
    command = "python benchmarks/hypergrad_cost.py" + (
        " " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    print(f"hypergrad_cost: T={Ts}, reps={reps} (T<=1000), one thread per process", flush=True)
    result = run_all(Ts, reps, args.quick, args.timeout, args.impls)
    ok = [r for r in result["records"] if not r.get("skipped")]
    result["plain_step_s"] = {
        T: statistics.median([r["plain_step_s"] for r in ok if r["T"] == T])
        for T in sorted({r["T"] for r in ok})}
    if not args.no_check:
        check = _spawn_check(10, args.timeout)
        result["correctness"] = check
        print_check(check)
    if args.h2h_reps > 0 and not args.quick and {"torchopt", "higher"} <= set(args.impls):
        result["head_to_head"] = [
            _spawn_worker(["--h2h-worker", f"{T}:{args.h2h_reps}"], args.timeout)
            for T in Ts if T >= 100]
        print_head_to_head(result["head_to_head"])
    if not (args.no_profile or args.quick):
        T_prof = min(100, max(Ts))
        result["profile"] = _spawn_worker(["--profile-worker", f"forward:{T_prof}"], args.timeout)
        print_profile(result["profile"])
    result["meta"] = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                      "machine": f"{platform.processor() or platform.machine()}, "
                                 f"{os.cpu_count()} cores, {platform.platform()}",
                      "python": platform.python_version(), "threads": 1, "command": command,
                      "reps": reps,
                      "memory": "ru_maxrss at the end minus RSS after setup+warm-up, "
                                "fresh subprocess per record",
                      "memory_skip_limit_mb": MEMORY_LIMIT_MB,
                      "source_sha256": source_fingerprint()}
    print_table(result)
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("hypergrad_cost_quick" if args.quick else "hypergrad_cost")
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / f"{name}.md").write_text(markdown(result, command))
    print(f"wrote {args.out / (name + '.json')} and {args.out / (name + '.md')}")
    return 0


def source_fingerprint() -> str:
    """sha256 over src/hyperdescent/**/*.py: which version of the engines was measured."""
    import hashlib

    h = hashlib.sha256()
    src = HERE.parent / "src" / "hyperdescent"
    for f in sorted(src.rglob("*.py")):
        h.update(str(f.relative_to(src)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _spawn_worker(extra_args: list[str], timeout: float) -> dict:
    env = {**os.environ, **THREAD_ENV}
    cmd = [sys.executable, str(Path(__file__).resolve()), *extra_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        return {"error": proc.stderr[-500:]}
    return json.loads(lines[-1][len("RESULT "):])


def _spawn_check(T: int, timeout: float) -> dict:
    return {"T": T, **_spawn_worker(["--check-worker", str(T)], timeout)}


def head_to_head_lines(rows: list[dict]) -> list[str]:
    """Markdown table of the one-process head-to-head timing."""
    out = ["| T | reps | ours reverse ms/step | torchopt | higher | ours ÷ torchopt | "
           "ours ÷ higher | IFT solve ours / torchopt ms | ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| error | {r['error'][-200:]} |")
            continue
        m, sv = r["reverse_s_per_step"], r["ift_solve_s"]
        out.append(f"| {r['T']} | {r['reps']} | {m['hyperdescent'] * 1e3:.3f} | "
                   f"{m['torchopt'] * 1e3:.3f} | {m['higher'] * 1e3:.3f} | "
                   f"{r['reverse_vs_torchopt']:.3f} | {r['reverse_vs_higher']:.3f} | "
                   f"{sv['hyperdescent'] * 1e3:.1f} / {sv['torchopt'] * 1e3:.1f} | "
                   f"{r['ift_solve_vs_torchopt']:.3f} |")
    return out


def print_head_to_head(rows: list[dict]) -> None:
    print("head-to-head in one process (medians, implementations in turn):")
    for line in head_to_head_lines(rows):
        print("  " + line)


def print_profile(p: dict) -> None:
    if "error" in p:
        print("profile failed:", p["error"])
        return
    print(f"profile of {p['method']} at T={p['T']}: {p['ms_per_step']:.2f} ms/step "
          f"({p['ratio']:.1f}x a plain step); own time per step:")
    for row in p["top_own_time"]:
        print(f"  {row['own_ms_per_step']:7.3f} ms  {row['share']:6.1%}  "
              f"{row['calls_per_step']:6.1f} calls  {row['function']}")
    print("  cumulative per step (hyperdescent and autograd functions):")
    for row in p["top_cumulative"]:
        print(f"  {row['cum_ms_per_step']:7.3f} ms  {row['share']:6.1%}  "
              f"{row['calls_per_step']:6.1f} calls  {row['function']}")


def print_check(c: dict) -> None:
    if "error" in c:
        print("correctness check failed:", c["error"])
        return
    print(f"correctness at T={c['T']}: hyperdescent reverse grad {c['hyperdescent_reverse']}")
    for name, e in c["rel_err_vs_hyperdescent_reverse"].items():
        print(f"  {name:<28s} rel. err. vs ours: {e}")
    if "implicit" in c:
        print(f"  implicit (wd): {c['implicit']}")


if __name__ == "__main__":
    sys.exit(main())
