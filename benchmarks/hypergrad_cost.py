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
(hypergrad_cost_quick.* with --quick). The parts live in benchmarks/cost/: task.py (data, model,
problem, the plain step), peers.py, measure.py (one process), harness.py (fresh workers),
report.py; this file is the command line, and the worker processes run it too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cost.harness import (  # noqa: E402
    MEMORY_LIMIT_MB,
    _spawn_check,
    _spawn_worker,
    run_all,
    source_fingerprint,
)
from cost.measure import correctness, head_to_head, profile, worker  # noqa: E402
from cost.peers import run_higher_reverse, run_torchopt_implicit, run_torchopt_reverse  # noqa: E402
from cost.report import (  # noqa: E402
    markdown,
    print_check,
    print_head_to_head,
    print_profile,
    print_table,
)
from cost.task import THREAD_ENV, _torch, load_digits_split, make_model, make_problem  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# what other scripts (ab_reverse.py) import from here
__all__ = ["main", "_torch", "load_digits_split", "make_model", "make_problem",
           "run_higher_reverse", "run_torchopt_reverse", "run_torchopt_implicit"]


def main(argv: list[str] | None = None) -> int:
    """The command line: run the benchmark (or one worker job) and write the report."""
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


if __name__ == "__main__":
    sys.exit(main())
