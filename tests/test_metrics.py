"""The one evaluation rule shared by hd.Problem and the black-box objective."""

import math
import sys
from pathlib import Path

try:
    import hyperdescent  # noqa: F401
except ImportError:  # running from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from hyperdescent.metrics import evaluate_outputs, num_correct  # noqa: E402

F = torch.nn.functional


def test_multiclass_takes_the_argmax_of_the_last_dim():
    out = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 3.0], [0.0, 5.0, 1.0]])
    ev = evaluate_outputs(out, torch.tensor([0, 2, 0]), F.cross_entropy)
    assert ev["acc"] == 2 / 3
    assert ev["loss"] == F.cross_entropy(out, torch.tensor([0, 2, 0])).item()
    # a sequence of predictions: one per position
    assert int(num_correct(torch.eye(4).expand(2, 4, 4), torch.arange(4).expand(2, 4))) == 8


def test_a_single_logit_is_thresholded_at_zero():
    y = torch.tensor([1, 0, 0, 1])
    logits = torch.tensor([0.5, -2.0, 0.1, -0.3])
    assert int(num_correct(logits, y)) == 2
    assert int(num_correct(logits[:, None], y)) == 2  # (N, 1) as from nn.Linear(d, 1)
    ev = evaluate_outputs(logits, y, lambda out, t: F.binary_cross_entropy_with_logits(
        out, t.to(out.dtype)))
    assert ev["acc"] == 0.5


def test_float_targets_have_no_accuracy():
    ev = evaluate_outputs(torch.zeros(5, 2), torch.ones(5, 2), F.mse_loss)
    assert ev["loss"] == 1.0 and math.isnan(ev["acc"])
    assert num_correct(torch.zeros(5, 1), torch.ones(5, 1)) is None
