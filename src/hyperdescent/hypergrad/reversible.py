"""Reversible learning: exact reverse-mode hypergradients without storing the trajectory.

Maclaurin, Duvenaud & Adams 2015, "Gradient-based hyperparameter optimization through
reversible learning", Algorithm 2, as an engine (`hypergrad.engine`) that `run` drives. Its
step runs SGD with momentum in int64 fixed point (`optim.reversible_sgd.ReversibleSGD`),
keeping the bits the momentum destroys in an ANS buffer (`coder`) in the carry. Its readout
walks the run backwards: it un-steps the weights, recomputes the gradient at the exactly
recovered weights (same batch, same device, same threads: the same bits as forward), un-steps
the velocity, and backpropagates the adjoints (dθ, dv) through the step by hand, with one
vector-Jacobian product of the gradient (Algorithm 2's Hessian-vector product, and the
regularizer hyperparameters' part) and of the hyperparameter lanes (learning rates, momenta
and weight decays, global, per layer, per element or scheduled). At the end the initial
weights, velocities and buffer are compared with the ones the run started from, bit for bit.
"""

from __future__ import annotations

import math
import warnings

import torch

from ..errors import HyperparameterError
from ..optim import SGD
from ..optim import reversible_sgd as rsgd
from ..problem import InnerState, Problem
from ..space import flatten, unflatten
from .coder import RansBuffer
from .common import CostMeter, HypergradResult, finish, sample_memory
from .engine import run

_HP = ("lr", "weight_decay", "momentum")


def _check_optimizer(problem: Problem) -> SGD:
    opt = problem.optimizer
    tuned = "momentum" in problem.bound.real_names()
    if not isinstance(opt, SGD) or opt.fixed["nesterov"] or \
            not (tuned or float(opt.fixed["momentum"]) > 0) or \
            float(opt.fixed["dampening"]) != 0 or "dampening" in problem.bound.real_names():
        raise HyperparameterError(
            f"method='reversible' reverses hd.optim.SGD with momentum > 0, without Nesterov or "
            f"dampening; the problem's optimizer is {opt!r}")
    if problem.buffers0:
        raise HyperparameterError(
            f"method='reversible' cannot reverse the model's buffers {sorted(problem.buffers0)} "
            f"(e.g. BatchNorm running statistics); use a model without buffers or "
            f"method='reverse'")
    return opt


def _quantized_values(values: dict, opt: SGD, denom: int) -> tuple[dict, object]:
    """The values with momentum rounded to n/denom, and the momentum used (for the stats)."""
    values = dict(values)
    if "momentum" in values:
        mu = values["momentum"]
        if isinstance(mu, dict):
            q = {p: rsgd.quantize_momentum(x.detach(), denom)[1].to(x.dtype) for p, x in mu.items()}
            values["momentum"] = q
            return values, {p: x.tolist() for p, x in q.items()}
        q = rsgd.quantize_momentum(mu.detach(), denom)[1].to(mu.dtype)
        values["momentum"] = q
        return values, q.tolist()
    return values, float(rsgd.quantize_momentum(float(opt.fixed["momentum"]), denom)[1])


class _Lanes:
    """lr, weight decay and momentum numerator per element at a step, without a graph."""

    def __init__(self, opt: SGD, layout: rsgd.Layout, fixed_mu: float, dtype, device,
                 denom: int):
        self.opt, self.layout, self.fixed_mu = opt, layout, fixed_mu
        self.dtype, self.device, self.denom = dtype, device, denom

    def _per_name(self, hp: dict, k: str) -> list:
        return [self.opt.value(hp, k, n) if k != "momentum" or "momentum" in hp
                else self.fixed_mu for n in self.layout.names]

    def __call__(self, hp: dict):
        lr = self.layout.lanes(self._per_name(hp, "lr"), self.dtype, self.device)
        wd = self.layout.lanes(self._per_name(hp, "weight_decay"), self.dtype, self.device)
        mu = self.layout.lanes(self._per_name(hp, "momentum"), torch.float64, self.device)
        return lr, wd, mu, self.numerators(mu)

    def numerators(self, mu: torch.Tensor):
        """n of μ = n/denom per element (an int when global: the coder's fast path)."""
        if mu.dim() == 0:
            return round(float(mu) * self.denom)
        return torch.round(mu.to(torch.float64) * self.denom).to(torch.int64)

    def differentiable(self, hp: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lr, weight decay, momentum) per element, in the graph of the leaves in `hp`."""
        return tuple(self.layout.lanes(self._per_name(hp, k), self.dtype, self.device,
                                       graph=True) for k in _HP)


def _flat_grad(problem: Problem, layout: rsgd.Layout, theta: torch.Tensor, batch, hp,
               create_graph: bool = False
               ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(the per-tensor leaves, training loss, ∇_θ L as one flat vector) at the flat weights
    θ: each leaf is a view of θ, the gradient one concatenation of theirs."""
    # leaves per tensor, not views of one flat leaf: the flat leaf's backward zero-fills a full
    # vector per tensor and sums them (SliceBackward), a tenth of a step on a small MLP
    leaves = [x.requires_grad_(True) for x in layout.split(theta.detach()).values()]
    with torch.enable_grad():
        loss, _ = problem.train_loss(dict(zip(layout.names, leaves)), problem.buffers0, batch,
                                     hp)
        got = problem.grad(loss, leaves, create_graph=create_graph)
        grad = _cat(got, leaves)
    if grad is None:
        raise HyperparameterError("the training loss does not depend on the weights")
    return leaves, loss.detach(), grad


def _cat(parts, like: list[torch.Tensor]) -> torch.Tensor | None:
    """Per-tensor gradients as one flat vector, zeros where a part is None (None if all are)."""
    if any(x is None for x in parts):  # not `None in parts`: that calls Tensor.__eq__
        if all(x is None for x in parts):
            return None
        parts = [torch.zeros_like(w) if x is None else x for x, w in zip(parts, like)]
    return torch._C._nn.flatten_dense_tensors(parts)  # one C++ call: views and cat


def _axpy(y: torch.Tensor, alpha: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y + alpha·x, one fused op when alpha is one number."""
    return torch.add(y, x, alpha=float(alpha)) if alpha.dim() == 0 else y + alpha * x


def _lane_cotangent(lane: torch.Tensor, adjoint: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d<adjoint, lane ⊙ x>/d lane, in the lane's shape (a 0-d lane: a dot product)."""
    return torch.dot(adjoint, x) if lane.dim() == 0 else adjoint * x


class ReversibleEngine:
    """Reversible learning (Maclaurin, Duvenaud & Adams 2015) on the engine seam.

    `step` is one exact fixed-point SGD-momentum step (Algorithm 1, `ReversibleSGD`) that
    pushes the bits the momentum destroys to the information buffer in the carry; `readout`
    is Algorithm 2: it walks the steps back, recomputes each gradient at the exactly recovered
    weights, and backpropagates the adjoints (dθ, dv) through the step by hand, with one
    autograd call a step for the Hessian-vector product H·ā, the hyperparameter lanes and
    the regularizer's hyperparameters; at the end it compares the state it reached with the
    one the carry started from, bit for bit (`stats["reversal_exact"]`).

    The carry holds the fixed-point weights and velocities, their float value, the buffer
    object (its tape is a stack written in place: copying it each step would cost O(T^2)),
    the step count and the start; `reset` makes the current state the new start, and
    `readout`, which consumes the buffer, leaves the carry at that start.
    """

    def __init__(self, problem: Problem, horizon: int, values: dict, *,
                 headroom_bits: int = 10, denom: int = rsgd.MOMENTUM_DENOM,
                 initial_grad: bool = False, inputs_grad: bool = False):
        opt = _check_optimizer(problem)
        self.problem, self.horizon, self.like = problem, int(horizon), values
        self.initial_grad, self.inputs_grad = initial_grad, inputs_grad
        self.layout = rsgd.Layout.of(problem.params0)
        fixed_mu = 0.0 if "momentum" in values else \
            float(rsgd.quantize_momentum(float(opt.fixed["momentum"]), denom)[1])
        self.lanes = _Lanes(opt, self.layout, fixed_mu, problem.dtype, problem.device, denom)
        self.theta0 = self.layout.flat(problem.initial_params(values)).detach()
        self.sgd = rsgd.ReversibleSGD.for_weights(self.layout, self.theta0, headroom_bits, denom)
        expect = math.log2(1.0 / fixed_mu) if fixed_mu > 0 else 1.0
        self._capacity = int(self.layout.numel * self.horizon * (expect + 0.01) / 31) + 1024
        self._scheduled = [k for k in values if problem.bound.space[k].schedule is not None]
        self._cache = None
        self.hvps = 0
        self.stats: dict = {}

    def init(self) -> dict:
        """s_0 in fixed point, an empty buffer, and the start to reverse to."""
        theta, v = self.sgd.start(self.theta0)
        buffer = RansBuffer(self.layout.numel, self.problem.device, self._capacity)
        return self._started({"theta": theta, "v": v, "theta_f": self.sgd.weights(theta),
                              "buffer": buffer, "t": 0, "leaves": []})

    @staticmethod
    def _started(carry: dict) -> dict:
        return {**carry, "t0": carry["t"], "leaves": [],
                "start": (carry["theta"].clone(), carry["v"].clone(), carry["buffer"].snapshot())}

    def reset(self, carry: dict) -> dict:
        """Forget the steps so far: the reversal stops at the current state."""
        return self._started(carry)

    def _blocks(self, t: int) -> tuple[int, ...]:
        """The schedule blocks step t is in (the lanes change only with them)."""
        return tuple(self.problem.bound.space[k].schedule.block(t, self.horizon)
                     for k in self._scheduled)

    def _hp_and_lanes(self, leaves: dict, t: int) -> tuple[dict, tuple]:
        """The values step t uses and their lanes, rebuilt only when the leaves or a
        schedule's block change."""
        blocks = self._blocks(t)
        cached = self._cache
        if cached is None or cached[0] is not leaves or cached[1] != blocks:
            hp = self.problem.hp_at(unflatten(leaves, self.like), t, self.horizon)
            cached = self._cache = (leaves, blocks, hp, self.lanes(hp))
        return cached[2], cached[3]

    def step(self, carry: dict, state: InnerState, batch, leaves: dict[str, torch.Tensor],
             t: int) -> tuple[InnerState, dict, torch.Tensor]:
        """One exact fixed-point step at the hyperparameters `leaves` (batch=None: the
        problem's training batch t)."""
        problem = self.problem
        if batch is None:
            batch = problem.train_batch(t)
        hp, (lr, wd, mu, n) = self._hp_and_lanes(leaves, t)
        theta_f = carry["theta_f"]
        _, loss, g = _flat_grad(problem, self.layout, theta_f, batch, hp)
        theta, v = self.sgd.step(carry["theta"], carry["v"], rsgd.decayed_gradient(g, theta_f, wd),
                                 lr, n, mu, carry["buffer"], t)
        if t % 64 == 0:
            sample_memory()
        seen = carry["leaves"]
        if not seen or seen[-1][1] is not leaves:
            seen = seen + [(t, leaves)]  # the values step t on uses, for the reversal
        theta_f = self.sgd.weights(theta)
        new = {**carry, "theta": theta, "v": v, "theta_f": theta_f, "t": carry["t"] + 1,
               "leaves": seen}
        return (InnerState(self.layout.split(theta_f), {"step": state.t + 1}, state.buffers,
                           state.t + 1), new, loss)

    def readout(self, carry: dict, state: InnerState, val_batch
                ) -> tuple[float, dict[str, torch.Tensor]]:
        """E(θ_t) and dE/dλ by Algorithm 2's reverse pass back to the carry's start."""
        problem, layout, sgd, lanes = self.problem, self.layout, self.sgd, self.lanes
        theta, v, buffer = carry["theta"], carry["v"], carry["buffer"]
        value, dtheta, _ = problem.val_grad(layout.split(carry["theta_f"]), problem.buffers0,
                                            val_batch)
        dtheta = layout.flat(dtheta)
        dv = torch.zeros_like(dtheta)
        segments = carry["leaves"] or [(carry["t0"], {k: x for k, x in
                                                      flatten(self.like).items()})]
        lams = [{k: x.detach().clone().requires_grad_(True) for k, x in lv.items()}
                for _, lv in segments]
        grads = {k: torch.zeros_like(x) for k, x in lams[-1].items()}
        data = problem.train_data
        dx = torch.zeros_like(data.x) if self.inputs_grad else None
        bits = buffer.bits()  # what the forward pass left in the buffer
        # θ_0 = scale·θ_init (Sec. 3.3): its adjoint is asked for when the reversal reaches s_0
        scales_init = "init_scale" in self.like and carry["t0"] == 0
        t0, seg = carry["t0"], len(segments) - 1
        key, lane_cots = None, []

        def flush():
            # the lanes' cotangents summed over the steps that share them: one product
            if lane_cots:
                outs = [x for x, _ in lane_cots]
                for k, gk in zip(lam, problem.vjp(outs, list(lam.values()),
                                                  [c for _, c in lane_cots])):
                    if gk is not None:
                        grads[k] = grads[k] + gk

        for t in range(carry["t"] - 1, t0 - 1, -1):
            while seg > 0 and segments[seg][0] > t:
                seg -= 1
            step_key = (seg, self._blocks(t))
            if step_key != key:
                flush()
                key, lam = step_key, lams[seg]
                lam_list = list(lam.values())
                hp_g = problem.hp_at(unflatten(lam, self.like), t, self.horizon)
                lanes_g = lanes.differentiable(hp_g)
                lr, wd, mu = (x.detach() for x in lanes_g)
                n = lanes.numerators(mu)
                lane_cots = [[x, None] for x in lanes_g if x.requires_grad]
            theta, v_next = sgd.unstep_position_velocity(theta, v, lr, t)
            batch = problem.train_batch(t)
            if self.inputs_grad:
                batch = (batch[0].detach().requires_grad_(True), batch[1])
            theta_f = sgd.weights(theta)
            leaves, _, g = _flat_grad(problem, layout, theta_f, batch, hp_g, create_graph=True)
            # the forward pass took this gradient without a graph: the values are the same bits
            v = sgd.unstep_velocity(v, rsgd.decayed_gradient(g.detach(), theta_f, wd), n,
                                    buffer, t)
            # θ' = θ - lr·v', v' = μ·v + g(θ) + wd·θ: with ā = dv - lr·dθ the adjoint of v',
            # dθ ← dθ + H·ā + wd·ā, dv ← μ·ā, dlr = -dθ·v', dμ = ā·v, dwd = ā·θ
            a = _axpy(dv, -lr, dtheta)
            last = t == t0
            for slot in lane_cots:
                lane = slot[0]
                if lane is lanes_g[0]:
                    cot = -_lane_cotangent(lane, dtheta, v_next)
                elif lane is lanes_g[1]:
                    cot = _lane_cotangent(lane, a, theta_f)
                elif last and not bool(v.any()):
                    continue  # v_0 = 0 at a fresh start: no momentum product to take
                else:
                    cot = _lane_cotangent(lane, a, sgd.velocity(v))
                slot[1] = cot if slot[1] is None else slot[1] + cot
            lane_cots = [slot for slot in lane_cots if slot[1] is not None] if last else \
                lane_cots
            want_theta = not last or self.initial_grad or scales_init
            inputs = (leaves if want_theta else []) + ([batch[0]] if self.inputs_grad else [])
            got = problem.vjp([g], inputs + lam_list, [a])
            if want_theta:
                self.hvps += 1
                hv = _cat(got[:len(leaves)], leaves)
                hv = torch.zeros_like(dtheta) if hv is None else hv
                dtheta = _axpy(hv.add_(dtheta), wd, a)  # hv is a fresh tensor
                dv = mu * a if mu.dim() else torch.mul(a, float(mu))
            if self.inputs_grad and got[len(inputs) - 1] is not None:
                if data.full:
                    dx += got[len(inputs) - 1]
                else:
                    dx.index_add_(0, data.indices(t), got[len(inputs) - 1])
            for k, gk in zip(lam, got[len(inputs):]):
                if gk is not None:
                    grads[k] = grads[k] + gk
            if t == carry["t"] - 1 or t % 64 == 0:
                sample_memory()
        flush()
        if scales_init:
            first = lams[0]
            theta0_g = problem.initial_params(unflatten(first, self.like))
            got = problem.vjp(list(theta0_g.values()), list(first.values()),
                              list(layout.split(dtheta).values()))
            for k, gk in zip(first, got):
                if gk is not None:
                    grads[k] = grads[k] + gk
        theta0, v0, snap = carry["start"]
        exact = bool(torch.equal(theta, theta0) and torch.equal(v, v0) and buffer.matches(snap))
        P, T = layout.numel, carry["t"] - t0
        self.stats = {
            "reversal_exact": exact, "buffer_bits": bits,
            "buffer_peak_mb": (64 * P + 32 * buffer.peak_words) / 8 / 2 ** 20,
            "theta_radix": sgd.fx.theta_radix, "velocity_radix": sgd.fx.v_radix}
        self.stats["buffer_bits_per_param_step"] = self.stats["buffer_bits"] / (P * max(T, 1))
        if self.initial_grad:
            w = {k: x.clone() for k, x in layout.split(dtheta).items()}
            self.stats["initial_weights_grad"] = w
            # d/ds of E with the layer's initial weights scaled by s, at s = 1
            self.stats["init_scale_grad"] = {k: float((x * problem.params0[k]).sum())
                                             for k, x in w.items()}
        if self.inputs_grad:
            # with "train_inputs" in the space the model reads those, not the data tensor
            self.stats["train_inputs_grad"] = grads["train_inputs"].clone() \
                if "train_inputs" in grads else dx
        # the reversal consumed the buffer: the carry is left at its start, where steps may
        # begin again (the one engine whose readout writes its carry)
        carry.update(theta=theta, v=v, theta_f=sgd.weights(theta), t=t0, leaves=[])
        return float(value), grads


def prepare(problem: Problem, values: dict | None, momentum_denom: int, headroom_bits: int
            ) -> tuple[dict, object]:
    """Checks, and the values with the momentum quantised: (values, momentum used)."""
    problem.require_replayable("reversible")
    opt = _check_optimizer(problem)
    if momentum_denom < 2 or momentum_denom & (momentum_denom - 1) or momentum_denom > 1 << 16:
        raise HyperparameterError(f"momentum_denom must be a power of two in [2, 2^16], got "
                                  f"{momentum_denom}")
    if not 0 <= int(headroom_bits) <= 40:
        raise HyperparameterError(f"headroom_bits must be in [0, 40], got {headroom_bits}")
    values = problem.real_hparams() if values is None else values
    return _quantized_values(values, opt, momentum_denom)


def reversible(problem: Problem, steps: int, values: dict | None = None, *,
               headroom_bits: int = 10, momentum_denom: int = rsgd.MOMENTUM_DENOM,
               initial_grad: bool = False, inputs_grad: bool = False) -> HypergradResult:
    """dE(θ_T)/dλ by exact reversal of SGD with momentum (Maclaurin et al. 2015, Alg. 2);
    initial_grad / inputs_grad add dE/dθ_0 (and per-layer initial-scale gradients) and
    dE/dX_train to the stats."""
    values, mu_used = prepare(problem, values, momentum_denom, headroom_bits)
    if inputs_grad and getattr(problem.train_data, "x", None) is None:
        raise HyperparameterError("inputs_grad=True needs the training set as tensors")
    engine = ReversibleEngine(problem, steps, values, headroom_bits=headroom_bits,
                              denom=momentum_denom, initial_grad=initial_grad,
                              inputs_grad=inputs_grad)
    with CostMeter(problem.device) as meter:
        value, grads = run(engine, problem, int(steps), values, meter)
        meter.hvps = engine.hvps
    if not engine.stats["reversal_exact"]:
        # a gradient recomputed with different bits (another thread count, a kernel that
        # rounds differently with create_graph) sends the reversal off the forward trajectory
        warnings.warn("method='reversible' did not recover the initial weights bit for bit; "
                      "the hypergradient was taken along another trajectory and is unreliable",
                      RuntimeWarning, stacklevel=2)
    stats = meter.stats(method="reversible", steps=int(steps), momentum_used=mu_used,
                        momentum_denom=momentum_denom, **engine.stats)
    return finish(problem, values, value, grads, stats)
