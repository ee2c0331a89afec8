"""RMSprop (Tieleman & Hinton 2012), centered and with momentum, as torch.optim.RMSprop."""

from __future__ import annotations

import torch

from .base import Optimizer, Params, State, is_zero, sqrt_tangent, tangent_value


class RMSprop(Optimizer):
    """RMSprop: v = alpha*v + (1-alpha)*g^2; p -= lr * g / (sqrt(v) + eps)."""

    defaults = {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0,
                "centered": False}
    non_stationary = ("lr", "alpha", "eps", "momentum")

    def init(self, params: Params, hp_names=None) -> State:
        """Initial state: step 0, zero square average (and grad average / momentum buffer)."""
        zeros = lambda: {n: p.detach().new_zeros(p.shape) for n, p in params.items()}  # noqa: E731
        state: State = {"step": 0, "square_avg": zeros()}
        if not is_zero(self.fixed["momentum"]) or self.tuned(hp_names, "momentum"):
            state["momentum_buffer"] = zeros()
        if self.fixed["centered"]:
            state["grad_avg"] = zeros()
        return state

    def update(self, params: Params, state: State, grads: Params, hp=None) -> tuple[Params, State]:
        """One RMSprop step, with optional centering and momentum."""
        centered = self.fixed["centered"]
        out_p, out_sq, out_ga, out_buf = {}, {}, {}, {}
        for n, p in params.items():
            g = grads[n]
            wd, alpha = self.value(hp, "weight_decay", n), self.value(hp, "alpha", n)
            if not is_zero(wd):
                g = g + wd * p
            sq = alpha * state["square_avg"][n] + (1 - alpha) * g * g
            out_sq[n] = sq
            if centered:
                ga = state["grad_avg"][n] + (1 - alpha) * (g - state["grad_avg"][n])
                out_ga[n] = ga
                avg = torch.sqrt(sq - ga * ga) + self.value(hp, "eps", n)
            else:
                avg = torch.sqrt(sq) + self.value(hp, "eps", n)
            lr = self.value(hp, "lr", n)
            if "momentum_buffer" in state:
                buf = self.value(hp, "momentum", n) * state["momentum_buffer"][n] + g / avg
                out_buf[n] = buf
                out_p[n] = p - lr * buf
            else:
                out_p[n] = p - lr * (g / avg)
        new_state = {"step": state["step"] + 1, "square_avg": out_sq}
        if centered:
            new_state["grad_avg"] = out_ga
        if "momentum_buffer" in state:
            new_state["momentum_buffer"] = out_buf
        return out_p, new_state

    def tangent(self, params: Params, state: State, grads: Params, hp, dparams: Params,
                dstate: dict, dgrads: Params, dhp) -> tuple[Params, dict]:
        """Exact JVP of `update` w.r.t. (params, averages, grads, hp) (forward mode)."""
        centered = self.fixed["centered"]
        out_p, out_sq, out_ga, out_buf = {}, {}, {}, {}
        for n, p in params.items():
            g, dg = grads[n], dgrads[n]
            wd, dwd = self.value(hp, "weight_decay", n), tangent_value(dhp, "weight_decay", n)
            if not is_zero(wd) or not is_zero(dwd):
                g, dg = g + wd * p, dg + dwd * p + wd * dparams[n]
            a, da = self.value(hp, "alpha", n), tangent_value(dhp, "alpha", n)
            eps, deps = self.value(hp, "eps", n), tangent_value(dhp, "eps", n)
            sq0, dsq0 = state["square_avg"][n], dstate["square_avg"][n]
            sq = a * sq0 + (1 - a) * g * g
            dsq = da * (sq0 - g * g) + a * dsq0 + 2 * (1 - a) * g * dg
            out_sq[n] = dsq
            if centered:
                ga0, dga0 = state["grad_avg"][n], dstate["grad_avg"][n]
                ga = ga0 + (1 - a) * (g - ga0)
                dga = da * (ga0 - g) + a * dga0 + (1 - a) * dg
                out_ga[n] = dga
                root = torch.sqrt(sq - ga * ga)
                davg = sqrt_tangent(root, dsq - 2 * ga * dga) + deps
            else:
                root = torch.sqrt(sq)
                davg = sqrt_tangent(root, dsq) + deps
            avg = root + eps
            q = g / avg
            dq = dg / avg - g * davg / (avg * avg)
            lr, dlr = self.value(hp, "lr", n), tangent_value(dhp, "lr", n)
            if "momentum_buffer" in state:
                mu, dmu = self.value(hp, "momentum", n), tangent_value(dhp, "momentum", n)
                b0, db0 = state["momentum_buffer"][n], dstate["momentum_buffer"][n]
                buf = mu * b0 + q
                dbuf = dmu * b0 + mu * db0 + dq
                out_buf[n] = dbuf
                out_p[n] = dparams[n] - dlr * buf - lr * dbuf
            else:
                out_p[n] = dparams[n] - dlr * q - lr * dq
        out = {"square_avg": out_sq}
        if centered:
            out["grad_avg"] = out_ga
        if "momentum_buffer" in state:
            out["momentum_buffer"] = out_buf
        return out_p, out
