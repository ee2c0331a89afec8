"""Adam (Kingma & Ba 2015) and AdamW (Loshchilov & Hutter 2019), as their torch.optim namesakes."""

from __future__ import annotations

import torch

from .base import Optimizer, Params, State, is_zero, sqrt_tangent, tangent_value


def _pow(base, step: int):
    return base ** step if isinstance(base, torch.Tensor) else float(base) ** step


def _sqrt(x):
    return torch.sqrt(x) if isinstance(x, torch.Tensor) else x ** 0.5


class Adam(Optimizer):
    """Adam with bias correction and coupled (L2) weight decay (Kingma & Ba 2015, Alg. 1)."""

    defaults = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
    non_stationary = ("lr", "beta1", "beta2", "eps")
    counts_steps = True

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


    def tangent(self, params: Params, state: State, grads: Params, hp, dparams: Params,
                dstate: dict, dgrads: Params, dhp) -> tuple[Params, dict]:
        """Exact JVP of `update` w.r.t. (params, moments, grads, hp) (forward mode)."""
        step = state["step"] + 1
        out_p, out_m, out_v = {}, {}, {}
        for n, p in params.items():
            g, dg, dp = grads[n], dgrads[n], dparams[n]
            lr, dlr = self.value(hp, "lr", n), tangent_value(dhp, "lr", n)
            b1, db1 = self.value(hp, "beta1", n), tangent_value(dhp, "beta1", n)
            b2, db2 = self.value(hp, "beta2", n), tangent_value(dhp, "beta2", n)
            eps, deps = self.value(hp, "eps", n), tangent_value(dhp, "eps", n)
            wd, dwd = self.value(hp, "weight_decay", n), tangent_value(dhp, "weight_decay", n)
            if not is_zero(wd) or not is_zero(dwd):
                if self.decoupled_weight_decay:
                    dp = dp * (1 - lr * wd) - p * (dlr * wd + lr * dwd)
                    p = p * (1 - lr * wd)
                else:
                    g, dg = g + wd * p, dg + dwd * p + wd * dp
            m0, v0 = state["exp_avg"][n], state["exp_avg_sq"][n]
            dm0, dv0 = dstate["exp_avg"][n], dstate["exp_avg_sq"][n]
            m = m0 + (1 - b1) * (g - m0)
            dm = db1 * (m0 - g) + b1 * dm0 + (1 - b1) * dg
            v = b2 * v0 + (1 - b2) * g * g
            dv = db2 * (v0 - g * g) + b2 * dv0 + 2 * (1 - b2) * g * dg
            bc1 = 1 - _pow(b1, step)
            dbc1 = -step * _pow(b1, step - 1) * db1
            bc2 = 1 - _pow(b2, step)
            s2 = _sqrt(bc2)
            ds2 = -step * _pow(b2, step - 1) * db2 / (2 * s2)
            r = torch.sqrt(v)
            dr = sqrt_tangent(r, dv)
            denom = r / s2 + eps
            ddenom = dr / s2 - r * ds2 / (s2 * s2) + deps
            u = m / denom
            du = dm / denom - m * ddenom / (denom * denom)
            out_p[n] = dp - (dlr / bc1 - lr * dbc1 / (bc1 * bc1)) * u - (lr / bc1) * du
            out_m[n], out_v[n] = dm, dv
        return out_p, {"exp_avg": out_m, "exp_avg_sq": out_v}


class AdamW(Adam):
    """Adam with decoupled weight decay: p <- p * (1 - lr*wd) before the Adam step."""

    defaults = {**Adam.defaults, "weight_decay": 1e-2}
    non_stationary = Adam.non_stationary + ("weight_decay",)
    decoupled_weight_decay = True

    def _decay(self, p, d, wd, lr):
        return d, p * (1 - lr * wd)
