"""Run every benchmark script in benchmarks/ that defines main() (used by `make bench`).

    python benchmarks/run_all.py              # full runs
    python benchmarks/run_all.py --quick      # fast runs
    python benchmarks/run_all.py --only hypergrad_cost

Each script runs in its own process, from the repository root, with sys.argv set as if it had
been called directly. Its arguments are the module-level list `BENCH_ARGS` (or
`BENCH_QUICK_ARGS` under --quick) when the script defines one, else none (`--quick` under
--quick). The exit status is non-zero when any script fails.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# loads a script as a module (its `if __name__ == "__main__"` block does not run) and calls main()
RUNNER = """
import runpy, sys
path = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, str(__import__("pathlib").Path(path).parent))
status = runpy.run_path(path, run_name="benchmark")["main"]()
sys.exit(status if isinstance(status, int) else 0)
"""


def inspect_script(path: Path) -> tuple[bool, dict]:
    """(defines a top-level main(), literal BENCH_ARGS / BENCH_QUICK_ARGS), without importing."""
    tree = ast.parse(path.read_text(), filename=str(path))
    has_main = any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
    lists = {}
    for n in tree.body:
        if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name) \
                and n.targets[0].id in ("BENCH_ARGS", "BENCH_QUICK_ARGS"):
            lists[n.targets[0].id] = [str(a) for a in ast.literal_eval(n.value)]
    return has_main, lists


def scripts(only: list[str] | None) -> list[Path]:
    """benchmarks/*.py except this file and private (_-prefixed) modules."""
    found = sorted(p for p in HERE.glob("*.py")
                   if p.name != Path(__file__).name and not p.name.startswith("_"))
    return [p for p in found if not only or p.stem in only]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="run every benchmark script that defines main()")
    ap.add_argument("--quick", action="store_true", help="fast runs (BENCH_QUICK_ARGS or --quick)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="script names without .py")
    args = ap.parse_args(argv)
    failed, ran = [], 0
    for path in scripts(args.only):
        has_main, lists = inspect_script(path)
        if not has_main:
            print(f"-- {path.name}: no main(), skipped")
            continue
        script_args = (lists.get("BENCH_QUICK_ARGS", ["--quick"]) if args.quick
                       else lists.get("BENCH_ARGS", []))
        print(f"== {path.name} {' '.join(script_args)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, "-c", RUNNER, str(path), *script_args],
                            cwd=HERE.parent).returncode
        ran += 1
        print(f"== {path.name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        if rc != 0:
            failed.append(path.name)
    print(f"{ran} benchmark(s) run" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
