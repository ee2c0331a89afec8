"""Mutation testing of hypergrad/, optim/ and tuners/ (`make mutate`), and its report.

Runs mutmut (configured in pyproject.toml [tool.mutmut]) in the current directory, on every
mutant or on a seeded uniform sample of them (`--sample N`: the full run takes hours on a
two-core machine), then writes a markdown report: the score (killed + timeout over the mutants
run; "no tests" counts as survived), the score per module, and every survivor's diff.

    python benchmarks/mutate.py [--sample N] [--seed S] [--children K] [--out FILE]
    python benchmarks/mutate.py --names FILE   # run only these mutants (earlier survivors)
    python benchmarks/mutate.py --sample N --seed S --seed2 S2 --sample2 N2   # two samples
    python benchmarks/mutate.py --report-only --names FILE   # report on a finished run
"""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import sys
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

KILLED = {"killed", "timeout"}
NOT_RUN = {"not checked", "skipped", "check was interrupted by user"}
NO_MATCH = "no_mutant_matches_this_name"


def mutmut(*args: str, check: bool = True) -> str:
    """stdout of one mutmut command, run with this interpreter's mutmut."""
    exe = Path(sys.executable).with_name("mutmut")
    done = subprocess.run([str(exe), *args], capture_output=True, text=True, check=check)
    if args[:1] == ("run",):  # kept: a failing clean test run is only visible here
        with open("mutmut-run.log", "a") as f:
            f.write(f"$ mutmut {' '.join(args[:3])} ...\n{done.stdout}\n{done.stderr}\n")
    return done.stdout


def statuses() -> dict[str, str]:
    """mutant name -> status, for every mutant mutmut generated."""
    out = {}
    for line in mutmut("results", "--all", "true").splitlines():
        m = re.match(r"\s*(\S+): (.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def module_of(name: str) -> str:
    """'hyperdescent.optim.sgd.xǁSGDǁ_tangent__mutmut_3' -> 'hyperdescent.optim.sgd'."""
    return re.sub(r"\.x[_\u01c1].*$", "", name.split("__mutmut_")[0])


def run(sample: int, seed: int, children: int, names: list[str] | None = None
        ) -> list[str] | None:
    """Run mutmut on every mutant (sample=0), a seeded sample, or the given `names` (those
    that still exist: a rerun of an earlier run's survivors); returns the names run."""
    if not sample and names is None:
        mutmut("run", "--max-children", str(children), check=False)
        return None
    # generate the mutants and the test statistics without running any mutant
    mutmut("run", "--max-children", str(children), NO_MATCH, check=False)
    every = sorted(statuses())
    chosen = sorted(set(names) & set(every)) if names is not None else draw(every, sample, seed)
    mutmut("run", "--max-children", str(children), *chosen, check=False)
    return chosen


def draw(every: list[str], sample: int, seed: int) -> list[str]:
    """The seeded uniform sample of `sample` mutant names."""
    every = sorted(every)
    random.Random(seed).shuffle(every)
    return sorted(every[:sample])


def report(out_path: str, names: list[str] | None, note: str = "") -> None:
    """Write the report on `names` (None: every mutant that ran) to `out_path`."""
    st = statuses()
    total_generated = len(st)
    if names is not None:
        st = {n: st[n] for n in names if n in st}
    st = {n: s for n, s in st.items() if s not in NOT_RUN}
    per_file: dict[str, Counter] = defaultdict(Counter)
    for name, s in st.items():
        per_file[module_of(name)][s] += 1
    total = Counter(st.values())
    n_run = len(st)
    killed = sum(total[s] for s in KILLED)
    scope = (f"a seeded uniform sample of {n_run} of the {total_generated} mutants"
             if names is not None else f"{n_run} of {total_generated} mutants")
    lines = [
        "# Mutation testing: hypergrad/, optim/, tuners/", "",
        f"Command: `make mutate` (benchmarks/mutate.py; mutmut config in pyproject.toml "
        f"[tool.mutmut]); written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. {note}", "",
        f"**Score: {killed} of {n_run} killed = {100 * killed / max(n_run, 1):.1f}%** on "
        f"{scope} (killed + timeout; 'no tests' counts as survived).", "",
        "| status | mutants |", "|---|---|",
        *[f"| {s} | {n} |" for s, n in total.most_common()], "",
        "| module | run | killed | survived | no tests | score |", "|---|---|---|---|---|---|",
    ]
    for mod in sorted(per_file):
        c = per_file[mod]
        n = sum(c.values())
        k = sum(c[s] for s in KILLED)
        lines.append(f"| {mod} | {n} | {k} | {c['survived']} | {c['no tests']} | "
                     f"{100 * k / max(n, 1):.0f}% |")
    lines += ["", "## Survivors", ""]
    for name, s in sorted(st.items()):
        if s in KILLED:
            continue
        diff = [d for d in mutmut("show", name, check=False).splitlines()
                if d[:1] in "+-" and not d.startswith(("+++", "---"))]
        lines += [f"- `{name}` ({s})", "", "```diff", *diff, "```", ""]
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text("\n".join(lines) + "\n")
    print(f"{killed}/{n_run} killed ({100 * killed / max(n_run, 1):.1f}%) -> {out_path}")


def main() -> None:
    """Command line: run mutmut (or not) and write the report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=int, default=0, help="mutants to run (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--children", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/mutation.md")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--names", help="file of mutant names (one a line) to run, or with "
                    "--report-only to report on")
    ap.add_argument("--note", default="")
    ap.add_argument("--seed2", type=int, help="also run a second sample with this seed")
    ap.add_argument("--sample2", type=int, default=100)
    ap.add_argument("--out2", default="benchmarks/results/mutation_seed2.md")
    a = ap.parse_args()
    names = None
    if a.names:
        names = Path(a.names).read_text().split()
    if a.seed2 is not None and not a.report_only:
        # a second seeded sample from the same generation and test statistics: both run in
        # one mutmut pass (the statistics, a whole run of the test selection, are paid once)
        mutmut("run", "--max-children", str(a.children), NO_MATCH, check=False)
        every = sorted(statuses())
        first, second = draw(every, a.sample, a.seed), draw(every, a.sample2, a.seed2)
        mutmut("run", "--max-children", str(a.children), *sorted(set(first) | set(second)),
               check=False)
        report(a.out, first, a.note)
        report(a.out2, second, f"{a.note} Second sample: seed {a.seed2}.")
        return
    if not a.report_only:
        names = run(a.sample, a.seed, a.children, names)
    report(a.out, names, a.note)


if __name__ == "__main__":
    main()
