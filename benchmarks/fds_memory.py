"""Peak memory of one FDS hypergradient is constant in the horizon T (Micaelli & Storkey 2021).

Forward mode over Piecewise(5) learning rates + momentum + weight decay on mnist1d_mlp
(float32) at T = 500, 5000, 20000, and reverse mode at the T where it fits, each in a fresh
process, so that one run's freed memory cannot hide the next one's peak. Memory is the peak
resident set size above the process's at the start of the run (sampled, `stats["peak_memory_mb"]`)
and the process's maximum RSS.

Run: .venv/bin/python benchmarks/fds_memory.py [--forward 500 5000 20000] [--reverse 500 2000]
Writes benchmarks/results/fds_memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

BENCH_ARGS = []
BENCH_QUICK_ARGS = ["--forward", "100", "400", "--reverse", "100"]
HERE = Path(__file__).resolve().parent


def one(method: str, steps: int) -> dict:
    """One hypergradient in this process; its cost figures."""
    import torch
    from fds_common import make_problem

    import hyperdescent as hd
    from hyperdescent.tuners.offline import fds_space
    torch.set_num_threads(1)
    task = hd.tasks.get("mnist1d_mlp")
    prob = make_problem(task, fds_space(K=5, lr=0.05, momentum=0.9, weight_decay=1e-4))
    res = hd.hypergrad(prob, steps, method)
    return {"method": method, "steps": steps, "value": res.value,
            "peak_memory_mb": res.stats["peak_memory_mb"],
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "wall_time_s": res.stats["wall_time_s"], "hvps": res.stats.get("hvps")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--forward", type=int, nargs="*", default=[500, 5000, 20000])
    ap.add_argument("--reverse", type=int, nargs="*", default=[500, 2000])
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]))))
        return 0
    from fds_common import write
    runs = []
    for method, Ts in (("forward", args.forward), ("reverse", args.reverse)):
        for T in Ts:
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", method,
                                  str(T)], capture_output=True, text=True, cwd=HERE.parent,
                                 env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE),
                                      **{k: v for k, v in __import__("os").environ.items()
                                         if k not in ("OMP_NUM_THREADS", "PYTHONPATH")}})
            if out.returncode != 0:
                runs.append({"method": method, "steps": T, "error": out.stderr[-500:]})
            else:
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    fwd = [r["peak_memory_mb"] for r in runs if r["method"] == "forward" and "error" not in r]
    summary = {"forward_peak_mb": fwd,
               "forward_max_over_min": max(fwd) / min(fwd) if fwd and min(fwd) > 0 else None}
    path = write("fds_memory", {"task": "mnist1d_mlp", "dtype": "float32",
                                "space": "Piecewise(5) lr + momentum + weight decay",
                                "runs": runs, "summary": summary})
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
