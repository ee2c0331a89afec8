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
import math
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
        # one module called twice, as torchvision's BasicBlock does (a module, not torch.relu,
        # so that difference products can freeze its pieces)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.b1(self.c1(x)))
        return self.relu(self.b2(self.c2(out)) + self.short(x))


def resnet18() -> nn.Module:
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool)."""
    layers, i = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()], 64
    for o, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_Basic(i, o, stride), _Basic(o, o, 1)]
        i = o
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))


def cnn_variant(act, pool):
    """`cnn` with another activation / pooling (smooth controls for the difference products)."""
    def make() -> nn.Module:
        def block(i, o):
            return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), act()]

        return nn.Sequential(*block(3, 32), *block(32, 32), pool(2), *block(32, 64),
                             *block(64, 64), pool(2), nn.Flatten(), nn.Linear(64 * 8 * 8, 10))
    return make


MODELS = {"cnn": cnn, "resnet18": resnet18,
          "cnn_relu_avgpool": cnn_variant(nn.ReLU, nn.AvgPool2d),
          "cnn_gelu_maxpool": cnn_variant(nn.GELU, nn.MaxPool2d),
          "cnn_gelu_avgpool": cnn_variant(nn.GELU, nn.AvgPool2d)}


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


def fd_error(hd, make, batch: int, dtype, scales=(0.1, 1.0, 10.0), hg_steps: int = 20
             ) -> list[dict]:
    """Relative error ‖H·v_fd − H·v‖/‖H·v‖ of the difference products against double backward
    at the weights after 5 steps, for a random direction and for the gradient, at the rule's ε
    (`fd_epsilon`) times each of `scales`; and the relative error and cosine of a per-layer lr
    hypergradient (summed tangent) with difference products against autodiff's."""
    from hyperdescent.hypergrad.forward import fd_epsilon, finite_difference_hvp, rng_snapshot
    from hyperdescent.hypergrad.kinks import KinkPatterns

    torch.manual_seed(0)
    x, y = torch.randn(batch * 4, 3, 32, 32, dtype=dtype), torch.randint(0, 10, (batch * 4,))
    space = hd.Space({"lr": hd.Real(0.05, low=1e-5, high=1.0, log=True, per="layer")})
    torch.manual_seed(0)
    p = hd.Problem(make().to(dtype), optimizer=hd.optim.SGD(momentum=0.9), space=space,
                   train=(x, y), val=(x[:batch], y[:batch]), batch_size=batch,
                   val_batch_size=batch, seed=0)
    hp = p.hp_at(p.real_hparams(), 0, 1000)
    state = p.init_state()
    for t in range(5):
        state, _ = p.step(state, p.train_batch(t), hp)
    batch_t = p.train_batch(5)
    rng = rng_snapshot(p.device)
    params = {n: q.detach().requires_grad_(True) for n, q in state.params.items()}
    kinks = KinkPatterns(p.model)
    with kinks.record():  # the pieces the library's difference products replay
        _, g, _, _ = p.train_grad(params, state.buffers, batch_t, hp, create_graph=True)
    g0 = {n: q.detach() for n, q in g.items()}
    gen = torch.Generator().manual_seed(1)
    dirs = {"random": {n: torch.randn(q.shape, generator=gen, dtype=dtype)
                       for n, q in params.items()}, "gradient": g0}
    out = []
    for dname, v in dirs.items():
        want = dict(zip(params, p.vjp(list(g.values()), list(params.values()),
                                      [v[n] for n in g], retain_graph=True)))
        norm = float(torch.sqrt(sum((w.double() ** 2).sum() for w in want.values())))
        for frozen in ((False, True) if kinks else (False,)):
            for central in (False, True):
                for scale in scales:
                    eps = scale * fd_epsilon(state.params, v, central)
                    got = finite_difference_hvp(p, state.params, state.buffers, batch_t, hp, v,
                                                g0, central, eps=eps, rng=rng,
                                                kinks=kinks if frozen else None)
                    err = float(torch.sqrt(sum(((got[n] - want[n]).double() ** 2).sum()
                                               for n in want))) / norm
                    out.append({"dtype": str(dtype).replace("torch.", ""), "direction": dname,
                                "hvp": "central_difference" if central else "finite_difference",
                                "frozen": frozen, "eps_scale": scale, "eps": eps,
                                "rel_error": err})
    # what the tuner reads: the summed tangent's hypergradient after `hg_steps` steps
    torch.manual_seed(0)
    want = hd.hypergrad(p, hg_steps, "forward", tangent="summed")
    ref = torch.cat([v.reshape(-1) for v in hd.space.flatten(want.grad).values()]).double()
    for h in ("finite_difference", "central_difference"):
        torch.manual_seed(0)
        got = hd.hypergrad(p, hg_steps, "forward", tangent="summed", hvp=h)
        est = torch.cat([v.reshape(-1) for v in hd.space.flatten(got.grad).values()]).double()
        out.append({"dtype": str(dtype).replace("torch.", ""),
                    "direction": f"hypergradient (summed, {hg_steps} steps)", "hvp": h,
                    "frozen": bool(kinks),
                    "eps_scale": 1.0, "eps": math.nan,
                    "rel_error": float((est - ref).norm() / ref.norm()),
                    "cosine": float(torch.nn.functional.cosine_similarity(est, ref, dim=0))})
    return out


def write_fd_error(rows: list[dict], out: Path, command: str) -> None:
    """oho_cnn_fd_error.{json,md}: the difference products' relative errors (the rows of other
    models already in the file are kept)."""
    path = out / "oho_cnn_fd_error.json"
    old = json.loads(path.read_text()) if path.exists() else {"commands": [], "rows": []}
    models = {r["model"] for r in rows}
    rows = [r for r in old["rows"] if r["model"] not in models] + rows
    commands = [c for c in old.get("commands", [old.get("command")]) if c] + [command]
    path.write_text(json.dumps({"commands": commands, "rows": rows}, indent=1) + "\n")
    lines = ["# Difference Hessian-vector products against double backward", ""]
    lines += [f"- `{c}`" for c in commands]
    lines += ["", "Weights after 5 SGD steps (lr 0.05, momentum 0.9) on CIFAR-shaped "
             "random tensors; ε = scale × fd_epsilon (c·(1 + ‖θ‖)/‖v‖, c = √u one-sided, "
             "∛u central).", "",
             "ReLU / max-pool pieces frozen: the active piece of each such module recorded at θ "
             "and replayed at θ ± εv (`hypergrad/kinks.py`), as the library's difference "
             "products do; rows without it are the plain differences.", "",
             "| model | dtype | direction | products | pieces frozen | ε scale | ε | relative "
             "error |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['dtype']} | {r['direction']} | {r['hvp']} | "
              f"{'yes' if r.get('frozen') else 'no'} | "
              f"{r['eps_scale']:g} | {r['eps']:.2e} | {r['rel_error']:.2e}"
              + (f" (cosine {r['cosine']:.4f})" if "cosine" in r else "") + " |" for r in rows]
    (out / "oho_cnn_fd_error.md").write_text("\n".join(lines) + "\n")


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
    ap.add_argument("--fd-error", action="store_true",
                    help="instead of timing: the difference products' relative errors against "
                         "double backward, float32 and float64 (oho_cnn_fd_error.{json,md})")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    import hyperdescent as hd

    torch.set_num_threads(1)
    batch, reps = (16, 2) if args.quick else (args.batch, args.reps)
    slow_reps = args.slow_reps or reps
    names = args.models or (["cnn"] + (["resnet18"] if args.resnet else []))
    out = Path(args.out)
    if args.fd_error:
        rows = [{"model": name, "batch": batch, **r} for name in names
                for dtype in (torch.float32, torch.float64)
                for r in fd_error(hd, MODELS[name], batch, dtype)]
        for r in rows:
            print(r, flush=True)
        out.mkdir(parents=True, exist_ok=True)
        write_fd_error(rows, out, "python benchmarks/oho_cnn.py "
                       + " ".join(sys.argv[1:] if argv is None else argv))
        return 0
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
