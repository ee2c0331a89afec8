"""The inner problem: binds a model, loss, optimizer, space and replayable data into Φ and E.

One inner step is the pure function s_{t+1} = Φ(s_t, batch_t, λ_t) (docs/architecture.md), with
s = (weights, optimizer state, buffers); E is the validation loss of the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import functional_call

from . import autodiff, validate
from . import distributed as dp
from .data import Batch, ReplayableBatches, StreamBatches, as_tensor_pair
from .errors import DataError, HyperdescentError, HyperparameterError, NonFiniteError
from .metrics import evaluate_outputs
from .optim import SGD
from .optim.base import FlatViews, Optimizer, common_base, tensor_state, with_tensor_state
from .space import Space

Params = dict[str, torch.Tensor]

#: hyperparameter names the problem itself uses (docs/architecture.md, "Reserved hyperparameters")
RESERVED = {"init_scale": "the scale of the initial weights (global, per layer or per weight)",
            "train_inputs": "the training inputs (the whole training set as one batch)"}


def _tensor_slots(model: torch.nn.Module) -> dict[str, tuple[dict, str]]:
    """For each parameter and buffer name, the registry dict and key that hold it."""
    slots = {}
    for kind, named in (("_parameters", model.named_parameters()),
                        ("_buffers", model.named_buffers())):
        for name, _ in named:
            owner, _, key = name.rpartition(".")
            slots[name] = (getattr(model.get_submodule(owner), kind), key)
    return slots


@dataclass
class InnerState:
    """s_t: weights, optimizer state (step counter + tensors), BatchNorm-like buffers, step t."""

    params: Params
    opt: dict[str, Any]
    buffers: Params
    t: int = 0
    extra: dict = field(default_factory=dict)

    def tensors(self) -> dict[str, Params]:
        """The differentiable part of the state: weights and optimizer tensors."""
        return {"params": self.params, **tensor_state(self.opt)}

    def replace_tensors(self, tensors: Mapping[str, Params]) -> InnerState:
        """A copy with the differentiable part replaced (the inverse of `tensors`)."""
        opt = with_tensor_state(self.opt, {k: v for k, v in tensors.items() if k != "params"})
        return InnerState(dict(tensors["params"]), opt, self.buffers, self.t, dict(self.extra))

    def detached(self) -> InnerState:
        """A copy cut from any autograd graph."""
        return self.replace_tensors(
            {k: {n: x.detach() for n, x in d.items()} for k, d in self.tensors().items()})

    def clone(self) -> InnerState:
        """A deep copy of every tensor (for snapshots and rollback)."""
        cl = {k: {n: x.detach().clone() for n, x in d.items()} for k, d in self.tensors().items()}
        out = self.replace_tensors(cl)
        out.buffers = {n: b.clone() for n, b in self.buffers.items()}
        return out

    def as_record(self) -> dict[str, Any]:
        """The state as plain dicts of tensors and ints (what a state record stores)."""
        return {"params": dict(self.params.items()),
                "opt": {k: dict(v.items()) if isinstance(v, dict) else v
                        for k, v in self.opt.items()},
                "buffers": dict(self.buffers.items()), "t": self.t}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> InnerState:
        """The inverse of `as_record`."""
        return cls(dict(record["params"]), dict(record["opt"]), dict(record["buffers"]),
                   int(record["t"]))


class Problem:
    """A model, a loss, a differentiable optimizer, a space and replayable train/val data.

    `loss(model_output, target)` is the per-batch loss; `regularizer(params, hp)` is added to
    the training loss. BatchNorm running statistics are carried as state and updated in
    training mode, never differentiated. dtype and device follow the model. With
    distributed=True (under torchrun, or in an initialized process group) each rank takes its
    1/world share of every batch and `reduce` averages every derivative over the ranks, so all
    ranks keep rank 0's initial weights and the same trajectory (BatchNorm statistics stay per
    rank).
    """

    def __init__(self, model: torch.nn.Module, loss: Callable = torch.nn.functional.cross_entropy,
                 optimizer: Optimizer | None = None, space: Space | None = None, train=None,
                 val=None, batch_size: int = 128, val_batch_size: int = 512, seed: int = 0,
                 regularizer: Callable | None = None, test=None, eval_mode: bool = True,
                 distributed: bool = False):
        validate.check_problem_args(model, loss, optimizer, space, batch_size, val_batch_size,
                                    seed, regularizer)
        if train is None or val is None:
            raise DataError("hd.Problem needs both train= and val= datasets")
        self.model = model
        self.distributed = dp.setup(model) if distributed else False
        self.loss_fn = loss
        self.optimizer = optimizer if optimizer is not None else SGD(lr=0.1)
        self.space = space if space is not None else Space({})
        self.regularizer = regularizer
        self.seed = int(seed)
        self.eval_mode = eval_mode
        first = next(model.parameters(), None)
        if first is None:
            raise HyperparameterError("the model has no parameters to train")
        self.dtype, self.device = first.dtype, first.device
        self.params0: Params = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.buffers0: Params = {n: b.detach().clone() for n, b in model.named_buffers()}
        # functional_call's untying pass is a measurable share of a small model's forward; skip it when
        # no tensor is registered under two names
        self._tied = (len(list(model.named_parameters(remove_duplicate=False))) != len(self.params0)
                      or len(list(model.named_buffers(remove_duplicate=False)))
                      != len(self.buffers0))
        self._slots = None if self._tied or torch.nn.utils.parametrize.is_parametrized(model) \
            else _tensor_slots(model)
        self.bound = self.space.bind(model)
        tuned = [n for n in self.bound.real_names() if n in self.optimizer.hyperparameter_names]
        self.optimizer = self.optimizer.specialized(
            scalar_hparams=all(self.space[n].per == "global" for n in tuned), tuned=tuned)
        self._natural = self.bound.initial(dtype=self.dtype, device=self.device)
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.train_data = self._batches(train, "train", batch_size, stream=0)
        self.val_data = self._batches(val, "val", val_batch_size, stream=1)
        self.test_data = None if test is None else self._batches(test, "test", val_batch_size, 2)
        self._training: bool | None = None
        self.compiled_steps: dict = {}  # torch.compile'd step functions built for this problem
        self._check_space_names()
        if "train_inputs" in self.bound.names():
            self._natural["train_inputs"] = self._train_inputs_value()
        validate.check_data(self)

    # -- data ----------------------------------------------------------------------------
    def _batches(self, data, name, batch_size, stream):
        pair = as_tensor_pair(data, name, self.device, self.dtype)
        if pair is None:
            return StreamBatches(data, name, self.device, self.dtype)
        return ReplayableBatches(*pair, batch_size=batch_size, seed=self.seed, stream=stream)

    @property
    def replayable(self) -> bool:
        return isinstance(self.train_data, ReplayableBatches)

    def require_replayable(self, method: str) -> None:
        """Refuse streaming data for methods that must replay batches (reverse, truncated...)."""
        if not self.replayable:
            raise DataError(
                f"method {method!r} must replay training batches, but train= is an iterable "
                f"(e.g. a DataLoader); give an (X, Y) tensor pair or an indexable dataset, or use "
                f"method='forward' / 'greedy' / hd.OnlineTuner")

    def train_batch(self, t: int) -> Batch:
        """Training batch t (a pure function of (seed, t) for tensor data)."""
        return dp.shard(self.train_data(t), "train") if self.distributed else self.train_data(t)

    def val_batch(self, t: int) -> Batch:
        """Validation batch t (the whole set when val_batch_size >= len(val))."""
        return dp.shard(self.val_data(t), "val") if self.distributed else self.val_data(t)

    # -- hyperparameters -------------------------------------------------------------------
    def _check_space_names(self):
        used = set(self.optimizer.hyperparameter_names) | set(RESERVED)
        for name in RESERVED:
            if name in self.bound.names() and (not self.space[name].differentiable
                                       or self.space[name].schedule is not None
                                       or (name == "train_inputs"
                                           and self.space[name].per != "global")):
                raise HyperparameterError(
                    f"hyperparameter {name!r} is reserved for {RESERVED[name]}: declare it "
                    f"hd.Real without a schedule (train_inputs: per='global', its value the "
                    f"inputs' shape)")
        for name in self.bound.real_names():
            if name not in used and self.regularizer is None:
                raise HyperparameterError(
                    f"hyperparameter {name!r} is used neither by the optimizer "
                    f"{type(self.optimizer).__name__} (which takes {sorted(used)}) nor by a "
                    f"regularizer; rename it or pass regularizer=")

    @property
    def hparams(self) -> dict:
        """Current natural values, in the value shapes of `hd.Space` (a 0-d tensor, (K,) under a
        schedule, or a dict by parameter name for per="layer"/"parameter")."""
        return {n: ({p: x.clone() for p, x in v.items()} if isinstance(v, dict)
                    else v.clone() if isinstance(v, torch.Tensor) else v)
                for n, v in self._natural.items()}

    def set_hparams(self, values: Mapping[str, Any]) -> None:
        """Set some or all hyperparameters (natural units); out-of-bounds values are refused."""
        self._natural.update(self.bound.coerce(values, self._natural))

    @property
    def raw_hparams(self) -> dict:
        """Current raw (unconstrained) coordinates of the Real hyperparameters."""
        return self.bound.to_raw(self.real_hparams())

    def set_raw_hparams(self, raw: Mapping[str, Any]) -> None:
        """Set hyperparameters from raw coordinates (projected inside the bounds)."""
        nat = self.bound.to_natural(self.bound.project_raw(raw))
        self._natural.update({n: v for n, v in nat.items()})

    def real_hparams(self) -> dict:
        """Natural values of the differentiable (Real) hyperparameters only."""
        return {n: v for n, v in self._natural.items() if self.bound.space[n].differentiable}

    def hp_at(self, values: Mapping[str, Any], t: int, horizon: int) -> dict:
        """The hyperparameter values step t of a `horizon`-step run uses."""
        return self.bound.at_step(values, t, horizon)

    # -- the pure functions Φ and E --------------------------------------------------------
    def _set_mode(self, training: bool):
        if self._training is not training:
            self.model.train(training)
            self._training = training

    def forward(self, params: Params, buffers: Params, x: torch.Tensor, training: bool):
        """Model output for weights `params`; in training mode buffers are updated in place."""
        self._set_mode(training)
        if self._slots is None or torch.compiler.is_compiling() or \
                len(params) + len(buffers) != len(self._slots):
            return functional_call(self.model, (params, buffers), (x,), tie_weights=self._tied)
        # what functional_call does for an untied, unparametrized model, minus its generality:
        # a sizeable share of a small MLP's forward
        swaps = [(*self._slots[n], t) for d in (params, buffers) for n, t in d.items()]
        saved = [(table, key, table[key]) for table, key, _ in swaps]
        try:
            for table, key, t in swaps:
                table[key] = t
            return self.model(x)
        finally:
            for table, key, old in saved:
                table[key] = old

    def train_loss(self, params: Params, buffers: Params, batch: Batch, hp: Mapping[str, Any]
                   ) -> tuple[torch.Tensor, Params]:
        """Training loss (plus regularizer) of a batch, and the updated buffers."""
        # None stands for BatchNorm running statistics left out (batch statistics only)
        new_buffers = {n: None if b is None else b.clone() for n, b in buffers.items()}
        x, y = batch
        if "train_inputs" in hp:  # the whole training set, its inputs a hyperparameter
            x = hp["train_inputs"]
        loss = self.loss_fn(self.forward(params, new_buffers, x, True), y)
        if self.regularizer is not None:
            loss = loss + self.regularizer(params, hp)
        return loss, new_buffers

    def val_loss(self, params: Params, buffers: Params, batch: Batch) -> torch.Tensor:
        """E: validation loss of a batch (eval mode unless eval_mode=False; buffers untouched)."""
        x, y = batch
        if self.eval_mode:
            out = self.forward(params, buffers, x, False)
        else:
            out = self.forward(params, {n: b.clone() for n, b in buffers.items()}, x, True)
        loss = self.loss_fn(out, y)
        return dp.mean_all_reduce([loss])[0] if self.distributed else loss

    def _train_inputs_value(self) -> torch.Tensor:
        data = self.train_data
        if not isinstance(data, ReplayableBatches) or not data.full or self.distributed:
            raise HyperparameterError(
                "hyperparameter 'train_inputs' (the training inputs) needs the training set as "
                "tensors in one batch (batch_size >= len(train)) in one process")
        return data.x.detach().clone()

    def initial_params(self, hp: Mapping[str, Any] | None = None) -> Params:
        """θ_0: the model's initial weights, scaled by the "init_scale" hyperparameter when
        the space has one (Maclaurin, Duvenaud & Adams 2015, "Gradient-based hyperparameter
        optimization through reversible learning", Sec. 3.3); hp: values (else the current)."""
        scale = (hp if hp is not None and "init_scale" in hp else self._natural).get("init_scale")
        if scale is None or "init_scale" not in self.bound.names():
            return dict(self.params0)
        return {n: p * (scale[n] if isinstance(scale, dict) else scale)
                for n, p in self.params0.items()}

    def init_state(self, params: Params | None = None, hp: Mapping[str, Any] | None = None
                   ) -> InnerState:
        """s_0: the model's initial weights (`initial_params(hp)` unless `params` is given), a
        fresh optimizer state, the initial buffers."""
        params = {n: p.clone() for n, p in (params or self.initial_params(hp)).items()}
        opt = self.optimizer.init(params, hp_names=self.bound.real_names())
        return InnerState(params, opt, {n: b.clone() for n, b in self.buffers0.items()}, 0)

    # -- the one gradient seam ----------------------------------------------------------
    # Every derivative of a training or validation loss in the library goes through `vjp`
    # (training gradients, Hessian-vector rows, mixed ∂²L/∂θ∂λ rows, validation gradients,
    # implicit's products), so that data parallelism is one all-reduce here and nowhere else.
    def reduce(self, tensors: tuple) -> tuple:
        """Combine per-process derivatives (identity in one process; a mean all-reduce under
        data parallelism, where each process holds its share of every batch)."""
        return dp.mean_all_reduce(tensors) if self.distributed else tensors

    def vjp(self, outputs, inputs, grad_outputs, retain_graph: bool = False,
            create_graph: bool = False, batched: bool = False) -> tuple[torch.Tensor | None, ...]:
        """Σ_i grad_outputs[i]ᵀ ∂outputs[i]/∂inputs of losses of this problem (None where an
        input is not reached): the one place derivatives of the losses are taken. batched=True:
        every grad_output has a leading batch dimension and the products come stacked
        (one vmapped backward, `is_grads_batched`)."""
        if self.distributed:
            outputs = dp.local_outputs(outputs)
        if batched:
            return self.reduce(torch.autograd.grad(
                outputs, inputs, grad_outputs, retain_graph=retain_graph,
                create_graph=create_graph, allow_unused=True, is_grads_batched=True))
        return self.reduce(autodiff.vjp(outputs, inputs, grad_outputs, retain_graph,
                                        create_graph))

    def grad(self, loss: torch.Tensor, inputs, create_graph: bool = False,
             retain_graph: bool | None = None) -> tuple[torch.Tensor | None, ...]:
        """∂loss/∂inputs of a scalar loss of this problem, through `vjp`."""
        keep = create_graph if retain_graph is None else retain_graph
        return self.vjp((loss,), inputs, (torch.ones_like(loss),), keep, create_graph)

    def train_grad(self, params: Params, buffers: Params, batch: Batch, hp: Mapping[str, Any],
                   create_graph: bool = False, wrt: Mapping[str, torch.Tensor] | None = None):
        """(training loss, ∇_θ L as a dict, updated buffers, ∂L/∂wrt as a dict): `params` (and
        `wrt`) must require grad; with create_graph=True the gradients stay differentiable,
        so Hessian-vector rows are `vjp`s of them."""
        wrt = wrt or {}
        with torch.enable_grad():
            loss, new_buffers = self.train_loss(params, buffers, batch, hp)
            got = self.grad(loss, list(params.values()) + list(wrt.values()),
                            create_graph=create_graph)
        if self.distributed:
            loss = dp.mean_value(loss)
        return (loss, dict(zip(params, got[:len(params)])), new_buffers,
                dict(zip(wrt, got[len(params):])))

    def val_grad(self, params: Params, buffers: Params, batch: Batch,
                 wrt: Mapping[str, torch.Tensor] | None = None):
        """(E, ∇_θ E as a dict with zeros where E does not reach, ∂E/∂wrt as a dict) of a
        validation batch, without a graph."""
        wrt = wrt or {}
        params = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        with torch.enable_grad():
            value = self.val_loss(params, buffers, batch)
            got = self.grad(value, list(params.values()) + list(wrt.values()))
        grads = {n: torch.zeros_like(p) if g is None else g
                 for (n, p), g in zip(params.items(), got)}
        return value.detach(), grads, dict(zip(wrt, got[len(params):]))

    def step(self, state: InnerState, batch: Batch, hp: Mapping[str, Any],
             create_graph: bool = False) -> tuple[InnerState, torch.Tensor]:
        """Φ: one optimizer step on the training loss; returns (s_{t+1}, training loss).

        With create_graph=True the result stays differentiable w.r.t. s_t and every tensor in
        `hp` (reverse mode); otherwise the step runs without building a graph.
        """
        params = state.params
        if not create_graph:
            params = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        elif any(not p.requires_grad for p in params.values()):
            params = {n: p if p.requires_grad else p.detach().requires_grad_(True)
                      for n, p in params.items()}
        with torch.enable_grad():
            loss, buffers = self.train_loss(params, state.buffers, batch, hp)
            flat = common_base(params) if create_graph else None
            if flat is not None:
                # weights kept as views of one vector (a flat optimizer step made them): one
                # gradient vector instead of one per parameter, with no concatenation later
                grads = FlatViews(self.grad(loss, [flat], create_graph=True)[0], params)
            else:
                grads = dict(zip(params, self.grad(loss, list(params.values()),
                                                   create_graph=create_graph)))
        # (a gradient w.r.t. the whole vector is never None: nothing to check, and reading
        # FlatViews would make the views that it exists to skip)
        unused = [] if flat is not None else [n for n, g in grads.items() if g is None]
        if unused:
            raise HyperdescentError(
                f"parameter(s) {unused} do not affect the training loss; freeze them "
                f"(requires_grad=False) or leave them out of the model")
        if create_graph:
            new_params, new_opt = self.optimizer.update(params, state.opt, grads, hp)
        else:
            with torch.no_grad():
                hp_d = {k: (v.detach() if isinstance(v, torch.Tensor) else
                            {p: x.detach() for p, x in v.items()} if isinstance(v, dict) else v)
                        for k, v in hp.items()}
                new_params, new_opt = self.optimizer.update(
                    {n: p.detach() for n, p in params.items()}, state.opt, grads, hp_d)
        loss = dp.mean_value(loss.detach()) if self.distributed else loss.detach()
        return InnerState(new_params, new_opt, buffers, state.t + 1), loss

    def evaluate(self, params: Params, buffers: Params, which: str = "val") -> dict[str, float]:
        """Loss and accuracy of the whole val or test split (no graph)."""
        data = self.val_data if which == "val" else self.test_data
        if data is None or not isinstance(data, ReplayableBatches):
            raise DataError(f"no {which} split held as tensors to evaluate")
        with torch.no_grad():
            out = self.forward(params, buffers, data.x, False if self.eval_mode else True)
            return evaluate_outputs(out, data.y, self.loss_fn)

    def write_weights(self, params: Params, buffers: Params | None = None) -> torch.nn.Module:
        """Copy weights (and buffers) into `self.model` and return it."""
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(params[n])
            if buffers:
                for n, b in self.model.named_buffers():
                    b.copy_(buffers[n])
        return self.model


def check_finite(value: torch.Tensor, what: str) -> None:
    """Raise NonFiniteError naming `what` when a tensor holds NaN or inf."""
    if not torch.isfinite(value).all():
        raise NonFiniteError(f"{what} is not finite ({value.detach().flatten()[:4].tolist()})")
