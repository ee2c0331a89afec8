"""The floor under a tangent that needs two exact Hessian-vector products a step (centred uoro):
a gradient with its graph plus one or two products by double backward, the two products as one
batched backward (`is_grads_batched`), and forward-over-reverse (`torch.func.jvp` of the
gradient, one tangent and two under `vmap`, which share the primal pass), each as CPU time over
a plain torch.optim step of the same model on the same batch, interleaved, median over reps.

    python benchmarks/hvp_floor.py [--models cnn resnet18] [--batch 64] [--reps 5]

Pearlmutter 1994 ("Fast exact multiplication by the Hessian") puts a product at a small multiple
of a gradient; this measures the multiple, batched and not. Results:
benchmarks/results/hvp_floor.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.func import functional_call, grad, jvp, vmap

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"

BENCH_QUICK_ARGS = ["--models", "cnn", "--batch", "8", "--reps", "1", "--out", "/tmp/hvp_floor"]


def cases(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """name -> a function doing one step's worth of that work on `model` at (x, y)."""
    torch.func.replace_all_batch_norm_modules_(model)  # vmap cannot write running statistics
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)
    gen = torch.Generator().manual_seed(1)
    v1, v2 = ({k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
              for _ in range(2))
    loss = torch.nn.functional.cross_entropy
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def plain():
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()

    def graph_and_products(k):
        p = {n: v.detach().requires_grad_(True) for n, v in params.items()}
        g = torch.autograd.grad(loss(functional_call(model, p, (x,)), y), list(p.values()),
                                create_graph=True)
        for i, v in enumerate((v1, v2)[:k]):
            torch.autograd.grad(g, list(p.values()), [v[n] for n in names],
                                retain_graph=i < k - 1)

    def batched_two():
        p = {n: v.detach().requires_grad_(True) for n, v in params.items()}
        g = torch.autograd.grad(loss(functional_call(model, p, (x,)), y), list(p.values()),
                                create_graph=True)
        torch.autograd.grad(g, list(p.values()), [torch.stack([v1[n], v2[n]]) for n in names],
                            is_grads_batched=True)

    grad_fn = grad(lambda p: loss(functional_call(model, p, (x,)), y))
    stacked = {n: torch.stack([v1[n], v2[n]]) for n in names}
    return {"plain step": plain,
            "gradient with graph": lambda: graph_and_products(0),
            "gradient with graph + 1 HVP": lambda: graph_and_products(1),
            "gradient with graph + 2 HVPs": lambda: graph_and_products(2),
            "gradient with graph + 2 HVPs batched": batched_two,
            "jvp(grad), 1 tangent (gradient + HVP)": lambda: jvp(grad_fn, (params,), (v1,)),
            "vmap(jvp(grad)), 2 tangents": lambda: vmap(
                lambda v: jvp(grad_fn, (params,), (v,)))(stacked)}


def measure(name: str, batch: int, reps: int) -> dict[str, float]:
    """Median CPU time of each case over `reps` interleaved rounds, over the plain step's."""
    from oho_cnn import cnn, resnet18
    torch.manual_seed(0)
    model = {"cnn": cnn, "resnet18": resnet18}[name]()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    work = cases(model, x, y)
    for f in work.values():  # warm-up
        f()
    times: dict[str, list[float]] = {k: [] for k in work}
    for _ in range(reps):
        for k, f in work.items():
            t = time.process_time()
            f()
            times[k].append(time.process_time() - t)
    plain = statistics.median(times["plain step"])
    return {k: statistics.median(v) / plain for k, v in times.items()} | {
        "plain_step_ms": plain * 1e3}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["cnn"], choices=["cnn", "resnet18"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS / "hvp_floor"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = {m: measure(m, args.batch, args.reps) for m in args.models}
    lines = ["# The floor under two exact Hessian-vector products a step", "",
             f"`python benchmarks/hvp_floor.py --models {' '.join(args.models)} --batch "
             f"{args.batch} --reps {args.reps}`: CPU time over a plain step, one thread, "
             f"median of {args.reps} interleaved rounds.", "",
             "| model | work | × plain step |", "|---|---|---|"]
    for m, r in out.items():
        lines += [f"| {m} | {k} | {v:.2f} |" for k, v in r.items() if k != "plain_step_ms"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(out, indent=1))
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
