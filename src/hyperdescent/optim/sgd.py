"""SGD with momentum, dampening, Nesterov and coupled weight decay, as `torch.optim.SGD`."""

from __future__ import annotations

import copy

import torch

from .base import (
    FlatViews,
    Optimizer,
    Params,
    State,
    axpy,
    common_base,
    flat_view,
    is_zero,
    lincomb,
    tangent_value,
)

_STEP_HPARAMS = ("lr", "weight_decay", "momentum", "dampening")


class SGD(Optimizer):
    """Stochastic gradient descent (Sutskever et al. 2013 momentum form, as torch.optim.SGD)."""

    defaults = {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
                "nesterov": False}
    non_stationary = ("lr", "momentum", "dampening")

    def init(self, params: Params, hp_names=None) -> State:
        """Initial state: step 0 and, when momentum is used or tuned, momentum buffers."""
        state: State = {"step": 0}
        if not is_zero(self.fixed["momentum"]) or self.tuned(hp_names, "momentum"):
            state["momentum_buffer"] = {n: p.detach().new_zeros(p.shape) for n, p in params.items()}
        return state

    # fast kernels, chosen once by `specialized` (as torchopt's aliases pick a transform at
    # construction); None leaves the reference update and tangent rule below
    _graph_kernel = None
    _plain_kernel = None
    _tangent_kernel = None

    def specialized(self, scalar_hparams: bool, tuned=()) -> SGD:
        """A copy with its fast kernels chosen once from what is fixed when a problem is
        built: whether every tuned hyperparameter is one scalar (global) and which are tuned.
        The kernels are bit-identical to the reference (tests pin them)."""
        out = copy.copy(self)
        nesterov, damp, mu = (self.fixed[k] for k in ("nesterov", "dampening", "momentum"))
        tuned = set(tuned)
        if scalar_hparams:
            out._graph_kernel = type(self)._flat_update
            if not nesterov and is_zero(damp) and "dampening" not in tuned:
                out._plain_kernel = type(self)._foreach_update
        if not nesterov and is_zero(damp) and isinstance(mu, (int, float)) and mu != 0 \
                and not tuned & {"momentum", "dampening"}:
            out._tangent_kernel = type(self)._heavy_ball_tangent
        return out

    def update(self, params: Params, state: State, grads: Params, hp=None) -> tuple[Params, State]:
        """One step: d = g + wd*p; buf = mu*buf + (1-damp)*d (buf = d at step 0); p -= lr*d'."""
        kernel = self._graph_kernel if torch.is_grad_enabled() else self._plain_kernel
        if kernel is not None:
            fast = kernel(self, params, state, grads, hp)
            if fast is not None:
                return fast
        use_momentum = "momentum_buffer" in state
        new_params, new_buf = {}, {}
        for n, p in params.items():
            b0 = state["momentum_buffer"][n] if use_momentum else None
            new_params[n], new_buf[n] = self._step(
                p, grads[n], b0, state["step"], *(self.value(hp, k, n) for k in _STEP_HPARAMS))
        new_state: State = {"step": state["step"] + 1}
        if use_momentum:
            new_state["momentum_buffer"] = new_buf
        return new_params, new_state

    def _step(self, p, g, b0, step: int, lr, wd, mu, damp):
        """(new p, new momentum buffer or None) for one tensor: the arithmetic of `update`,
        shared by the per-parameter and the concatenated path."""
        new_p, buf, _, _ = self._step_parts(p, g, b0, step, lr, wd, mu, damp)
        return new_p, buf

    def _step_parts(self, p, g, b0, step: int, lr, wd, mu, damp):
        """`_step` with its intermediates: (new p, new buffer or None, the decayed gradient
        g + wd*p, the direction p moves along), which the tangent rule reuses."""
        decayed = axpy(g, wd, p)
        d, buf = decayed, None
        if b0 is not None:
            buf = decayed if step == 0 else lincomb((1 - damp, decayed), (mu, b0))
            d = axpy(decayed, mu, buf) if self.fixed["nesterov"] else buf
        return axpy(p, lr, d, -1.0), buf, decayed, d

    def _scalar_hparams(self, hp) -> list | None:
        """[lr, weight_decay, momentum, dampening], each one number or 0-d tensor for all
        parameters; None when any is per layer or per element (the fast updates' condition)."""
        values = []
        for k in _STEP_HPARAMS:
            v = hp[k] if hp is not None and k in hp else self.fixed[k]
            if isinstance(v, dict) or isinstance(v, torch.Tensor) and v.dim() != 0:
                return None
            values.append(v)
        return values

    def _flat_update(self, params: Params, state: State, grads: Params, hp):
        """The same step on all parameters concatenated, when it is built into a graph and
        every hyperparameter is one scalar: 3 graph nodes a step instead of 3 per parameter,
        which is a fifth of a reverse-mode hypergradient's backward on small models. Returns
        None where it does not apply (per-layer or per-element values, mixed dtypes)."""
        if not torch.is_grad_enabled() or len(params) < 2:
            return None
        scalars = self._scalar_hparams(hp)
        if scalars is None:
            return None
        lr, wd, mu, damp = scalars
        names = list(params)
        flat_params = common_base(params, names)
        if flat_params is None:
            ref = next(iter(params.values()))
            if any(p.dtype != ref.dtype or p.device != ref.device for p in params.values()):
                return None
            flat_params = flat_view(params, names)
        flat_grads = flat_view(grads, names)
        if not (flat_params.requires_grad or flat_grads.requires_grad or
                any(isinstance(x, torch.Tensor) and x.requires_grad for x in scalars)):
            return None
        use_momentum = "momentum_buffer" in state
        b0 = flat_view(state["momentum_buffer"], names) if use_momentum else None
        new_flat, new_flat_buf = self._step(flat_params, flat_grads, b0, state["step"],
                                            lr, wd, mu, damp)
        new_state: State = {"step": state["step"] + 1}
        # views made on first read: the next flat step reads the vectors back whole
        if use_momentum:
            new_state["momentum_buffer"] = FlatViews(new_flat_buf, params)
        return FlatViews(new_flat, params), new_state

    def _foreach_update(self, params: Params, state: State, grads: Params, hp):
        """`update` without a graph when every hyperparameter is one scalar and there is no
        dampening or Nesterov: each op once over all parameters (`torch._foreach_*`), the same
        kernels in the same order as the per-parameter loop (bit-identical on CPU; CUDA's
        multi-tensor kernels may round differently), without its Python dispatch per
        parameter (checkpointing's first pass, truncated's and implicit's inner steps).
        Returns None where it does not apply."""
        if torch.is_grad_enabled():
            return None
        scalars = self._scalar_hparams(hp)
        if scalars is None:
            return None
        lr, wd, mu, damp = scalars
        if self.fixed["nesterov"] or not is_zero(damp):
            return None
        names = list(params)
        weights = list(params.values())
        d = _foreach_axpy([grads[n] for n in names], wd, weights)
        new_state: State = {"step": state["step"] + 1}
        if "momentum_buffer" in state:
            if state["step"] > 0:
                d = _foreach_axpy(d, mu, [state["momentum_buffer"][n] for n in names])
            new_state["momentum_buffer"] = dict(zip(names, d))
        return dict(zip(names, _foreach_axpy(weights, lr, d, -1.0))), new_state

    def tangent(self, params: Params, state: State, grads: Params, hp, dparams: Params,
                dstate: dict, dgrads: Params, dhp) -> tuple[Params, dict]:
        """Exact JVP of `update` w.r.t. (params, state tensors, grads, hp) (forward mode)."""
        return self._tangent(params, state, grads, hp, dparams, dstate, dgrads, dhp, False)[2:]

    def update_and_tangent(self, params: Params, state: State, grads: Params, hp,
                           dparams: Params, dstate: dict, dgrads: Params, dhp):
        """`update` and its `tangent` in one pass, sharing the primal intermediates."""
        return self._tangent(params, state, grads, hp, dparams, dstate, dgrads, dhp, True)

    def _tangent(self, params, state, grads, hp, dparams, dstate, dgrads, dhp, primal: bool):
        if self._tangent_kernel is not None and self._is_heavy_ball(state, hp, dhp):
            return self._tangent_kernel(self, params, state, grads, hp, dparams, dstate, dgrads,
                                        dhp, primal)
        use_momentum = "momentum_buffer" in state
        out_p, out_b, new_p, new_b = {}, {}, {}, {}
        for n, p in params.items():
            lr, wd, mu, damp = (self.value(hp, k, n) for k in _STEP_HPARAMS)
            dlr, dwd, dmu, ddamp = (tangent_value(dhp, k, n) for k in _STEP_HPARAMS)
            b0 = state["momentum_buffer"][n] if use_momentum else None
            new_p[n], buf, decayed, d = self._step_parts(p, grads[n], b0, state["step"],
                                                         lr, wd, mu, damp)
            dd = lincomb((1, dgrads[n]), (dwd, p), (wd, dparams[n]))
            if use_momentum:
                if state["step"] == 0:
                    dbuf = dd
                else:
                    dbuf = lincomb((dmu, b0), (mu, dstate["momentum_buffer"][n]),
                                   (1 - damp, dd), (-ddamp, decayed))
                out_b[n], new_b[n] = dbuf, buf
                dd = lincomb((1, dd), (dmu, buf), (mu, dbuf)) if self.fixed["nesterov"] else dbuf
            out_p[n] = axpy(axpy(dparams[n], dlr, d, -1.0), lr, dd, -1.0)
        new_state: State = {"step": state["step"] + 1}
        if use_momentum:
            new_state["momentum_buffer"] = new_b
        return (new_p if primal else {}), new_state, out_p, \
            ({"momentum_buffer": out_b} if use_momentum else {})

    def _is_heavy_ball(self, state: State, hp, dhp) -> bool:
        """Momentum after step 0, no Nesterov or dampening, momentum not tuned, and lr and
        weight decay given (with their tangents) as tensors: `_heavy_ball_tangent`'s case."""
        if "momentum_buffer" not in state or state["step"] == 0 or self.fixed["nesterov"]:
            return False
        mu = self.fixed["momentum"]
        if not is_zero(self.fixed["dampening"]) or not isinstance(mu, (int, float)) or mu == 0:
            return False
        if not isinstance(hp, dict) or not isinstance(dhp, dict):
            return False
        if any(k in hp or k in dhp for k in ("momentum", "dampening")):
            return False
        values = [d.get(k) for d in (hp, dhp) for k in ("lr", "weight_decay")]
        return all(isinstance(v, torch.Tensor) or isinstance(v, dict) and
                   all(isinstance(x, torch.Tensor) for x in v.values()) for v in values)

    def _heavy_ball_tangent(self, params, state, grads, hp, dparams, dstate, dgrads, dhp,
                            primal: bool):
        """`_tangent` for `_is_heavy_ball`'s case, the same ops in the same order (bit-identical
        results) without the generic term bookkeeping, which dominates the rule's time on small
        models.
            d = g + wd·p,  b' = d + μ·b,  p' = p - lr·b'
            db' = (dg + dwd·p + wd·dp) + μ·db,  dp' = dp - dlr·b' - lr·db'
        """
        mu = self.fixed["momentum"]
        bufs, dbufs = state["momentum_buffer"], dstate["momentum_buffer"]
        out_p, out_b, new_p, new_b = {}, {}, {}, {}
        for n, p in params.items():
            lr, wd, dlr, dwd = (v[n] if isinstance(v, dict) else v for v in (
                hp["lr"], hp["weight_decay"], dhp["lr"], dhp["weight_decay"]))
            # fresh tensors from addcmul, so the momentum terms may be added in place
            buf = torch.addcmul(grads[n], wd, p).add_(bufs[n], alpha=mu)
            dbuf = torch.addcmul(torch.addcmul(dgrads[n], dwd, p), wd, dparams[n])
            dbuf.add_(dbufs[n], alpha=mu)
            if primal:
                new_p[n] = torch.addcmul(p, lr, buf, value=-1.0)
            new_b[n], out_b[n] = buf, dbuf
            out_p[n] = torch.addcmul(torch.addcmul(dparams[n], dlr, buf, value=-1.0), lr, dbuf,
                                     value=-1.0)
        return new_p, {"step": state["step"] + 1, "momentum_buffer": new_b}, out_p, \
            {"momentum_buffer": out_b}


def _foreach_axpy(ys: list, a, xs: list, scale: float = 1.0) -> list:
    """[axpy(y, a, x, scale) for y, x in zip(ys, xs)] as one `torch._foreach_*` call, with the
    kernel `axpy` picks (addcmul for a tensor a, add(alpha=) for a number)."""
    if is_zero(a) or scale == 0:
        return ys
    if isinstance(a, torch.Tensor):
        return list(torch._foreach_addcmul(ys, [a] * len(ys), xs, value=scale))
    return list(torch._foreach_add(ys, xs, alpha=a * scale))
