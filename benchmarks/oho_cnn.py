"""Online tuning on convolutional nets: the cost of each tangent per step, as a ratio to a plain
torch.optim step in the same process (each repetition against the plain steps timed just before
and after it), beside the irreducible cost of the exact tangent.

Models on CIFAR-shaped random tensors (cost does not depend on the data): a BatchNorm CNN with
4 conv layers and a ResNet-18 (He et al. 2016, "Deep residual learning for image recognition",
CIFAR variant). Variants: OHO with a global lr + weight decay; per-layer learning rates with the
exact tangent, `summed`, `uoro`; `truncated` (window 10); and the forward tangents again with
their Hessian-vector products by differences of gradients (`hvp="finite_difference"`, rows
"FD products"). The irreducible cost of the exact
tangent is one gradient with a graph plus one Hessian-vector product per column.

    python benchmarks/oho_cnn.py                 # CNN, batch 64 (ResNet-18 with --resnet)
    python benchmarks/oho_cnn.py --models resnet18 --batch 16 --reps 3 --slow-reps 1
    python benchmarks/oho_cnn.py --quick

Results: benchmarks/results/oho_cnn.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BENCH_QUICK_ARGS = ["--quick"]


def cnn() -> nn.Module:
    """4 conv layers (32-32-64-64) with BatchNorm, ReLU, two poolings, a linear head."""
    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(*block(3, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64),
                         *block(64, 64), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 8 * 8, 10))


class _Basic(nn.Module):
    def __init__(self, i, o, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o)
        self.c2, self.b2 = nn.Conv2d(o, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o)
        self.short = nn.Sequential()
        if stride != 1 or i != o:
            self.short = nn.Sequential(nn.Conv2d(i, o, 1, stride, bias=False), nn.BatchNorm2d(o))

    def forward(self, x):
        out = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(out)) + self.short(x))


def resnet18() -> nn.Module:
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool)."""
    layers, i = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()], 64
    for o, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_Basic(i, o, stride), _Basic(o, o, 1)]
        i = o
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))


MODELS = {"cnn": cnn, "resnet18": resnet18}


def _problem(hd, make, batch: int, per_layer: bool):
    torch.manual_seed(0)
    x, y = torch.randn(batch * 4, 3, 32, 32), torch.randint(0, 10, (batch * 4,))
    per = "layer" if per_layer else "global"
    space = hd.Space({"lr": hd.Real(0.05, low=1e-5, high=1.0, log=True, per=per),
                      **({} if per_layer else
                         {"weight_decay": hd.Real(5e-4, low=1e-7, high=1e-1, log=True)})})
    torch.manual_seed(0)
    return hd.Problem(make(), optimizer=hd.optim.SGD(momentum=0.9), space=space, train=(x, y),
                      val=(x[:batch], y[:batch]), batch_size=batch, val_batch_size=batch, seed=0)


def _time(fn, reps: int, warm: bool = True) -> float:
    if warm:
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _paired(plain, fn, reps: int, warm: bool = True) -> tuple[float, float, float]:
    """Median over `reps` of fn's time and of its ratio to the mean of the plain steps timed
    just before and just after it (the load of a shared machine drifts between variants).
    Returns (seconds, ratio, plain seconds)."""
    if warm:
        fn()
    secs, ratios, plains = [], [], []
    before = _time(plain, 1, warm=False)
    for _ in range(reps):
        sec = _time(fn, 1, warm=False)
        after = _time(plain, 1, warm=False)
        secs.append(sec)
        ratios.append(sec / ((before + after) / 2))
        plains.append((before + after) / 2)
        before = after
    return statistics.median(secs), statistics.median(ratios), statistics.median(plains)


def plain_step(make, batch: int):
    """One torch.optim step (forward, backward, SGD momentum) on a fixed batch."""
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def irreducible(problem, columns: int):
    """A gradient with a graph and `columns` Hessian-vector products (the exact tangent's floor)."""
    state = problem.init_state()
    batch = problem.train_batch(0)
    hp = problem.hp_at(problem.real_hparams(), 0, 1000)

    def run():
        params = {n: p.detach().requires_grad_(True) for n, p in state.params.items()}
        _, g, _, _ = problem.train_grad(params, state.buffers, batch, hp, create_graph=True)
        outs, plist = list(g.values()), list(params.values())
        for _ in range(columns):
            problem.vjp(outs, plist, [torch.ones_like(o) for o in outs], retain_graph=True)
    return run


def tuner_step(hd, problem, **kw):
    """One OnlineTuner step (inner step, tangent update, meta-step)."""
    tuner = hd.OnlineTuner(problem, meta_lr=0.01, reset_every=None, **kw)
    tuner.step()  # the first step starts every column
    return tuner.step


def _variants(hd, make, batch: int, layered, cols: int) -> dict:
    """Label -> a function building the step to time: each variant is built just before it is
    timed, so that no other variant's model and tangent are alive meanwhile."""
    return {
        "OHO global lr+wd (exact)": lambda: tuner_step(hd, _problem(hd, make, batch, False)),
        "irreducible global: gradient with graph + 2 HVPs": lambda: irreducible(layered, 2),
        f"per-layer lr exact ({cols} columns)": lambda: tuner_step(hd, layered),
        f"irreducible exact: gradient with graph + {cols} HVPs":
            lambda: irreducible(layered, cols),
        "per-layer lr summed": lambda: tuner_step(hd, _problem(hd, make, batch, True),
                                                  tangent="summed"),
        "per-layer lr uoro": lambda: tuner_step(hd, _problem(hd, make, batch, True),
                                                tangent="uoro"),
        "per-layer lr uoro centred": lambda: tuner_step(hd, _problem(hd, make, batch, True),
                                                        tangent="uoro", uoro_centred=True),
        "per-layer lr truncated (window 10)": lambda: tuner_step(
            hd, _problem(hd, make, batch, True), method="truncated", window=10),
        # Hessian-vector products by differences of gradients (hvp="finite_difference": one
        # extra gradient each, and the step's gradient without a graph)
        "OHO global lr+wd (exact), FD products": lambda: tuner_step(
            hd, _problem(hd, make, batch, False), hvp="finite_difference"),
        "per-layer lr uoro, FD products": lambda: tuner_step(
            hd, _problem(hd, make, batch, True), tangent="uoro", hvp="finite_difference"),
        "per-layer lr uoro centred, FD products": lambda: tuner_step(
            hd, _problem(hd, make, batch, True), tangent="uoro", uoro_centred=True,
            hvp="finite_difference"),
        "per-layer lr uoro centred, central FD products": lambda: tuner_step(
            hd, _problem(hd, make, batch, True), tangent="uoro", uoro_centred=True,
            hvp="central_difference"),
        f"per-layer lr exact ({cols} columns), FD products": lambda: tuner_step(
            hd, _problem(hd, make, batch, True), hvp="finite_difference"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 16, CNN only, 2 repetitions")
    ap.add_argument("--resnet", action="store_true", help="also ResNet-18 (slow on CPU)")
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS),
                    help="models to run (default: cnn, and resnet18 with --resnet); rows of "
                         "other models already in the results file are kept")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--slow-reps", type=int, default=None,
                    help="repetitions for the per-layer exact tangent and its irreducible cost "
                         "(default: --reps); its first step is the warm-up")
    ap.add_argument("--variants", nargs="+", metavar="TEXT",
                    help="only the variants whose label holds one of these texts (the rows of "
                         "the others already in the results file are kept)")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    import hyperdescent as hd

    torch.set_num_threads(1)
    batch, reps = (16, 2) if args.quick else (args.batch, args.reps)
    slow_reps = args.slow_reps or reps
    names = args.models or (["cnn"] + (["resnet18"] if args.resnet else []))
    out = Path(args.out)
    old = out / "oho_cnn.json"
    kept = json.loads(old.read_text()) if old.exists() else {"meta": {}, "rows": []}

    def chosen(label: str) -> bool:
        return not args.variants or any(v in label for v in args.variants)

    rows = [r for r in kept["rows"] if r["model"] not in names or not chosen(r["variant"])]
    meta = kept.get("meta", {})
    if "batch" in meta:  # a file of one model, written before results were kept per model
        meta = {"cnn": {"slow_reps": meta["reps"], **meta}}
    meta = {k: v for k, v in meta.items() if k not in names or args.variants}
    for name in names:
        make = MODELS[name]
        plain = plain_step(make, batch)
        base = _time(plain, reps)
        layered = _problem(hd, make, batch, True)
        cols = len(list(make().parameters()))
        variants = _variants(hd, make, batch, layered, cols)
        slow = {f"per-layer lr exact ({cols} columns)",
                f"irreducible exact: gradient with graph + {cols} HVPs",
                f"per-layer lr exact ({cols} columns), FD products"}
        for label, build in variants.items():
            if not chosen(label):
                continue
            n = slow_reps if label in slow else reps
            sec, ratio, base = _paired(plain, build(), n,
                                       warm=not (label in slow and slow_reps < reps))
            rows.append({"model": name, "variant": label, "seconds": sec, "ratio": ratio,
                         "plain_step_s": base, "reps": n})
            print(f"{name:9s} {label:50s} {sec * 1e3:9.1f} ms  {ratio:6.2f}x plain",
                  flush=True)
        meta[name if not args.variants else f"{name}: {', '.join(args.variants)}"] = {
            "batch": batch, "reps": reps, "slow_reps": slow_reps, "threads": 1,
                      "device": "cpu", "command": "python benchmarks/oho_cnn.py "
                      + " ".join(sys.argv[1:] if argv is None else argv)}
    out.mkdir(parents=True, exist_ok=True)
    old.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["# OHO on convolutional nets (CPU, 1 thread, median of the repetitions)", ""]
    lines += [f"- {m}: batch {v['batch']}, {v['reps']} repetitions ({v['slow_reps']} for the "
              f"per-layer exact tangent and its irreducible cost): `{v['command']}`"
              for m, v in meta.items() if isinstance(v, dict)]
    lines += ["", "| model | variant | ms / step | × plain step |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['variant']} | {r['seconds'] * 1e3:.1f} | {r['ratio']:.2f} |"
              for r in rows]
    (out / "oho_cnn.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
