"""Which tangent to pick when tuning many hyperparameters online: exact, summed, uoro, truncated.

Two experiments on the bundled MLP tasks, per-layer learning rates and weight decay from a
learning rate 100x below the task's default:

1. variance: at fixed hyperparameters, the uoro estimate (k = 1, 4, 16 samples) against the
   exact tangent on the same trajectory every 10 steps: cosine and relative error of the
   hypergradient (Tallec & Ollivier 2018 trade variance for cost; this measures the price);
2. quality: OnlineTuner runs with each tangent over several seeds: final validation and test
   loss and wall time;
3. cost: seconds per OnlineTuner step of each tangent against exact's, interleaved in one
   process (the wall times of 2 are not comparable on a loaded machine).

    python benchmarks/oho_tangents.py [--tasks digits_mlp mnist1d_mlp] [--seeds 5] [--steps 400]

Results: benchmarks/results/oho_tangents.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from oho_recovery import parse_settings

import hyperdescent as hd
from hyperdescent.hypergrad.forward import ForwardTangent, per_param_rows
from hyperdescent.hypergrad.uoro import UOROTangent, _interleave, _norms, _ratio, _rows

BENCH_QUICK_ARGS = ["--tasks", "digits_mlp", "--seeds", "1", "--steps", "60", "--variance-steps",
                    "30"]
# the tuner settings the tangents were compared at (the defaults then): a comparison of
# tangents should not move when the defaults do. At the defaults since (meta_lr 0.05, a reset
# every 200 steps; `--set meta_lr=0.05 --set reset_every=200`) the figures are in
# results/oho_recovery_notes.md
COMPARED_AT = {"meta_lr": 0.03, "reset_every": 50}
VARIANTS = {
    "exact": {"tangent": "exact"},
    "summed": {"tangent": "summed"},
    "uoro (k=1)": {"tangent": "uoro"},
    "uoro (k=4)": {"tangent": "uoro", "uoro_samples": 4},
    # a larger meta-step for the centred estimate: Adam divides by its noisy second moment,
    # so at 0.03 its learning rates climbed from the poor start 4x slower than exact's
    "uoro centred (k=1, meta_lr 0.1)": {"tangent": "uoro", "uoro_centred": True,
                                        "meta_lr": 0.1},
    "uoro centred (k=4, meta_lr 0.1)": {"tangent": "uoro", "uoro_centred": True,
                                        "uoro_samples": 4, "meta_lr": 0.1},
    # its Hessian-vector products by one-sided differences of gradients (issue 19's candidate)
    "uoro centred (k=1, meta_lr 0.1, FD)": {"tangent": "uoro", "uoro_centred": True,
                                            "meta_lr": 0.1, "hvp": "finite_difference"},
    "truncated (window 10)": {"method": "truncated", "window": 10},
}


def make_problem(task, seed: int) -> hd.Problem:
    """Per-layer lr (100x below the task's default) and per-layer weight decay."""
    lr0 = task.space["lr"].init / 100
    space = hd.Space({"lr": hd.Real(lr0, low=1e-5, high=2.0, log=True, per="layer"),
                      "weight_decay": hd.Real(1e-4, low=1e-7, high=1e-1, log=True,
                                              per="layer")})
    return hd.Problem(task.make_model(seed), optimizer=hd.optim.SGD(momentum=task.momentum),
                      space=space, train=task.train, val=task.val, test=task.test,
                      batch_size=task.batch_size, val_batch_size=256, seed=seed)


ESTIMATES = {f"{'centred ' if centred else ''}k={k}": {"samples": k, "centred": centred}
             for centred in (False, True) for k in (1, 4, 16)}


def variance(task, steps: int) -> list[dict]:
    """uoro vs exact hypergradients along one trajectory at fixed hyperparameters, compared in
    the raw (log) coordinates the meta-optimizer steps."""
    p = make_problem(task, 0)
    leaves = {k: v.detach() for k, v in hd.space.flatten(p.real_hparams()).items()}
    dnat = hd.space.flatten(p.bound.dnatural_draw(p.bound.to_raw(p.real_hparams())))
    exact = ForwardTangent(p, steps)
    uoro = {k: UOROTangent(p, steps, seed=1, **kw) for k, kw in ESTIMATES.items()}
    state, carry = p.init_state(), exact.init()
    carries = {k: e.init() for k, e in uoro.items()}
    out = []
    for t in range(steps):
        batch = p.train_batch(t)
        new_state, carry, _ = exact.step(carry, state, batch, leaves, t)
        for k, e in uoro.items():  # the same states: the weights do not depend on the tangent
            _, carries[k], _ = e.step(carries[k], state, batch, leaves, t)
        state = new_state
        if (t + 1) % 10 == 0:
            vb = p.val_batch(t + 1)
            _, g = exact.readout(carry, state, vb)
            ref = torch.cat([(v * dnat[n]).reshape(-1) for n, v in g.items()])
            for k, e in uoro.items():
                _, ge = e.readout(carries[k], state, vb)
                est = torch.cat([(v * dnat[n]).reshape(-1) for n, v in ge.items()])
                out.append({"task": task.name, "step": t + 1, "samples": k,
                            "cosine": float(torch.nn.functional.cosine_similarity(
                                est, ref, dim=0)),
                            "rel_error": float((est - ref).norm() / ref.norm()),
                            "sign_agreement": float((est.sign() == ref.sign()).double().mean())})
    return out


class UOROLast(UOROTangent):
    """Plain UORO whose carry also keeps J s̃, the previous λ̃ and the newest F_t over all
    columns, for a readout before compression (avenue B of issue 19; a benchmark only)."""

    def step(self, carry, state, batch, leaves, t):
        """`UOROTangent.step` for plain uoro, keeping J s̃, λ̃ and F_t in the carry."""
        k, P = self.rows, len(self.columns)
        gen = torch.Generator()
        gen.set_state(carry["rng"])
        lam = carry["lam"]
        dt = lam.dtype
        direct = torch.tensor(self._direct(t), dtype=dt)
        signs = torch.randint(0, 2, (k, P), generator=gen).to(dt) * 2 - 1
        c = torch.randint(0, 2, (k,), generator=gen).to(dt) * 2 - 1
        nu = signs * direct
        s = carry["s"] or None
        Z = None
        if s is not None:
            Z = {key: {n: torch.cat([_interleave(z, torch.zeros_like(z)),
                                     z.new_zeros((P, *z.shape[1:]))]) for n, z in d.items()}
                 for key, d in s.items()}
        eye = torch.diag(direct)
        dirs = torch.cat([_interleave(torch.zeros_like(nu), nu), eye])

        def directions(hp, params):
            rows = {}
            for key, v in hp.items():
                r = torch.zeros((2 * k + P, *v.shape), dtype=v.dtype)
                js, elems, _ = self._leaf_cols[key]
                r.view(2 * k + P, -1)[:, elems] = dirs[:, js]
                rows[key] = r
            return rows, per_param_rows(rows, params)

        direct_rows = (False, True) * k + tuple(bool(x) for x in direct)
        new, Zn, loss = self.tangent_step(state, batch, leaves, t, Z, direct_rows, directions,
                                          hz=(True, False) * k + (False,) * P)
        js = {key: {n: z[0:2 * k:2] for n, z in d.items()} for key, d in Zn.items()}
        fv = {key: {n: z[1:2 * k:2] for n, z in d.items()} for key, d in Zn.items()}
        F = {key: {n: z[2 * k:] for n, z in d.items()} for key, d in Zn.items()}
        rho0 = _ratio(lam.norm(dim=1), _norms(js, k))
        rho1 = _ratio(nu.norm(dim=1), _norms(fv, k))
        new_s = {key: {n: _rows(rho0, js[key][n]) + _rows(c * rho1, fv[key][n]) for n in d}
                 for key, d in js.items()}
        new_lam = lam / rho0[:, None] + (c / rho1)[:, None] * nu
        return new, {"s": new_s, "S": {}, "lam": new_lam, "rng": gen.get_state(),
                     "js": js["params"], "lam_prev": lam, "F": F["params"]}, loss

    def pre_estimates(self, carry, c):
        """Per sample, the estimate from the tangent before compression: (∇E·J s̃) λ̃ᵀ + ∇E·F_t."""
        dots = sum(carry["js"][n].reshape(self.rows, -1) @ c[n].reshape(-1) for n in c)
        est = dots[:, None] * carry["lam_prev"]
        f = sum(carry["F"][n].reshape(carry["F"][n].shape[0], -1) @ c[n].reshape(-1) for n in c)
        return est + f[None]


def pre_readout(task, steps: int, samples: int = 1) -> list[dict]:
    """Plain uoro's hypergradient read out after compression (as the library does) and before
    it (`UOROLast.pre_estimates`), against exact on one trajectory every 10 steps, in raw
    coordinates as `variance` compares them."""
    p = make_problem(task, 0)
    leaves = {k: v.detach() for k, v in hd.space.flatten(p.real_hparams()).items()}
    dnat = hd.space.flatten(p.bound.dnatural_draw(p.bound.to_raw(p.real_hparams())))
    exact, u = ForwardTangent(p, steps), UOROLast(p, steps, samples=samples, seed=1)
    state, carry, cu = p.init_state(), exact.init(), u.init()
    scale = torch.stack([dnat[col.members[0].leaf].reshape(-1)[col.members[0].index]
                         for col in u.columns])
    out = []
    for t in range(steps):
        batch = p.train_batch(t)
        new_state, carry, _ = exact.step(carry, state, batch, leaves, t)
        _, cu, _ = u.step(cu, state, batch, leaves, t)
        state = new_state
        if (t + 1) % 10 == 0:
            vb = p.val_batch(t + 1)
            _, g = exact.readout(carry, state, vb)
            _, c, _ = p.val_grad(state.params, state.buffers, vb)
            ref = torch.stack([g[col.members[0].leaf].reshape(-1)[col.members[0].index]
                               for col in u.columns]) * scale
            for kind, est in (("after compression", u.sample_estimates(cu, c).mean(0)),
                              ("before compression", u.pre_estimates(cu, c).mean(0))):
                est = est * scale
                out.append({"task": task.name, "step": t + 1, "readout": kind,
                            "cosine": float(torch.nn.functional.cosine_similarity(
                                est, ref, dim=0)),
                            "rel_error": float((est - ref).norm() / ref.norm())})
    return out


def step_cost(task, steps: int) -> list[dict]:
    """Seconds per OnlineTuner step of each variant as a ratio to exact's, the variants' steps
    interleaved in one process (round robin) so that a drifting load falls on all alike."""
    tuners = {v: hd.OnlineTuner(make_problem(task, 0), **{**COMPARED_AT, **kw})
              for v, kw in VARIANTS.items()}
    secs: dict[str, list[float]] = {v: [] for v in tuners}
    for i in range(steps + 2):
        for v, tuner in tuners.items():
            t0 = time.perf_counter()
            tuner.step()
            if i >= 2:  # the first steps start the tangent columns / fill the window
                secs[v].append(time.perf_counter() - t0)
    ref = statistics.median(secs["exact"])
    return [{"task": task.name, "variant": v, "step_s": statistics.median(x),
             "ratio": statistics.median(x) / ref} for v, x in secs.items()]


def quality(task, variant: str, seed: int, steps: int, extra: dict | None = None) -> dict:
    """Final val/test loss and wall time of one OnlineTuner run (`extra`: tuner options over
    the variant's)."""
    p = make_problem(task, seed)
    t0 = time.perf_counter()
    tuner = hd.OnlineTuner(p, **{**COMPARED_AT, **VARIANTS[variant], **(extra or {})})
    tuner.run(steps)
    return {"task": task.name, "variant": variant, "seed": seed,
            "val_loss": tuner.evaluate("val")["loss"], "test_loss": tuner.evaluate("test")["loss"],
            "seconds": time.perf_counter() - t0, "rollbacks": tuner.rollbacks}


def fd_check(task, lr_mult: float, steps: int) -> dict:
    """The exact tangent's hypergradient with difference products (hvp="finite_difference")
    against double backward's after `steps` steps at `lr_mult` x the start's lr: relative error
    and cosine (the task's dtype)."""
    p = make_problem(task, 0)
    vals = p.real_hparams()
    vals = {**vals, "lr": {k: v * lr_mult for k, v in vals["lr"].items()}}
    got = {}
    for hvp in ("autodiff", "finite_difference"):
        r = hd.hypergrad(p, steps, "forward", hparams=vals, hvp=hvp)
        got[hvp] = torch.cat([v.reshape(-1) for v in hd.space.flatten(r.grad).values()]).double()
    a, b = got["autodiff"], got["finite_difference"]
    return {"task": task.name, "lr_mult": lr_mult, "steps": steps, "dtype": str(p.dtype),
            "rel_error": float((b - a).norm() / a.norm()),
            "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["digits_mlp", "mnist1d_mlp"])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--variance-steps", type=int, default=100, help="0: skip that experiment")
    ap.add_argument("--cost-steps", type=int, default=30, help="0: skip that experiment")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--seed-list", type=int, nargs="+", help="these seeds instead of --seeds")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="run nothing: write the tables of these results files together")
    ap.add_argument("--pre-readout", action="store_true",
                    help="run only pre_readout (plain uoro k=1, 100 steps) on --tasks")
    ap.add_argument("--fd-check", action="store_true",
                    help="run only fd_check (lr x1 and x100, 50 steps) on --tasks and print it")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an OnlineTuner option for every quality run, over the variant's")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    extra = parse_settings(args.set)
    torch.set_num_threads(1)
    if args.pre_readout:
        rows = [r for n in args.tasks for r in pre_readout(hd.tasks.get(n), 100)]
        for n in args.tasks:
            for kind in ("after compression", "before compression"):
                sel = [r for r in rows if r["task"] == n and r["readout"] == kind]
                print(f"{n} {kind}: median cosine "
                      f"{statistics.median(r['cosine'] for r in sel):.3f}, median relative "
                      f"error {statistics.median(r['rel_error'] for r in sel):.3f}")
        return 0
    if args.fd_check:
        rows = [fd_check(hd.tasks.get(n), m, 50) for n in args.tasks for m in (1, 100)]
        print(json.dumps(rows, indent=1))
        return 0
    var, runs, cost = [], [], []
    if args.merge:
        for f in args.merge:
            d = json.loads(Path(f).read_text())
            var += d["variance"]
            runs += d["runs"]
            cost += d.get("cost", [])
        args.tasks = list(dict.fromkeys(r["task"] for r in runs + var))
        args.steps = d["args"]["steps"]
        args.variants = [v for v in VARIANTS if any(r["variant"] == v for r in runs)]
    for name in [] if args.merge else args.tasks:
        task = hd.tasks.get(name)
        if args.variance_steps:
            var += variance(task, args.variance_steps)
        if args.cost_steps:
            cost += step_cost(task, args.cost_steps)
        for variant in args.variants:
            for seed in args.seed_list or range(args.seeds):
                runs.append(quality(task, variant, seed, args.steps, extra))
                r = runs[-1]
                print(f"{name:12s} {variant:22s} seed {seed}: val {r['val_loss']:.4f} test "
                      f"{r['test_loss']:.4f} {r['seconds']:.1f} s", flush=True)
    lines = ["# Tangents for many hyperparameters (per-layer lr and weight decay, lr 100x too "
             "small at the start)", "",
             "## uoro against the exact tangent on one trajectory (fixed hyperparameters)", "",
             "Every 10 steps, in raw (log) coordinates; centred: each name's mean over its "
             "layers carried exactly, UORO for the deviations from it.", "",
             "| task | estimate | median cosine | median relative error | sign agreement |",
             "|---|---|---|---|---|"]
    for name in args.tasks:
        for k in dict.fromkeys(v["samples"] for v in var):
            sel = [v for v in var if v["task"] == name and v["samples"] == k]
            if sel:
                lines.append(
                    f"| {name} | {k} | {statistics.median(v['cosine'] for v in sel):.3f} | "
                    f"{statistics.median(v['rel_error'] for v in sel):.3f} | "
                    f"{statistics.mean(v.get('sign_agreement', math.nan) for v in sel):.3f} |")
    lines += ["", f"## OnlineTuner runs ({args.steps} steps, medians over seeds; val loss also "
                  "as a ratio to exact's median)", "",
              "Seconds are wall times of whole runs, which may have shared the machine with "
              "other work: the step costs below are the comparable ones.", "",
              "| task | tangent | seeds | val loss | / exact | test loss | seconds | / exact |",
              "|---|---|---|---|---|---|---|---|"]
    for name in args.tasks:
        ref = None
        for variant in args.variants:
            sel = [r for r in runs if r["task"] == name and r["variant"] == variant]
            if not sel:
                continue
            med = {k: statistics.median(r[k] for r in sel)
                   for k in ("val_loss", "test_loss", "seconds")}
            ref = ref or (med if variant == "exact" else None)
            rv, rs = (med["val_loss"] / ref["val_loss"], med["seconds"] / ref["seconds"]) \
                if ref else (math.nan, math.nan)
            lines.append(f"| {name} | {variant} | {len(sel)} | {med['val_loss']:.4f} | {rv:.2f} "
                         f"| {med['test_loss']:.4f} | {med['seconds']:.1f} | {rs:.2f} |")
    if cost:
        lines += ["", "## Cost per OnlineTuner step (variants interleaved in one process, "
                      "median over steps)", "", "| task | tangent | ms / step | / exact |",
                  "|---|---|---|---|"]
        lines += [f"| {c['task']} | {c['variant']} | {c['step_s'] * 1e3:.1f} | "
                  f"{c['ratio']:.2f} |" for c in cost]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "oho_tangents.json").write_text(json.dumps(
        {"args": vars(args), "variance": var, "runs": runs, "cost": cost}, indent=1) + "\n")
    (out / "oho_tangents.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
