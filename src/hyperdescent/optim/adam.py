"""Adam (Kingma & Ba 2015) and AdamW (Loshchilov & Hutter 2019), as their torch.optim namesakes."""

from __future__ import annotations

import torch

from .base import Optimizer, Params, State, is_zero


def _pow(base, step: int):
    return base ** step if isinstance(base, torch.Tensor) else float(base) ** step


def _sqrt(x):
    return torch.sqrt(x) if isinstance(x, torch.Tensor) else x ** 0.5


class Adam(Optimizer):
    """Adam with bias correction and coupled (L2) weight decay (Kingma & Ba 2015, Alg. 1)."""

    defaults = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
    non_stationary = ("lr", "beta1", "beta2", "eps")

    def init(self, params: Params, hp_names=None) -> State:
        """Initial state: step 0, zero first and second moments."""
        zeros = lambda: {n: p.detach().new_zeros(p.shape) for n, p in params.items()}  # noqa: E731
        return {"step": 0, "exp_avg": zeros(), "exp_avg_sq": zeros()}

    def _decay(self, p, d, wd, lr):
        return d + wd * p, p

    def update(self, params: Params, state: State, grads: Params, hp=None) -> tuple[Params, State]:
        """One Adam step: moments, bias correction, p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)."""
        step = state["step"] + 1
        new_p, new_m, new_v = {}, {}, {}
        for n, p in params.items():
            g = grads[n]
            lr = self.value(hp, "lr", n)
            b1, b2 = self.value(hp, "beta1", n), self.value(hp, "beta2", n)
            eps, wd = self.value(hp, "eps", n), self.value(hp, "weight_decay", n)
            if not is_zero(wd):
                g, p = self._decay(p, g, wd, lr)
            m = state["exp_avg"][n] + (1 - b1) * (g - state["exp_avg"][n])
            v = b2 * state["exp_avg_sq"][n] + (1 - b2) * g * g
            bc1 = 1 - _pow(b1, step)
            bc2_sqrt = _sqrt(1 - _pow(b2, step))
            denom = torch.sqrt(v) / bc2_sqrt + eps
            new_p[n] = p - (lr / bc1) * (m / denom)
            new_m[n], new_v[n] = m, v
        return new_p, {"step": step, "exp_avg": new_m, "exp_avg_sq": new_v}


class AdamW(Adam):
    """Adam with decoupled weight decay: p <- p * (1 - lr*wd) before the Adam step."""

    defaults = {**Adam.defaults, "weight_decay": 1e-2}
    non_stationary = Adam.non_stationary + ("weight_decay",)
    decoupled_weight_decay = True

    def _decay(self, p, d, wd, lr):
        return d, p * (1 - lr * wd)
