"""Helpers shared by the STN experiments: plain training under a dropout/augmentation schedule."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from hyperdescent.data import ReplayableBatches, seed_for


def with_dropout(mlp: nn.Sequential, rates: list[float]) -> nn.Sequential:
    """The task's Linear/ReLU MLP with an nn.Dropout before every Linear layer (rates in order)."""
    layers, k = [], 0
    for m in mlp:
        if isinstance(m, nn.Linear):
            layers.append(nn.Dropout(rates[k]))
            k += 1
        layers.append(m)
    return nn.Sequential(*layers)


def set_rates(model: nn.Sequential, rates: list[float]) -> None:
    """Set the nn.Dropout rates of `model`, in order."""
    drops = [m for m in model if isinstance(m, nn.Dropout)]
    for m, p in zip(drops, rates):
        m.p = float(p)


@torch.no_grad()
def evaluate(model: nn.Module, split, chunk: int = 2048) -> dict[str, float]:
    """Loss and accuracy of a plain model on a whole split (eval mode)."""
    model.eval()
    x, y = split
    total, correct = 0.0, 0
    for i in range(0, len(x), chunk):
        out = model(x[i:i + chunk])
        total += float(F.cross_entropy(out, y[i:i + chunk], reduction="sum"))
        correct += int((out.argmax(-1) == y[i:i + chunk]).sum())
    return {"loss": total / len(x), "acc": correct / len(x)}


def train_plain(model: nn.Sequential, task, steps: int, values_at: Callable[[int], dict],
                drop_names: list[str], augment=None, seed: int = 0, lr: float = 0.05,
                momentum: float = 0.9, eval_every: int = 0) -> dict:
    """SGD training of a plain model whose dropout rates (and augmentation strengths) follow
    `values_at(t)`; same batch order as STNTrainer with the same seed. Returns final val/test
    metrics and the best val loss seen at the evaluations."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    batches = ReplayableBatches(*task.train, task.batch_size, seed, 0)
    best = float("inf")
    for t in range(steps):
        vals = values_at(t)
        set_rates(model, [vals[n] for n in drop_names])
        x, y = batches(t)
        if augment is not None:
            g = torch.Generator().manual_seed(seed_for(seed, 99, t))
            x = augment(x, {k: torch.full((len(x),), float(v), dtype=x.dtype)
                            for k, v in vals.items()}, g)
        model.train()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if eval_every and (t + 1) % eval_every == 0:
            best = min(best, evaluate(model, task.val)["loss"])
    val, test = evaluate(model, task.val), evaluate(model, task.test)
    return {"val_loss": val["loss"], "val_acc": val["acc"], "test_loss": test["loss"],
            "test_acc": test["acc"], "best_val_loss": min(best, val["loss"])}


def step_time(fn: Callable[[], None], rounds: int = 5, reps: int = 20) -> list[float]:
    """Seconds per call of `fn`, `rounds` medians of `reps` calls (caller interleaves)."""
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        out.append((time.perf_counter() - t0) / reps)
    return out
