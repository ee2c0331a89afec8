"""The report: the ratio / peak-memory tables, Markdown and console output of a result."""

from __future__ import annotations

from .harness import HD_METHODS, MEMORY_LIMIT_MB, PEER_METHODS

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
    """The (impl, method) rows of the ratio / peak table over every T, or CPU ratios."""
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
    """The ratio / peak table on the console, and the plain step per T."""
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
    """The whole report as Markdown: tables, records, head-to-head, profile, correctness."""
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
    """The head-to-head table on the console."""
    print("head-to-head in one process (medians, implementations in turn):")
    for line in head_to_head_lines(rows):
        print("  " + line)


def print_profile(p: dict) -> None:
    """The profile's top functions on the console."""
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
    """The correctness check on the console."""
    if "error" in c:
        print("correctness check failed:", c["error"])
        return
    print(f"correctness at T={c['T']}: hyperdescent reverse grad {c['hyperdescent_reverse']}")
    for name, e in c["rel_err_vs_hyperdescent_reverse"].items():
        print(f"  {name:<28s} rel. err. vs ours: {e}")
    if "implicit" in c:
        print(f"  implicit (wd): {c['implicit']}")
