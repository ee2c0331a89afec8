"""Orchestration: every (impl, method, T) in a fresh worker process, memory-based skips, notes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from .peers import peer_status
from .task import THREAD_ENV

HERE = Path(__file__).resolve().parent
# the command line that the workers run (`--worker`, `--check-worker`, ...)
ENTRY = HERE.parent / "hypergrad_cost.py"
HD_METHODS = ["reverse", "reverse_ckpt", "truncated", "forward", "forward_compiled", "greedy",
              "implicit"]
PEER_METHODS = {"torchopt": ["reverse", "implicit"], "higher": ["reverse"]}
MEMORY_LIMIT_MB = 8000.0


def spawn(payload: dict, timeout: float) -> dict:
    """One worker (impl, method, T) in a fresh one-thread process; its record or an error."""
    env = {**os.environ, **THREAD_ENV}
    cmd = [sys.executable, str(ENTRY), "--worker", json.dumps(payload)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1][len("RESULT "):])


def _spawn_worker(extra_args: list[str], timeout: float) -> dict:
    env = {**os.environ, **THREAD_ENV}
    cmd = [sys.executable, str(ENTRY), *extra_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        return {"error": proc.stderr[-500:]}
    return json.loads(lines[-1][len("RESULT "):])


def _spawn_check(T: int, timeout: float) -> dict:
    return {"T": T, **_spawn_worker(["--check-worker", str(T)], timeout)}


def notes_for(impl: str, method: str, T: int) -> str:
    """What a record measures, in a few words for the report."""
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
    """Every (impl, method, T) in its own worker, smallest T first, with memory skips."""
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


def source_fingerprint() -> str:
    """sha256 over src/hyperdescent/**/*.py: which version of the engines was measured."""
    import hashlib

    h = hashlib.sha256()
    src = HERE.parent.parent / "src" / "hyperdescent"
    for f in sorted(src.rglob("*.py")):
        h.update(str(f.relative_to(src)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]
