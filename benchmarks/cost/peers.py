"""The peers on the same task and batches: torchopt and higher (reverse), torchopt (implicit)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .task import LR, MOMENTUM, THREAD_ENV, WD, Clock, _torch, make_model


def _l2(params, wd):
    return 0.5 * wd * sum((p * p).sum() for p in params)


def run_torchopt_reverse(problem, T: int) -> tuple[dict, dict]:
    """torchopt.MetaSGD through the unroll; lr a tensor, wd as a 0.5*wd*||θ||² loss term."""
    import torch.nn.functional as F
    import torchopt

    torch = _torch()
    net = make_model()
    lr = torch.tensor(LR, requires_grad=True)
    wd = torch.tensor(WD, requires_grad=True)
    opt = torchopt.MetaSGD(net, lr=lr, momentum=MOMENTUM, moment_requires_grad=True)
    for t in range(T):
        x, y = problem.train_batch(t)
        opt.step(F.cross_entropy(net(x), y) + _l2(net.parameters(), wd))
    xv, yv = problem.val_batch(T)
    value = F.cross_entropy(net(xv), yv)
    g_lr, g_wd = torch.autograd.grad(value, [lr, wd])
    return {"lr": float(g_lr), "weight_decay": float(g_wd)}, {"value": value.item()}


def run_higher_reverse(problem, T: int) -> tuple[dict, dict]:
    """higher.innerloop_ctx over torch.optim.SGD, lr and weight_decay overridden by tensors."""
    import higher
    import torch.nn.functional as F

    torch = _torch()
    net = make_model()
    lr = torch.tensor(LR, requires_grad=True)
    wd = torch.tensor(WD, requires_grad=True)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    with higher.innerloop_ctx(net, opt, copy_initial_weights=True,
                              override={"lr": [lr], "weight_decay": [wd]}) as (fnet, diffopt):
        for t in range(T):
            x, y = problem.train_batch(t)
            diffopt.step(F.cross_entropy(fnet(x), y))
        xv, yv = problem.val_batch(T)
        value = F.cross_entropy(fnet(xv), yv)
        g_lr, g_wd = torch.autograd.grad(value, [lr, wd])
    return {"lr": float(g_lr), "weight_decay": float(g_wd)}, {"value": value.item()}


def run_torchopt_implicit(problem, T: int, terms: int = 20) -> tuple[dict, dict]:
    """torchopt.diff.implicit.custom_root, F(θ, wd) = ∇L(θ; batch T-1) + wd·θ, Neumann solve.

    The inner solver is T plain torch.optim.SGD steps; the linear solve is
    torchopt.linear_solve.solve_inv(ns=True, maxiter=terms, alpha=lr), the same truncated
    series as hyperdescent's solver="neumann" (alpha = lr).
    """
    import torch.nn.functional as F
    import torchopt
    from torch.func import functional_call

    torch = _torch()
    net = make_model()
    names = [n for n, _ in net.named_parameters()]
    x_last, y_last = problem.train_batch(T - 1)
    hvps = [0]

    def optimality(params, wd):
        def train_loss(p):
            return F.cross_entropy(functional_call(net, dict(zip(names, p)), (x_last,)), y_last)

        g = torch.func.grad(train_loss)(params)
        return tuple(gi + wd * pi for gi, pi in zip(g, params))

    neumann = torchopt.linear_solve.solve_inv(ns=True, maxiter=terms, alpha=LR)

    def counting_solve(matvec, b):
        def mv(u):
            hvps[0] += 1
            return matvec(u)

        return neumann(mv, b)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=counting_solve)
    def solve_inner(params, wd):
        inner = make_model()
        with torch.no_grad():
            for p, p0 in zip(inner.parameters(), params):
                p.copy_(p0)
        opt = torch.optim.SGD(inner.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=float(wd))
        with torch.enable_grad():  # custom_root runs the solver inside autograd's no-grad forward
            for t in range(T):
                x, y = problem.train_batch(t)
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(inner(x), y).backward()
                opt.step()
        return tuple(p.detach().clone() for p in inner.parameters())

    wd = torch.tensor(WD, requires_grad=True)
    params0 = tuple(p.detach().clone() for p in net.parameters())
    clock = Clock()
    theta = solve_inner(params0, wd)
    inner = clock.read()
    xv, yv = problem.val_batch(T)
    value = F.cross_entropy(functional_call(net, dict(zip(names, theta)), (xv,)), yv)
    (g_wd,) = torch.autograd.grad(value, [wd])
    return {"weight_decay": float(g_wd)}, {"value": value.item(), "inner": inner,
                                           "hvps": hvps[0]}


def peer_status() -> dict:
    """Installed peer versions, or why a peer cannot run."""
    code = ("import importlib, importlib.metadata, json; out = {}\n"
            "for m in ('torchopt', 'higher'):\n"
            "    try:\n"
            "        importlib.import_module(m); out[m] = importlib.metadata.version(m)\n"
            "    except Exception as e:\n"
            "        out[m] = 'unavailable: %s: %s' % (type(e).__name__, e)\n"
            "import torch; out['torch'] = torch.__version__; print(json.dumps(out))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **THREAD_ENV})
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"torchopt": "unavailable: " + proc.stderr[-200:], "higher": "unavailable"}
