"""One backward per Hessian-vector row against all rows in one vmapped backward
(`is_grads_batched`), for the forward engine's step, on this machine's device.

    python benchmarks/batched_rows.py [--columns 2 8 18] [--reps 5]

Results: benchmarks/results/batched_rows.json; the engine's default (`batched_rows=None`)
follows what this measures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BENCH_QUICK_ARGS = ["--columns", "2", "8", "--reps", "2", "--steps", "3"]


def _problem(hd, model, x, y, columns: int, device):
    """lr per layer up to `columns` scalar hyperparameters (global lr and wd for 2)."""
    if columns == 2:
        space = {"lr": hd.Real(0.05, low=1e-5, high=1.0, log=True),
                 "weight_decay": hd.Real(1e-4, low=1e-7, high=1e-1, log=True)}
    else:
        space = {"lr": hd.Real(0.05, low=1e-5, high=1.0, log=True, per="layer")}
    return hd.Problem(model.to(device), optimizer=hd.optim.SGD(momentum=0.9),
                      space=hd.Space(space), train=(x.to(device), y.to(device)),
                      val=(x[:64].to(device), y[:64].to(device)), batch_size=64, seed=0)


def mlp(columns: int) -> torch.nn.Module:
    """A tanh MLP on flattened 32x32x3 inputs with about `columns` / 2 linear layers (two
    parameter tensors each: one per-layer lr column per tensor)."""
    layers = [torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 64)]
    for _ in range(max(0, columns // 2 - 2)):
        layers += [torch.nn.Tanh(), torch.nn.Linear(64, 64)]
    return torch.nn.Sequential(*layers, torch.nn.Tanh(), torch.nn.Linear(64, 10))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--columns", type=int, nargs="+", default=[2, 8, 18])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=str(HERE / "results" / "batched_rows.json"))
    args = ap.parse_args(argv)
    from oho_cnn import cnn

    import hyperdescent as hd
    from hyperdescent.hypergrad.forward import ForwardTangent

    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    x, y = torch.randn(256, 3, 32, 32), torch.randint(0, 10, (256,))
    rows = []
    for columns in args.columns:
        cases = {"cnn": cnn} if columns in (2, 18) else {}
        if columns != 18:
            cases["mlp"] = lambda n=columns: mlp(n)
        for name, make in cases.items():
            torch.manual_seed(0)
            p = _problem(hd, make(), x, y, columns, device)
            times = {}
            for batched in (False, True):
                def run(b=batched, p=p):
                    return hd.hypergrad(p, args.steps, "forward", batched_rows=b)
                run()
                ts = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    run()
                    ts.append(time.perf_counter() - t0)
                times[batched] = statistics.median(ts)
            cols = len(ForwardTangent(p, 1).columns)
            rows.append({"model": name, "columns": cols, "device": device.type,
                         "loop_s": times[False], "batched_s": times[True],
                         "batched_over_loop": times[True] / times[False]})
            print(f"{device.type} {name:4s} {cols:3d} columns: loop {times[False]:.3f} s, "
                  f"batched {times[True]:.3f} s, ratio {times[True] / times[False]:.2f}",
                  flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # after every row: a
            Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1)
                                      + "\n")  # slow run stopped early keeps what it measured
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
