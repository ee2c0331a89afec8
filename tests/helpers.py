"""Tiny float64 problems shared by the tests."""

import torch

import hyperdescent as hd


def data(n=48, d=5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def logreg(d=5, classes=3):
    torch.manual_seed(1)
    return torch.nn.Linear(d, classes).double()


def mlp(d=5, classes=3):
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(d, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, classes)).double()


def bn_convnet():
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Tanh(), torch.nn.Flatten(),
        torch.nn.Linear(2 * 3 * 3, 3)).double()


def image_data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 5, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g))


def problem(model, space, optimizer, x=None, y=None, batch_size=16, **kw):
    if x is None:
        x, y = data()
    return hd.Problem(model, optimizer=optimizer, space=space, train=(x, y),
                      val=(x[:20] + 0.1, y[:20]), batch_size=batch_size, seed=3, **kw)


def fd_directional(problem, direction, h=1e-6, steps=6):
    """Central finite difference of the final val loss along a direction in natural units."""
    base = problem.hparams

    def at(sign):
        vals = {}
        for name, d in direction.items():
            b = base[name]
            vals[name] = ({p: b[p] + sign * h * d[p] for p in b} if isinstance(b, dict)
                          else b + sign * h * d)
        problem.set_hparams(vals)
        v = hd.hypergrad(problem, steps=steps, method="greedy").value
        problem.set_hparams(base)
        return v

    return (at(1) - at(-1)) / (2 * h)


def dot(grad, direction):
    total = 0.0
    for name, d in direction.items():
        g = grad[name]
        if isinstance(g, dict):
            total += sum(float((g[p] * d[p]).sum()) for p in g)
        else:
            total += float((g * d).sum())
    return total


def random_direction(values, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(v):
        return torch.rand(v.shape, generator=g, dtype=v.dtype) * v.abs().clamp_min(1e-3)

    return {n: ({p: r(x) for p, x in v.items()} if isinstance(v, dict) else r(v))
            for n, v in values.items() if isinstance(v, (dict, torch.Tensor))}
