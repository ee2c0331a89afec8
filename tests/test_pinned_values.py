"""Pins an OHO run, a forward and a reverse hypergradient to the exact values the code gave
before the core-seams refactor (float.hex, CPU, float64): a refactor must keep them bit for bit."""

import json
from pathlib import Path

import torch
from helpers import data, mlp

import hyperdescent as hd

PINNED = Path(__file__).parent / "data" / "pinned_values.json"


def _problem(optimizer=None):
    x, y = data(n=64)
    space = hd.Space({"lr": hd.Real(0.05, low=1e-4, high=1.0, log=True),
                      "weight_decay": hd.Real(1e-3, low=1e-6, high=0.1, log=True, per="layer"),
                      "momentum": hd.Real(0.9, low=0.0, high=0.99)})
    return hd.Problem(mlp(), optimizer=optimizer or hd.optim.SGD(), space=space,
                      train=(x, y), val=(x[:24] + 0.1, y[:24]), test=(x[24:], y[24:]),
                      batch_size=16, seed=1)


def _flat(values) -> list[str]:
    out = []
    for k in sorted(values):
        v = values[k]
        if isinstance(v, dict):
            for p in sorted(v):
                out += [float(x).hex() for x in v[p].reshape(-1)]
        else:
            out += [float(x).hex() for x in torch.as_tensor(v).reshape(-1)]
    return out


def current_values() -> dict:
    """The values the pin test compares: one OHO run, forward and reverse hypergradients."""
    out = {}
    for method in ("forward", "reverse"):
        res = hd.hypergrad(_problem(), steps=7, method=method)
        out[method] = {"value": float(res.value).hex(), "grad": _flat(res.grad),
                       "raw_grad": _flat(res.raw_grad)}
    p = _problem()
    # the meta-Adam betas of the pinned run (pins guard refactors, not defaults)
    tuner = hd.OnlineTuner(p, meta_optimizer="adam", meta_lr=0.05, reset_every=5,
                           meta_betas=(0.9, 0.999))
    tuner.run(12)
    out["oho"] = {"hparams": _flat(tuner.hparams),
                  "train_loss": [float(r["train_loss"]).hex() for r in tuner.history],
                  "val_loss": [float(r["val_loss"]).hex() for r in tuner.history],
                  "weights": _flat({n: t for n, t in tuner.state.params.items()})}
    adam_space = hd.Space({"lr": hd.Real(0.01, low=1e-4, high=1.0, log=True),
                           "beta1": hd.Real(0.9, low=0.0, high=0.99)})
    x, y = data(n=64)
    adam = hd.Problem(mlp(), optimizer=hd.optim.Adam(), space=adam_space, train=(x, y),
                      val=(x[:24] + 0.1, y[:24]), batch_size=16, seed=1)
    tuner = hd.OnlineTuner(adam, method="truncated", window=3, meta_lr=0.05,
                           meta_betas=(0.9, 0.999))
    tuner.run(8)
    out["oho_truncated_adam"] = {"hparams": _flat(tuner.hparams),
                                 "val_loss": [float(r["val_loss"]).hex() for r in tuner.history]}
    return out


def test_values_are_bit_identical_to_the_pinned_ones():
    assert current_values() == json.loads(PINNED.read_text())


if __name__ == "__main__":  # regenerate (only when a change of values is intended and argued)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    PINNED.write_text(json.dumps(current_values(), indent=1) + "\n")
