"""Paired A/B of every hypergradient method and the online tuner: a git revision's package
against the working tree, in one process (the machine's speed drifts, and other work loads
it, so separate runs cannot resolve a change of a few percent).

Each round runs A and B (in alternating order) on the same digits_mlp task for: reverse,
forward and implicit hypergradients at T steps, and an OnlineTuner run of T steps; the ratio
B/A is taken per round and summarised by its median with a 90% bootstrap interval.

    python benchmarks/ab_methods.py --base 7993ce8 --T 50 --rounds 15

A tool for judging a change, not a benchmark of the product: it has no main(), so
`make bench` (benchmarks/run_all.py) skips it.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ab_reverse import import_revision  # noqa: E402
from cost import task  # noqa: E402

JOBS = ("reverse", "forward", "implicit", "oho")


def _job(hd, problem, job: str, T: int):
    if job == "oho":
        start = problem.hparams

        def oho():
            # a finished tuner leaves its values on the problem: every round starts afresh
            problem.set_hparams(start)
            return hd.OnlineTuner(problem, meta_lr=0.03).run(T)
        return oho
    return lambda: hd.hypergrad(problem, steps=T, method=job)


def compare(argv: list[str] | None = None) -> int:
    """Run the paired rounds and print, per job, the medians and the B/A interval."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="HEAD", help="git revision of A (default HEAD)")
    ap.add_argument("--T", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    task._torch()
    import hyperdescent as hd_b

    train, val = task.load_digits_split()
    with tempfile.TemporaryDirectory() as tmp:
        hd_a = import_revision(args.base, Path(tmp), "hyperdescent_ab_base")
        runs = {}
        for job in JOBS:
            wd_only = job == "implicit"  # implicit refuses lr (not a stationary-point hparam)
            pa = task.make_problem(train, val, wd_only=wd_only, hd=hd_a)
            pb = task.make_problem(train, val, wd_only=wd_only, hd=hd_b)
            runs[job] = {"A": _job(hd_a, pa, job, args.T), "B": _job(hd_b, pb, job, args.T)}
            for k in ("A", "B"):
                runs[job][k]()  # warm-up
        ratios = {job: [] for job in JOBS}
        times = {job: {"A": [], "B": []} for job in JOBS}
        for r in range(args.rounds):
            for job in JOBS:
                now = {}
                for k in (("A", "B") if r % 2 else ("B", "A")):
                    t0 = time.perf_counter()
                    runs[job][k]()
                    now[k] = time.perf_counter() - t0
                    times[job][k].append(now[k])
                ratios[job].append(now["B"] / now["A"])
    random.seed(0)
    for job in JOBS:
        rs = ratios[job]
        boots = sorted(statistics.median(random.choices(rs, k=len(rs))) for _ in range(2000))
        ms = {k: statistics.median(v) / args.T * 1e3 for k, v in times[job].items()}
        print(f"{job:9s} A ({args.base}) {ms['A']:.3f}  B {ms['B']:.3f} ms/step; B/A median "
              f"{statistics.median(rs):.4f}, 90% interval [{boots[100]:.4f}, {boots[1900]:.4f}]"
              f" ({args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(compare())
