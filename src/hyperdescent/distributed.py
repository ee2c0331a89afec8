"""Data parallelism without DDP: batch shards per rank and mean all-reduces at the gradient seam.

Every rank holds the same weights, tangents and hyperparameters and takes its 1/world share of
every training and validation batch; `Problem.reduce` averages each derivative over the ranks.
The all-reduce of a differentiable gradient stays in the autograd graph, with an all-reduce as
its backward, so Hessian-vector products and reverse mode's backward through the unrolled run
see the global gradient (DDP's hooks see neither double backward nor `torch.func.jvp`). With the
mean loss of equal shards, the mean over ranks of a local derivative is the derivative of the
whole batch's loss: runs equal one process on the whole batch up to rounding.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from .errors import DataError, HyperdescentError

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def available() -> bool:
    """Whether this torch build has torch.distributed."""
    return dist.is_available()


def active() -> bool:
    """Whether a process group is initialized (by the user or by `init`)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def is_writer() -> bool:
    """Whether this process writes files: rank 0, or the only process."""
    return rank() == 0


def default_backend(device: torch.device | str) -> str:
    """`nccl` for CUDA tensors, `gloo` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init(device: torch.device | str = "cpu", backend: str | None = None) -> None:
    """Initialize the default process group from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT) unless one is initialized already."""
    if not available():
        raise HyperdescentError("distributed=True needs a torch build with torch.distributed")
    if active():
        return
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise HyperdescentError(
            f"distributed=True found no process group and no torchrun environment (missing "
            f"{missing}); launch with `torchrun --nproc-per-node=N script.py` or call "
            f"torch.distributed.init_process_group first")
    dist.init_process_group(backend or default_backend(device))


def check_shardable(n: int, name: str, batch_size: int | None = None) -> None:
    """Refuse a batch of `n` examples that the ranks cannot share equally."""
    w = world_size()
    if n % w:
        what = f"batch_size={batch_size}" if batch_size is not None else f"{n} examples"
        raise DataError(
            f"the {name} batch ({what}, {n} examples per batch) does not split into "
            f"{w} equal shards; choose a batch size (or a split size) divisible by {w}")


def shard(batch: tuple[torch.Tensor, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous 1/world share of a global batch (x, y)."""
    w = world_size()
    if w == 1:
        return batch
    x, y = batch
    check_shardable(len(x), name)
    k = len(x) // w
    r = rank()
    return x[r * k:(r + 1) * k], y[r * k:(r + 1) * k]


class _MeanAllReduce(torch.autograd.Function):
    """y = mean over ranks of x on every rank; its backward is the same mean all-reduce of the
    adjoint (so it is itself differentiable: double backward works)."""

    @staticmethod
    def forward(ctx, x):
        out = x.detach().clone()
        dist.all_reduce(out)
        return out.div_(dist.get_world_size())

    @staticmethod
    def backward(ctx, grad):
        return _MeanAllReduce.apply(grad)


def _flat_groups(tensors: Sequence[torch.Tensor | None]) -> dict:
    """Indices of the non-None tensors, grouped by (dtype, device)."""
    groups: dict = {}
    for i, x in enumerate(tensors):
        if x is not None:
            groups.setdefault((x.dtype, x.device), []).append(i)
    return groups


def mean_all_reduce(tensors: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor | None, ...]:
    """The mean over ranks of each tensor (None stays None): one all-reduce per dtype and device
    over the flattened tensors, inside the autograd graph where a tensor requires grad."""
    out: list[torch.Tensor | None] = list(tensors)
    if not active() or world_size() == 1:
        return tuple(out)
    for idx in _flat_groups(tensors).values():
        parts = [tensors[i] for i in idx]
        graph = torch.is_grad_enabled() and any(p.requires_grad for p in parts)
        flat = torch.cat([p.reshape(-1) for p in parts]) if len(parts) > 1 else parts[0].reshape(-1)
        if graph:
            flat = _MeanAllReduce.apply(flat)
        else:
            flat = flat.detach().clone() if len(parts) == 1 else flat.detach()
            dist.all_reduce(flat)
            flat.div_(world_size())
        offset = 0
        for i, p in zip(idx, parts):
            out[i] = flat[offset:offset + p.numel()].view_as(p)
            if graph:
                out[i]._hd_local = p  # see `local_outputs`
            offset += p.numel()
    return tuple(out)


def local_outputs(outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each all-reduced differentiable tensor replaced by this rank's part of it.

    A vector-Jacobian product that starts at an all-reduced gradient (a Hessian-vector row,
    a mixed ∂²L/∂θ∂λ row) with an adjoint that every rank holds alike (every adjoint handed to
    `Problem.vjp` is one: built from replicated state or the reduced result of an earlier vjp)
    equals the mean over ranks of the products of the local parts, which `Problem.reduce` takes
    anyway: starting at the local part skips the all-reduce of the adjoint in the backward.
    Inside one backward pass (reverse mode's unrolled graph) the adjoints are per rank, and the
    graph's all-reduces still run there.
    """
    return [getattr(o, "_hd_local", o) for o in outputs]


def mean_value(x: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a reported value (a loss), detached."""
    if not active() or world_size() == 1:
        return x
    out = x.detach().clone()
    dist.all_reduce(out)
    return out.div_(world_size())


def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite each tensor in place by rank `src`'s copy (the same start on every rank)."""
    if not active() or world_size() == 1:
        return
    for x in tensors:
        dist.broadcast(x, src)


def setup(model: torch.nn.Module) -> bool:
    """Join (or start, from torchrun's environment) the process group and give every rank rank
    0's initial weights and buffers, as DDP does at construction; returns True."""
    first = next(model.parameters(), None)
    init(first.device if first is not None else "cpu")
    with torch.no_grad():
        broadcast_([*model.parameters(), *model.buffers()])
    return True
