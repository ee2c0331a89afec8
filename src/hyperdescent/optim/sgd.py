"""SGD with momentum, dampening, Nesterov and coupled weight decay, as `torch.optim.SGD`."""

from __future__ import annotations

from .base import Optimizer, Params, State, is_zero


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

    def update(self, params: Params, state: State, grads: Params, hp=None) -> tuple[Params, State]:
        """One step: d = g + wd*p; buf = mu*buf + (1-damp)*d (buf = d at step 0); p -= lr*d'."""
        nesterov = self.fixed["nesterov"]
        use_momentum = "momentum_buffer" in state
        first = state["step"] == 0
        new_params, new_buf = {}, {}
        for n, p in params.items():
            d = grads[n]
            wd = self.value(hp, "weight_decay", n)
            if not is_zero(wd):
                d = d + wd * p
            if use_momentum:
                mu = self.value(hp, "momentum", n)
                damp = self.value(hp, "dampening", n)
                if first:
                    buf = d
                else:
                    buf = mu * state["momentum_buffer"][n] + (1 - damp) * d if not is_zero(damp) \
                        else mu * state["momentum_buffer"][n] + d
                new_buf[n] = buf
                d = d + mu * buf if nesterov else buf
            new_params[n] = p - self.value(hp, "lr", n) * d
        new_state: State = {"step": state["step"] + 1}
        if use_momentum:
            new_state["momentum_buffer"] = new_buf
        return new_params, new_state
