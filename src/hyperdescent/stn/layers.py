"""Best-response layers of self-tuning networks (MacKay et al. 2019; Bae & Grosse 2020).

Every layer computes its ordinary output plus a correction modulated by a *batch* of
hypernetwork inputs h (one row per example):

    W(h) x + b(h) = [W_elem x + b_elem] + (V h) ⊙_row (W_hyper x) + (C h) ⊙ b_hyper

(MacKay, Vicol, Lorraine, Duvenaud & Grosse 2019, "Self-tuning networks", eq. 8), with the
modulation per output unit for Linear/LSTM/embedding layers and per output channel for
convolutions. With ``zero_init=True`` (the Δ-STN choice of Bae & Grosse 2020, "Δ-STN: efficient
bilevel optimization for neural networks using structured response Jacobians") V and C start at
zero, so the correction starts at zero; fed the centred input h = λ̃ - stopgrad(λ) it vanishes at
the current λ whatever V and C have learnt.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import DataError, HyperparameterError

# the reference code's init scale of the hypernetwork map (N(0, 0.01^2)) in the plain STN
_HNET_STD = 0.01


@dataclass
class HyperContext:
    """What a forward pass of an STN needs besides its input: the hypernetwork input and rates.

    `hnet` is (B, n_hparams) (or (n_hparams,), shared by the batch); `values` maps each
    hyperparameter name to its (B,) natural values, or is None when regularisation is off (the
    validation step, evaluation); `generator` draws the dropout masks. Under data parallelism
    `rows` = (start, stop, total) says which rows of a global batch of `total` examples this
    process holds: every mask is drawn for the whole batch and sliced, so the generator stays in
    step with one process on the whole batch and every example gets the same mask as there.
    """

    hnet: torch.Tensor
    values: Mapping[str, torch.Tensor] | None = None
    generator: torch.Generator | None = None
    rows: tuple[int, int, int] | None = None

    def rate(self, name: str) -> torch.Tensor | None:
        """The (B,) values of hyperparameter `name`, or None when regularisation is off."""
        if self.values is None:
            return None
        if name not in self.values:
            raise HyperparameterError(
                f"the model uses hyperparameter {name!r}, which the trainer does not provide; "
                f"it has {sorted(self.values)}")
        return self.values[name]


def _rows(mod: torch.Tensor, like: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Reshape a (B, C) or (C,) modulation to broadcast against `like` along `channel_dim`."""
    if mod.dim() == 1:
        shape = [1] * like.dim()
        shape[channel_dim] = mod.shape[0]
        return mod.view(shape)
    if mod.shape[0] != like.shape[0] and like.dim() > 1:
        raise DataError(f"the hypernetwork input has {mod.shape[0]} rows but the batch has "
                        f"{like.shape[0]} examples; give one row per example or a single vector")
    shape = [1] * like.dim()
    shape[0], shape[channel_dim] = mod.shape[0], mod.shape[1]
    return mod.view(shape)


class _HyperMixin(nn.Module):
    """The hypernetwork map h -> [V h, C h] shared by every best-response layer."""

    def _init_hnet(self, n_hparams: int, channels: int, bias: bool, zero_init: bool,
                   factory: dict) -> None:
        if not isinstance(n_hparams, int) or n_hparams < 1:
            raise HyperparameterError(f"n_hparams must be an integer >= 1, got {n_hparams!r}")
        self.n_hparams, self.channels, self.zero_init = n_hparams, channels, bool(zero_init)
        self.hnet = nn.Linear(n_hparams, channels * (2 if bias else 1), bias=False, **factory)
        with torch.no_grad():
            if zero_init:
                self.hnet.weight.zero_()
            else:
                self.hnet.weight.normal_(0.0, _HNET_STD)

    def modulation(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(V h, C h): the per-unit scales of the weight and bias corrections."""
        if h.shape[-1] != self.n_hparams:
            raise DataError(f"the hypernetwork input has {h.shape[-1]} columns; this layer was "
                            f"built for n_hparams={self.n_hparams}")
        m = self.hnet(h)
        if m.shape[-1] == self.channels:
            return m, None
        return m[..., :self.channels], m[..., self.channels:]


class HyperLinear(_HyperMixin):
    """A Linear layer whose weights respond to hyperparameters (MacKay et al. 2019, eq. 8)."""

    def __init__(self, in_features: int, out_features: int, n_hparams: int, bias: bool = True,
                 zero_init: bool = False, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.elem = nn.Linear(in_features, out_features, bias=bias, **factory)
        self.hyper = nn.Linear(in_features, out_features, bias=bias, **factory)
        self._init_hnet(n_hparams, out_features, bias, zero_init, factory)

    @classmethod
    def from_linear(cls, layer: nn.Linear, n_hparams: int, zero_init: bool = False
                    ) -> HyperLinear:
        """The best-response counterpart of `layer`, whose elementary weights are a copy of it."""
        w = layer.weight
        new = cls(layer.in_features, layer.out_features, n_hparams, bias=layer.bias is not None,
                  zero_init=zero_init, device=w.device, dtype=w.dtype)
        new.elem.load_state_dict(layer.state_dict())
        return new

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """W_elem x + b_elem + (V h) ⊙ (W_hyper x) + (C h) ⊙ b_hyper, h one row per example."""
        sw, sb = self.modulation(h)
        out = self.elem(x) + _rows(sw, x, -1) * F.linear(x, self.hyper.weight)
        if sb is not None:
            out = out + _rows(sb, x, -1) * self.hyper.bias
        return out


class HyperConv2d(_HyperMixin):
    """A Conv2d whose filters respond to hyperparameters, one scale per output channel (MacKay et al. 2019)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, n_hparams: int,
                 stride=1, padding=0, dilation=1, groups: int = 1, bias: bool = True,
                 zero_init: bool = False, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
        self.elem = nn.Conv2d(in_channels, out_channels, kernel_size, **kw, **factory)
        self.hyper = nn.Conv2d(in_channels, out_channels, kernel_size, **kw, **factory)
        self._init_hnet(n_hparams, out_channels, bias, zero_init, factory)

    @classmethod
    def from_conv(cls, layer: nn.Conv2d, n_hparams: int, zero_init: bool = False
                  ) -> HyperConv2d:
        """The best-response counterpart of `layer`, whose elementary filters are a copy of it."""
        if layer.padding_mode != "zeros":
            raise HyperparameterError(f"HyperConv2d supports padding_mode='zeros' only, got "
                                      f"{layer.padding_mode!r}")
        w = layer.weight
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, n_hparams,
                  stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                  groups=layer.groups, bias=layer.bias is not None, zero_init=zero_init,
                  device=w.device, dtype=w.dtype)
        new.elem.load_state_dict(layer.state_dict())
        return new

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """conv_elem(x) + (V h) ⊙_channel conv_hyper(x) (no bias) + (C h) ⊙ b_hyper."""
        sw, sb = self.modulation(h)
        c = self.hyper
        hx = F.conv2d(x, c.weight, None, c.stride, c.padding, c.dilation, c.groups)
        out = self.elem(x) + _rows(sw, hx, 1) * hx
        if sb is not None:
            out = out + _rows(sb, hx, 1) * c.bias.view(1, -1, 1, 1)
        return out


class HyperEmbedding(_HyperMixin):
    """An embedding table whose vectors respond to hyperparameters: E_elem[i] + (V h) ⊙ E_hyper[i] (MacKay et al. 2019)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, n_hparams: int,
                 zero_init: bool = False, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.elem = nn.Embedding(num_embeddings, embedding_dim, **factory)
        self.hyper = nn.Embedding(num_embeddings, embedding_dim, **factory)
        self._init_hnet(n_hparams, embedding_dim, False, zero_init, factory)

    def forward(self, idx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """E_elem[idx] + (V h) ⊙ E_hyper[idx], the scale per embedding dimension."""
        sw, _ = self.modulation(h)
        out = self.elem(idx)
        return out + _rows(sw, out, -1) * self.hyper(idx)


def dropout(x: torch.Tensor, p: torch.Tensor | float | None,
            generator: torch.Generator | None = None, shape: Sequence[int] | None = None,
            rows: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Inverted dropout with a rate per example (Srivastava et al. 2014); p=None is the identity.

    `p` is a float or a (B,) tensor; `shape` (default x.shape) is the mask's shape, e.g. (B, 1, H)
    for a mask shared over time (variational dropout, Gal & Ghahramani 2016). The rate gets no
    gradient through the mask: an STN learns its effect through the hypernetwork. With `rows`
    (see HyperContext) the mask is drawn for the whole global batch and rows start:stop kept.
    """
    if p is None:
        return x
    p = torch.as_tensor(p, dtype=x.dtype, device=x.device).detach()
    shape = tuple(x.shape) if shape is None else tuple(shape)
    keep = 1.0 - p.reshape(-1, *([1] * (len(shape) - 1))) if p.dim() else 1.0 - p
    if rows is None:
        u = torch.rand(shape, generator=generator, dtype=x.dtype, device=x.device)
    else:
        start, stop, total = rows
        u = torch.rand((total, *shape[1:]), generator=generator, dtype=x.dtype,
                       device=x.device)[start:stop]
    return x * ((u < keep).to(x.dtype) / keep)


class HyperDropout(nn.Module):
    """Dropout whose rate is the hyperparameter `name`, one rate per example (MacKay et al. 2019, §4)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor, ctx: HyperContext) -> torch.Tensor:
        """x with units dropped at each example's rate; the identity when regularisation is off."""
        return dropout(x, ctx.rate(self.name), ctx.generator, rows=ctx.rows)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class HyperLSTM(nn.Module):
    """A one-layer LSTM (Hochreiter & Schmidhuber 1997) whose gate weights respond to hyperparameters (MacKay et al. 2019, §5).

    Both the input-to-hidden and hidden-to-hidden maps are HyperLinear layers. `input_dropout`
    and `hidden_dropout` name hyperparameters: a dropout rate per example on the inputs and a
    variational (one mask per sequence, Gal & Ghahramani 2016) dropout on the hidden state fed
    back into the gates, which drops the same columns of W_hh for a whole sequence as weight
    drop does, but per example.
    """

    def __init__(self, input_size: int, hidden_size: int, n_hparams: int,
                 input_dropout: str | None = None, hidden_dropout: str | None = None,
                 zero_init: bool = False, device=None, dtype=None):
        super().__init__()
        kw = {"zero_init": zero_init, "device": device, "dtype": dtype}
        self.input_size, self.hidden_size = input_size, hidden_size
        self.ih = HyperLinear(input_size, 4 * hidden_size, n_hparams, **kw)
        self.hh = HyperLinear(hidden_size, 4 * hidden_size, n_hparams, bias=False, **kw)
        self.input_dropout, self.hidden_dropout = input_dropout, hidden_dropout
        with torch.no_grad():
            bound = 1.0 / math.sqrt(hidden_size)
            for lin in (self.ih.elem, self.ih.hyper, self.hh.elem, self.hh.hyper):
                for p in lin.parameters():
                    p.uniform_(-bound, bound)

    def hparam_names(self) -> list[str]:
        """The hyperparameter names this layer reads from the context."""
        return [n for n in (self.input_dropout, self.hidden_dropout) if n is not None]

    def forward(self, x: torch.Tensor, ctx: HyperContext,
                state: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Outputs (B, T, H) and the final (h, c) of a batch-first sequence x (B, T, input_size)."""
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise DataError(f"HyperLSTM expects input (batch, time, {self.input_size}), got "
                            f"{tuple(x.shape)}")
        B, T, _ = x.shape
        H = self.hidden_size
        if self.input_dropout is not None:
            x = dropout(x, ctx.rate(self.input_dropout), ctx.generator, (B, 1, x.shape[-1]),
                        ctx.rows)
        if state is None:
            h = x.new_zeros(B, H)
            c = x.new_zeros(B, H)
        else:
            h, c = state
        hid_p = ctx.rate(self.hidden_dropout) if self.hidden_dropout is not None else None
        hid_mask = None
        if hid_p is not None:
            hid_mask = dropout(x.new_ones(B, H), hid_p, ctx.generator, rows=ctx.rows)
        gx = self.ih(x, ctx.hnet)  # all time steps at once: the input map has no recurrence
        outs = []
        for t in range(T):
            hin = h if hid_mask is None else h * hid_mask
            gates = gx[:, t] + self.hh(hin, ctx.hnet)
            i, f, g, o = gates.split(H, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        return torch.stack(outs, dim=1), (h, c)


_HYPER_LAYERS = (HyperLinear, HyperConv2d, HyperEmbedding)


class STNSequential(nn.Module):
    """An nn.Sequential whose best-response layers get the hypernetwork input and whose dropouts get per-example rates (MacKay et al. 2019)."""

    def __init__(self, layers: Sequence[nn.Module], centred: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.centred = bool(centred)

    def hparam_names(self) -> list[str]:
        """The hyperparameter names the model's dropout layers read."""
        out: list[str] = []
        for m in self.layers:
            names = [m.name] if isinstance(m, HyperDropout) else getattr(m, "hparam_names",
                                                                         lambda: [])()
            out += [n for n in names if n not in out]
        return out

    def forward(self, x: torch.Tensor, ctx: HyperContext) -> torch.Tensor:
        """The network's output for a batch x under the context's hyperparameters."""
        for m in self.layers:
            if isinstance(m, _HYPER_LAYERS):
                x = m(x, ctx.hnet)
            elif isinstance(m, (HyperDropout, HyperLSTM)):
                x = m(x, ctx)
                if isinstance(x, tuple):
                    x = x[0]
            else:
                x = m(x)
        return x


def from_sequential(seq: nn.Sequential, space: Mapping | Sequence[str],
                    dropout: Sequence[str] | None = None, centred: bool = True,
                    seed: int | None = None) -> STNSequential:
    """The STN counterpart of an nn.Sequential of Linear/Conv2d/Dropout (MacKay et al. 2019, §4).

    Linear and Conv2d become HyperLinear/HyperConv2d whose elementary weights copy the originals
    (so the STN computes the plain network while its correction is zero); every nn.Dropout becomes
    a HyperDropout reading the hyperparameter named by `dropout` (in order; by default the space's
    names containing "dropout", in the space's order); other modules are kept as they are.
    `centred=True` is Δ-STN's parameterisation (Bae & Grosse 2020): corrections start at zero and
    the trainer feeds them λ̃ - stopgrad(λ). `seed` draws the new weights from a private RNG
    (None: from torch's global RNG, as torch's own layers do).
    """
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return from_sequential(seq, space, dropout, centred, None)
    if not isinstance(seq, nn.Sequential):
        raise HyperparameterError(f"from_sequential needs an nn.Sequential, got "
                                  f"{type(seq).__name__}")
    names = list(space)
    n_h = len(names)
    drops = [m for m in seq if isinstance(m, nn.Dropout)]
    if dropout is None:
        dropout = [n for n in names if "dropout" in n]
    dropout = list(dropout)
    if len(dropout) != len(drops):
        raise HyperparameterError(
            f"the model has {len(drops)} nn.Dropout layer(s) but dropout= names "
            f"{len(dropout)} hyperparameter(s) {dropout}; give one name per Dropout, in order")
    for d in dropout:
        if d not in names:
            raise HyperparameterError(f"dropout hyperparameter {d!r} is not in the space "
                                      f"{names}")
    layers: list[nn.Module] = []
    k = 0
    for m in seq:
        if isinstance(m, nn.Linear):
            layers.append(HyperLinear.from_linear(m, n_h, zero_init=centred))
        elif isinstance(m, nn.Conv2d):
            layers.append(HyperConv2d.from_conv(m, n_h, zero_init=centred))
        elif isinstance(m, nn.Dropout):
            layers.append(HyperDropout(dropout[k]))
            k += 1
        elif isinstance(m, (nn.Conv1d, nn.Conv3d, nn.RNNBase, nn.Dropout1d, nn.Dropout2d,
                            nn.Sequential)):
            raise HyperparameterError(
                f"from_sequential converts Linear, Conv2d and Dropout; got {type(m).__name__}")
        else:
            layers.append(m)
    return STNSequential(layers, centred=centred)
