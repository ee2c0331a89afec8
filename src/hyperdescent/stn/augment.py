"""Per-example data augmentations as tensor ops on a whole batch, each strength a hyperparameter.

Every op takes a batch x, one strength per example (a (B,) tensor or a float) and a
torch.Generator, and draws its randomness for the whole batch at once: no per-sample Python
loop and no DataLoader worker state, so a run is replayable from its seed. The colour ops follow
torchvision's ColorJitter semantics (a strength s draws a factor uniform in [max(0, 1-s), 1+s];
hue draws a rotation in [-s, s] of the colour circle) and expect images (B, C, H, W) on a [0, 1]
scale; saturation and hue need three channels. Self-tuning networks tune these strengths
(MacKay et al. 2019, "Self-tuning networks", §4.2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch.nn import functional as F

from ..errors import DataError, HyperparameterError

_GRAY = (0.299, 0.587, 0.114)


def _per_example(v, x: torch.Tensor) -> torch.Tensor:
    """Strengths as a detached (B,) tensor in x's dtype (a float is shared by the batch)."""
    t = torch.as_tensor(v, dtype=x.dtype, device=x.device).detach()
    return t.expand(x.shape[0]) if t.dim() == 0 else t.reshape(-1)


def _images(x: torch.Tensor, op: str, channels: int | None = None) -> None:
    if x.dim() != 4:
        raise DataError(f"augmentation {op!r} needs images (B, C, H, W), got shape "
                        f"{tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise DataError(f"augmentation {op!r} needs {channels}-channel images, got "
                        f"{x.shape[1]} channel(s)")


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (x.dim() - 1)))


def _jitter_factor(s: torch.Tensor, x: torch.Tensor, g) -> torch.Tensor:
    """A factor per example uniform in [max(0, 1-s), 1+s] (ColorJitter's convention)."""
    u = torch.rand(x.shape[0], generator=g, dtype=x.dtype, device=x.device)
    lo = (1 - s).clamp_min(0)
    return lo + u * (1 + s - lo)


def gaussian_noise(x: torch.Tensor, std, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + std·N(0, 1), one standard deviation per example (input noise; Bishop 1995)."""
    s = _per_example(std, x)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x + _col(s, x) * noise


def brightness(x: torch.Tensor, strength, generator: torch.Generator | None = None
               ) -> torch.Tensor:
    """Each image times a factor uniform in [1-s, 1+s] (ColorJitter brightness)."""
    _images(x, "brightness")
    f = _jitter_factor(_per_example(strength, x), x, generator)
    return x * _col(f, x)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma (ITU-R 601) of (B, 3, H, W) images, or the single channel, as (B, 1, H, W)."""
    if x.shape[1] == 3:
        w = torch.tensor(_GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    return x.mean(1, keepdim=True)


def contrast(x: torch.Tensor, strength, generator: torch.Generator | None = None
             ) -> torch.Tensor:
    """Each image blended with its mean grey level by a factor in [1-s, 1+s] (ColorJitter contrast)."""
    _images(x, "contrast")
    f = _col(_jitter_factor(_per_example(strength, x), x, generator), x)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * f + mean


def saturation(x: torch.Tensor, strength, generator: torch.Generator | None = None
               ) -> torch.Tensor:
    """Each RGB image blended with its greyscale by a factor in [1-s, 1+s] (ColorJitter saturation)."""
    _images(x, "saturation", channels=3)
    f = _col(_jitter_factor(_per_example(strength, x), x, generator), x)
    gray = _gray(x)
    return (x - gray) * f + gray


_RGB2YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def hue(x: torch.Tensor, strength, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each RGB image's hue rotated by a fraction uniform in [-s, s] of the colour circle (YIQ rotation)."""
    _images(x, "hue", channels=3)
    s = _per_example(strength, x)
    u = torch.rand(x.shape[0], generator=generator, dtype=x.dtype, device=x.device)
    theta = (2 * u - 1) * s * (2 * math.pi)
    to_yiq = torch.tensor(_RGB2YIQ, dtype=x.dtype, device=x.device)
    from_yiq = torch.linalg.inv(to_yiq)
    c, sn = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(x.shape[0], 3, 3, dtype=x.dtype, device=x.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -sn, sn, c
    m = from_yiq @ rot @ to_yiq  # (B, 3, 3): one colour map per image
    return torch.einsum("bij,bjhw->bihw", m, x)


def translate(x: torch.Tensor, strength, generator: torch.Generator | None = None
              ) -> torch.Tensor:
    """Each image shifted by up to s of its size in each direction, zeros shifted in (bilinear)."""
    _images(x, "translate")
    s = _per_example(strength, x)
    u = torch.rand(x.shape[0], 2, generator=generator, dtype=x.dtype, device=x.device)
    shift = (2 * u - 1) * s[:, None] * 2  # normalised coordinates span 2 per image side
    theta = torch.zeros(x.shape[0], 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def cutout(x: torch.Tensor, holes, length, generator: torch.Generator | None = None
           ) -> torch.Tensor:
    """Zero round(holes) squares of side round(length) at uniform centres (DeVries & Taylor 2017).

    Both values are discrete: an STN feeds their continuous latent to the hypernetwork and only
    the rounded value is applied here, so the loss is piecewise constant in them and their
    hypergradient comes from the hypernetwork alone (MacKay et al. 2019, §4.3).
    """
    _images(x, "cutout")
    B, _, H, W = x.shape
    n = _per_example(holes, x).round().clamp_min(0)
    L = _per_example(length, x).round().clamp_min(0)
    k_max = int(n.max().item()) if B else 0
    if k_max == 0 or float(L.max()) == 0:
        return x
    u = torch.rand(B, k_max, 2, generator=generator, dtype=x.dtype, device=x.device)
    cy = (u[..., 0] * H).floor()
    cx = (u[..., 1] * W).floor()
    half = (L / 2).floor()[:, None]
    y0, x0 = cy - half, cx - half                                  # (B, K)
    rows = torch.arange(H, dtype=x.dtype, device=x.device)
    cols = torch.arange(W, dtype=x.dtype, device=x.device)
    Lc = L[:, None, None]
    in_y = (rows >= y0[..., None]) & (rows < y0[..., None] + Lc)     # (B, K, H)
    in_x = (cols >= x0[..., None]) & (cols < x0[..., None] + Lc)     # (B, K, W)
    active = torch.arange(k_max, device=x.device)[None, :] < n[:, None]
    hole = (in_y[..., :, None] & in_x[..., None, :] & active[..., None, None]).any(1)
    return x * (~hole)[:, None].to(x.dtype)


_FNS = {"brightness": brightness, "contrast": contrast, "saturation": saturation, "hue": hue,
        "translate": translate, "cutout": cutout, "noise": gaussian_noise}
_OPS = tuple(_FNS)


class Augmentation:
    """A fixed pipeline of per-example augmentations, each strength read from a hyperparameter.

    ``Augmentation(noise="noise_std", translate="shift", cutout=("holes", "length"))``: each keyword
    is an op (brightness, contrast, saturation, hue, translate, cutout, noise) and its value the
    hyperparameter name(s) giving its strength; ops run in the order of that list, noise last.
    """

    def __init__(self, **ops: str | tuple[str, str]):
        unknown = sorted(set(ops) - set(_OPS))
        if unknown:
            raise HyperparameterError(f"unknown augmentation(s) {unknown}; use {list(_OPS)}")
        for op, names in ops.items():
            want = 2 if op == "cutout" else 1
            got = (names,) if isinstance(names, str) else tuple(names)
            if len(got) != want or not all(isinstance(n, str) for n in got):
                raise HyperparameterError(
                    f"augmentation {op!r} needs {want} hyperparameter name(s)"
                    f"{' (holes, length)' if want == 2 else ''}, got {names!r}")
        self.ops = {op: ((n,) if isinstance(n, str) else tuple(n)) for op, n in ops.items()}

    def names(self) -> list[str]:
        """The hyperparameter names the pipeline reads."""
        return [n for op in _OPS for n in self.ops.get(op, ())]

    def __call__(self, x: torch.Tensor, values: Mapping[str, torch.Tensor] | None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """The augmented batch; x unchanged when `values` is None (regularisation off)."""
        if values is None:
            return x
        for op in _OPS:
            if op not in self.ops:
                continue
            args = [values[n] for n in self.ops[op]]
            x = _FNS[op](x, *args, generator=generator)
        return x

    def __repr__(self) -> str:
        return f"Augmentation({', '.join(f'{k}={v!r}' for k, v in self.ops.items())})"
