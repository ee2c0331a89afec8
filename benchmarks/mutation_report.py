"""Write the mutation-testing report (`make mutate`) from mutmut's results in ./mutants.

Reads every mutant's status (`mutmut results --all true`), scores each source file and the
whole run (killed + timeout over all mutants that ran; "no tests" counts as not killed), and
lists every survivor with its diff. Usage: python benchmarks/mutation_report.py OUT.md
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

KILLED = {"killed", "timeout"}
NOT_COUNTED = {"skipped", "not checked", "check was interrupted by user"}


def mutmut(*args: str) -> str:
    """stdout of one mutmut command, run with this interpreter's mutmut."""
    exe = Path(sys.executable).with_name("mutmut")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, check=True).stdout


def statuses() -> dict[str, str]:
    """mutant name -> status, for every mutant mutmut generated."""
    out = {}
    for line in mutmut("results", "--all", "true").splitlines():
        m = re.match(r"\s*(\S+): (.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def module_of(name: str) -> str:
    """'hyperdescent.optim.sgd.x_f__mutmut_3' -> 'hyperdescent.optim.sgd'."""
    head = name.split("__mutmut_")[0]
    parts = head.split(".")
    while parts and (parts[-1].startswith("x_") or parts[-1].startswith("x\u01c1")
                     or "\u01c1" in parts[-1]):
        parts.pop()
    return ".".join(parts)


def main(out_path: str) -> None:
    """Write the report to `out_path`."""
    st = statuses()
    per_file: dict[str, Counter] = defaultdict(Counter)
    for name, s in st.items():
        per_file[module_of(name)][s] += 1
    total = Counter(st.values())
    counted = sum(n for s, n in total.items() if s not in NOT_COUNTED)
    killed = sum(total[s] for s in KILLED)
    lines = [
        "# Mutation testing: hypergrad/, optim/, tuners/",
        "",
        f"Command: `make mutate` (mutmut, config in pyproject.toml [tool.mutmut]); written "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
        f"**Score: {killed} of {counted} mutants killed = {100 * killed / max(counted, 1):.1f}%** "
        f"(killed + timeout over every mutant that ran; 'no tests' counts as survived).",
        "",
        "| status | mutants |", "|---|---|",
        *[f"| {s} | {n} |" for s, n in total.most_common()],
        "",
        "| module | mutants | killed | survived | no tests | score |", "|---|---|---|---|---|---|",
    ]
    for mod in sorted(per_file):
        c = per_file[mod]
        n = sum(v for s, v in c.items() if s not in NOT_COUNTED)
        k = sum(c[s] for s in KILLED)
        lines.append(f"| {mod} | {n} | {k} | {c['survived']} | {c['no tests']} | "
                     f"{100 * k / max(n, 1):.1f}% |")
    lines += ["", "## Survivors", ""]
    for name, s in sorted(st.items()):
        if s in KILLED or s in NOT_COUNTED:
            continue
        diff = mutmut("show", name).strip()
        lines += [f"### {name} ({s})", "", "```diff", diff, "```", ""]
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text("\n".join(lines) + "\n")
    print(f"{killed}/{counted} killed ({100 * killed / max(counted, 1):.1f}%) -> {out_path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/mutation.md")
