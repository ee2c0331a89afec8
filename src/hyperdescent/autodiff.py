"""Vector-Jacobian products by one direct call into autograd's engine.

`torch.autograd.grad` validates and normalizes its arguments on every call (shape checks of
each grad_output, symbolic-shape comparisons); for the small models of inner loops that costs
a noticeable share of a Hessian-vector product on small models. The engines here call it
thousands of times with grad_outputs they built themselves, so they go straight to the engine
and fall back to `torch.autograd.grad` where that internal entry point is missing or changed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

try:  # internal since torch 2.3; the public path below is the fallback
    from torch.autograd.graph import _engine_run_backward
except ImportError:  # pragma: no cover - depends on the torch version
    _engine_run_backward = None

_fast = _engine_run_backward is not None


def vjp(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
        grad_outputs: Sequence[torch.Tensor], retain_graph: bool = False,
        create_graph: bool = False) -> tuple[torch.Tensor | None, ...]:
    """Σ_i grad_outputs[i]ᵀ ∂outputs[i]/∂inputs, None for inputs the outputs do not reach
    (`torch.autograd.grad(..., allow_unused=True)`); grad_outputs must match outputs' shapes."""
    global _fast
    outputs, inputs, grad_outputs = tuple(outputs), tuple(inputs), tuple(grad_outputs)
    if _fast:
        try:
            return _engine_run_backward(outputs, grad_outputs, retain_graph, create_graph,
                                        inputs, True, accumulate_grad=False)
        except TypeError:  # pragma: no cover - the internal signature changed
            _fast = False
    return torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=retain_graph,
                               create_graph=create_graph, allow_unused=True)


def grad(loss: torch.Tensor, inputs: Sequence[torch.Tensor], create_graph: bool = False,
         retain_graph: bool | None = None) -> tuple[torch.Tensor | None, ...]:
    """∂loss/∂inputs of a scalar loss (None where unused), through `vjp`."""
    keep = create_graph if retain_graph is None else retain_graph
    return vjp((loss,), inputs, (torch.ones_like(loss),), keep, create_graph)
