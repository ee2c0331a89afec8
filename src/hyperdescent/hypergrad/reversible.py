"""Reversible learning: exact reverse-mode hypergradients without storing the trajectory.

Maclaurin, Duvenaud & Adams 2015, "Gradient-based hyperparameter optimization through
reversible learning", Algorithm 2. The forward pass runs SGD with momentum in int64 fixed
point (`optim.reversible_sgd`), keeping the bits the momentum destroys in an rANS buffer
(`coder`). The reverse pass walks the run backwards: it un-steps the weights, recomputes the
gradient at the exactly recovered weights (same batch, same device, same threads: the same
bits as forward), un-steps the velocity, and backpropagates the adjoints (dθ, dv) through
the step with one vector-Jacobian product, whose dθ part is the Hessian-vector product of
Algorithm 2 and whose dλ part collects every hyperparameter's gradient (learning rates,
momenta and weight decays, global, per layer, per element or scheduled, and regularizer
hyperparameters). At the end the initial weights, velocities and buffer are compared with
the ones the run started from, bit for bit.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ..errors import HyperparameterError
from ..optim import SGD
from ..optim import reversible_sgd as rsgd
from ..problem import Problem
from ..space import flatten, unflatten
from .coder import RansBuffer
from .common import CostMeter, HypergradResult, finish, sample_memory

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
        n = torch.round(mu * self.denom).to(torch.int64)
        return lr, wd, mu, int(n) if n.dim() == 0 else n  # an int takes the coder's fast path

    def differentiable(self, hp: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lr, weight decay, momentum) per element, in the graph of the leaves in `hp`."""
        return tuple(self.layout.lanes(self._per_name(hp, k), self.dtype, self.device,
                                       graph=True) for k in _HP)


def _detached(hp) -> dict:
    return {k: ({p: x.detach() for p, x in v.items()} if isinstance(v, dict)
                else v.detach() if isinstance(v, torch.Tensor) else v) for k, v in hp.items()}


def _flat_grad(problem: Problem, layout: rsgd.Layout, theta: torch.Tensor, batch, hp,
               create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(θ as a leaf, ∇_θ L as one flat vector): the model sees views of the one leaf, so the
    gradient is one vector and the step on it a few graph nodes, not a few per tensor."""
    leaf = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        loss, _ = problem.train_loss(layout.split(leaf), problem.buffers0, batch, hp)
        (grad,) = problem.grad(loss, [leaf], create_graph=create_graph)
    if grad is None:
        raise HyperparameterError("the training loss does not depend on the weights")
    return leaf, grad


@dataclass
class Run:
    """A reversible run after its forward pass: fixed-point state s_T and the buffer."""

    problem: Problem
    steps: int
    values: dict
    layout: rsgd.Layout
    lanes: _Lanes
    fx: rsgd.FixedPoint
    theta: torch.Tensor
    v: torch.Tensor
    buffer: RansBuffer
    theta_start: torch.Tensor
    buffer_start: tuple
    buffer_bits: int = 0


def forward_pass(problem: Problem, steps: int, values: dict, fixed_mu: float,
                 headroom_bits: int, denom: int) -> Run:
    """T exact fixed-point SGD-momentum steps (Maclaurin et al. 2015, Algorithm 1)."""
    opt, T = problem.optimizer, int(steps)
    layout = rsgd.Layout.of(problem.params0)
    lanes = _Lanes(opt, layout, fixed_mu, problem.dtype, problem.device, denom)
    theta0 = layout.flat(problem.params0).detach()
    fx = rsgd.FixedPoint.for_weights(layout, theta0, headroom_bits)
    theta = rsgd.to_fixed(theta0, fx.theta_scale, layout, "initial weights")
    v = torch.zeros_like(theta)
    expect_bits = math.log2(1.0 / fixed_mu) if fixed_mu > 0 else 1.0
    buffer = RansBuffer(layout.numel, problem.device,
                        capacity_words=int(layout.numel * T * (expect_bits + 0.01) / 32) + 1024)
    run = Run(problem, T, values, layout, lanes, fx, theta, v, buffer, theta.clone(),
              buffer.snapshot())
    values_d = _detached(values)
    for t in range(T):
        hp = problem.hp_at(values_d, t, T)
        lr, wd, mu, n = lanes(hp)
        theta_f = rsgd.to_float(theta, fx.theta_inv)
        _, g = _flat_grad(problem, layout, theta_f, problem.train_batch(t), hp)
        direction = rsgd.decayed_gradient(g, theta_f, wd)
        if t == 0:
            fx.set_velocity_range(direction, mu, headroom_bits)
        theta, v = rsgd.step(theta, v, direction, lr, n, fx, buffer, t, denom)
        if t % 64 == 0:
            sample_memory()
    run.theta, run.v, run.buffer_bits = theta, v, buffer.bits()
    sample_memory()
    return run


def reverse_pass(run: Run, initial_grad: bool = False, inputs_grad: bool = False
                 ) -> tuple[float, dict[str, torch.Tensor], bool, dict]:
    """(E(θ_T), dE/dλ per flat leaf, whether s_0 and the buffer came back bit for bit, extra
    gradients): Algorithm 2 of Maclaurin et al. 2015, the adjoints backpropagated through each
    step by one vector-Jacobian product. initial_grad adds dE/dθ_0 (Sec. 3.3's initial-weight
    scales); inputs_grad adds dE/dX of the training inputs (Sec. 3.4's learned training set)."""
    problem, T, layout, fx, lanes = run.problem, run.steps, run.layout, run.fx, run.lanes
    theta, v, buffer = run.theta, run.v, run.buffer
    theta_leaf = rsgd.to_float(theta, fx.theta_inv).requires_grad_(True)
    value, dtheta, _ = problem.val_grad(layout.split(theta_leaf), problem.buffers0,
                                        problem.val_batch(T))
    dtheta = layout.flat(dtheta)
    dv = torch.zeros_like(dtheta)
    lam = {k: x.detach().clone().requires_grad_(True) for k, x in flatten(run.values).items()}
    lam_list = list(lam.values())
    values_g = unflatten(lam, run.values)
    grads = [torch.zeros_like(x) for x in lam_list]
    data = problem.train_data
    dx = torch.zeros_like(data.x) if inputs_grad else None
    for t in range(T - 1, -1, -1):
        hp_g = problem.hp_at(values_g, t, T)
        lr, wd, _, n = lanes(_detached(hp_g))
        theta = rsgd.unstep_position(theta, v, lr, fx, t)
        batch = problem.train_batch(t)
        if inputs_grad:
            batch = (batch[0].detach().requires_grad_(True), batch[1])
        theta_f, g = _flat_grad(problem, layout, rsgd.to_float(theta, fx.theta_inv),
                                batch, hp_g, create_graph=True)
        # the forward pass took this gradient without a graph: the values are the same bits
        direction = rsgd.decayed_gradient(g.detach(), theta_f.detach(), wd)
        v = rsgd.unstep_velocity(v, direction, n, fx, buffer, t, lanes.denom)
        lr_g, wd_g, mu_g = lanes.differentiable(hp_g)
        with torch.enable_grad():
            new_v = g + wd_g * theta_f
            # v_0 = 0 and the adjoint of s_0 is not asked for: step 0 needs no Hessian product
            vel = rsgd.to_float(v, fx.v_inv).requires_grad_(True) if t > 0 else None
            if vel is not None:
                new_v = new_v + mu_g * vel
            new_theta = theta_f - lr_g * new_v
        wrt = [theta_f, vel] if vel is not None else [theta_f] if initial_grad else []
        extra = [batch[0]] if inputs_grad else []
        got = problem.vjp([new_theta, new_v], wrt + extra + lam_list, [dtheta, dv])
        if t == T - 1 or t % 64 == 0:
            sample_memory()
        if wrt:
            dtheta = got[0] if got[0] is not None else torch.zeros_like(dtheta)
        if vel is not None:
            dv = got[1] if got[1] is not None else torch.zeros_like(dv)
        if inputs_grad and got[len(wrt)] is not None:
            if data.full:
                dx += got[len(wrt)]
            else:
                dx.index_add_(0, data.indices(t), got[len(wrt)])
        for j, gj in enumerate(got[len(wrt) + len(extra):]):
            if gj is not None:
                grads[j] = grads[j] + gj
    run.theta, run.v = theta, v
    exact = bool(torch.equal(theta, run.theta_start) and not bool(v.any())
                 and buffer.matches(run.buffer_start))
    extras = {}
    if initial_grad:
        extras["initial_weights_grad"] = {k: x.clone() for k, x in layout.split(dtheta).items()}
        # d/ds of E with the layer's initial weights scaled by s, at s = 1
        extras["init_scale_grad"] = {k: float((x * problem.params0[k]).sum())
                                     for k, x in extras["initial_weights_grad"].items()}
    if inputs_grad:
        extras["train_inputs_grad"] = dx
    return float(value), dict(zip(lam, grads)), exact, extras


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
    fixed_mu = mu_used if isinstance(mu_used, float) else 0.0
    with CostMeter(problem.device) as meter:
        run = forward_pass(problem, steps, values, fixed_mu, headroom_bits, momentum_denom)
        if inputs_grad and getattr(problem.train_data, "x", None) is None:
            raise HyperparameterError("inputs_grad=True needs the training set as tensors")
        value, grads, exact, extras = reverse_pass(run, initial_grad, inputs_grad)
        meter.hvps = int(steps) if initial_grad else max(0, int(steps) - 1)
    P, T = run.layout.numel, int(steps)
    if not exact:
        # a gradient recomputed with different bits (another thread count, a kernel that
        # rounds differently with create_graph) sends the reversal off the forward trajectory
        warnings.warn("method='reversible' did not recover the initial weights bit for bit; "
                      "the hypergradient was taken along another trajectory and is unreliable",
                      RuntimeWarning, stacklevel=2)
    stats = meter.stats(
        method="reversible", steps=T, reversal_exact=exact, buffer_bits=run.buffer_bits,
        buffer_bits_per_param_step=run.buffer_bits / (P * T),
        buffer_peak_mb=(64 * P + 32 * run.buffer.peak_words) / 8 / 2 ** 20,
        momentum_used=mu_used, momentum_denom=momentum_denom, theta_radix=run.fx.theta_radix,
        velocity_radix=run.fx.v_radix, **extras)
    return finish(problem, values, value, grads, stats)
