"""The one evaluation rule: mean loss and accuracy of a model's outputs on a labelled set."""

from __future__ import annotations

from collections.abc import Callable

import torch


def num_correct(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """Correct predictions in `outputs`: argmax over the last dim for several logits, a
    threshold at 0 for a single logit; None when the targets are not class labels."""
    if targets.is_floating_point() or targets.is_complex():
        return None
    if outputs.shape == targets.shape or (
            outputs.shape[:-1] == targets.shape and outputs.shape[-1] == 1):
        # one logit per example: class 1 where it is positive
        return ((outputs.reshape(targets.shape) > 0).long() == targets).sum()
    if outputs.dim() >= 1 and outputs.shape[:-1] == targets.shape:
        return (outputs.argmax(-1) == targets).sum()
    return None


def evaluate_outputs(outputs: torch.Tensor, targets: torch.Tensor, loss_fn: Callable
                     ) -> dict[str, float]:
    """{"loss": loss_fn(outputs, targets), "acc": fraction correct (NaN for non-class targets)}."""
    loss = float(loss_fn(outputs, targets))
    correct = num_correct(outputs, targets)
    acc = float("nan") if correct is None else float(correct) / max(targets.numel(), 1)
    return {"loss": loss, "acc": acc}
