"""Paired A/B of the reverse-mode unroll: a git revision's package against the working tree.

The machine's speed drifts by up to 2x over minutes, so two separate runs cannot resolve a
change of a few percent. Here both versions are imported into one process (the revision's
`src/hyperdescent` extracted with `git archive` under another package name), and each round
runs A, B (in alternating order) and higher on the same digits_mlp unroll; the ratio B/A is
taken per round and summarised by its median with a bootstrap interval.

    python benchmarks/ab_reverse.py --base HEAD~1 --rounds 60

A tool for judging a change, not a benchmark of the product: it has no main(), so
`make bench` (benchmarks/run_all.py) skips it.
"""

from __future__ import annotations

import argparse
import importlib
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import hypergrad_cost as hc  # noqa: E402


def import_revision(rev: str, where: Path, name: str):
    """`src/hyperdescent` at git revision `rev`, imported as package `name`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src/hyperdescent"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    shutil.move(str(where / "src" / "hyperdescent"), str(where / name))
    sys.path.insert(0, str(where))
    return importlib.import_module(name)


def compare(argv: list[str] | None = None) -> int:
    """Run the paired rounds and print the medians and the B/A interval."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="HEAD", help="git revision of A (default HEAD)")
    ap.add_argument("--T", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=60)
    args = ap.parse_args(argv)

    hc._torch()
    import hyperdescent as hd_b

    train, val = hc.load_digits_split()
    with tempfile.TemporaryDirectory() as tmp:
        hd_a = import_revision(args.base, Path(tmp), "hyperdescent_ab_base")
        pa, pb = hc.make_problem(train, val, hd=hd_a), hc.make_problem(train, val, hd=hd_b)
        T = args.T
        run = {"A": lambda: hd_a.hypergrad(pa, steps=T, method="reverse"),
               "B": lambda: hd_b.hypergrad(pb, steps=T, method="reverse"),
               "higher": lambda: hc.run_higher_reverse(pb, T)}
        for k in ("A", "B"):
            res = run[k]()
            print(k, {n: float(v) for n, v in res.grad.items()}, "value", res.value)
        run["higher"]()
        times: dict[str, list[float]] = {k: [] for k in run}
        ratios = []
        for r in range(args.rounds):
            now = {}
            for k in (("A", "B", "higher") if r % 2 else ("B", "A", "higher")):
                t0 = time.perf_counter()
                run[k]()
                now[k] = time.perf_counter() - t0
                times[k].append(now[k])
            ratios.append(now["B"] / now["A"])
    random.seed(0)
    boots = sorted(statistics.median(random.choices(ratios, k=len(ratios)))
                   for _ in range(2000))
    ms = {k: statistics.median(v) / T * 1e3 for k, v in times.items()}
    print(f"A ({args.base}) {ms['A']:.3f}  B (working tree) {ms['B']:.3f}  higher "
          f"{ms['higher']:.3f} ms/step (medians of {args.rounds} rounds)")
    print(f"B/A per round: median {statistics.median(ratios):.4f}, 90% bootstrap interval "
          f"[{boots[100]:.4f}, {boots[1900]:.4f}]; A/higher {ms['A'] / ms['higher']:.3f}, "
          f"B/higher {ms['B'] / ms['higher']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(compare())
