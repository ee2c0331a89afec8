"""Measurements in one process: a hyperdescent method or a peer at horizon T, the worker that
times one (impl, method, T) against plain steps with its peak memory, the correctness check,
the head-to-head timing and the profile."""

from __future__ import annotations

import math
import os
import resource
import statistics
import time
from pathlib import Path

from .peers import run_higher_reverse, run_torchopt_implicit, run_torchopt_reverse
from .task import Clock, PlainSGD, _torch, load_digits_split, make_problem


def run_hyperdescent(problem, method: str, T: int) -> tuple[dict, dict]:
    """One hyperdescent hypergradient at horizon T: (grads, extras). For implicit, extras'
    "inner" is the (wall, cpu) seconds of the T inner steps apart from the IFT solve."""
    import hyperdescent as hd

    extra: dict = {}
    clock = Clock()
    if method == "forward_compiled":
        res = hd.hypergrad(problem, steps=T, method="forward", compile=True)
    elif method == "reverse_ckpt":
        res = hd.hypergrad(problem, steps=T, method="reverse",
                           checkpoint_every=max(1, round(math.sqrt(T))))
    elif method == "truncated":
        res = hd.hypergrad(problem, steps=T, method="truncated", window=10)
    elif method == "implicit":
        res = hd.hypergrad(problem, steps=T, method="implicit", solver="neumann", terms=20)
    else:
        res = hd.hypergrad(problem, steps=T, method=method)
    wall, cpu = clock.read()
    phases = res.stats.get("phase_s") or {}
    if method == "implicit":
        if "forward" not in phases:
            raise RuntimeError("implicit's res.stats has no phase_s['forward'] (the time of the "
                               "T inner steps) to report the IFT solve apart")
        # the phases are wall time; the inner steps' CPU time is taken in the same proportion
        inner = phases["forward"]
        extra["inner"] = (inner, cpu * inner / wall if wall > 0 else 0.0)
    grads = {k: float(v) for k, v in res.grad.items()}
    extra.update(value=res.value, hvps=res.stats.get("hvps"),
                 stats_wall_time_s=res.stats.get("wall_time_s"), phase_s=phases)
    return grads, extra


def run_impl(problem, impl: str, method: str, T: int) -> tuple[dict, dict]:
    """The hypergradient of one (impl, method) at horizon T: (grads, extras)."""
    if impl == "hyperdescent":
        return run_hyperdescent(problem, method, T)
    if (impl, method) == ("torchopt", "reverse"):
        return run_torchopt_reverse(problem, T)
    if (impl, method) == ("torchopt", "implicit"):
        return run_torchopt_implicit(problem, T)
    if (impl, method) == ("higher", "reverse"):
        return run_higher_reverse(problem, T)
    raise ValueError(f"no benchmark for impl={impl!r} method={method!r}")


def rss_mb() -> float:
    """Resident set size of this process now, MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def maxrss_mb() -> float:
    """Peak resident set size of this process so far, MB."""
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
           "phase_s": extra.get("phase_s"),
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
