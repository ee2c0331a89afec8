"""The online tuner's meta-step goes down the true hypergradient.

With the SGD meta-optimizer, no clipping and meta learning rate η, a meta-step moves the raw
coordinates by exactly -η · dE/draw, so the signed hypergradient the tuner used is read back
from its public hyperparameters. It must equal `hd.hypergrad` from the same state and the same
batches (float64, 1e-9): reverse mode for the forward tuner, truncated reverse with window 1
for greedy and window K for truncated. And one small meta-step lowers the validation loss it
was computed on.
"""

import pytest
import torch
from helpers import data, mlp

import hyperdescent as hd

T = 5
ETA = 1e-2


def space(schedule=None):
    return hd.Space({
        "lr": hd.Real(0.05, low=1e-4, high=1.0, log=True, schedule=schedule),
        "weight_decay": hd.Real(1e-2, low=1e-6, high=0.5, log=True, schedule=schedule),
    })


def make_problem(sp=None):
    x, y = data(n=64)
    return hd.Problem(mlp(), optimizer=hd.optim.SGD(momentum=0.9), space=sp or space(),
                      train=(x, y), val=(x[:24] + 0.1, y[:24]), batch_size=16, seed=1)


NAMES = ("lr", "weight_decay")


def raw(values):
    """Raw (log) coordinates of natural values (floats or 0-d tensors)."""
    return torch.tensor([float(torch.as_tensor(values[n], dtype=torch.float64).log()) for n in NAMES],
                        dtype=torch.float64)


def signed_raw_hypergrad(before, after, eta=ETA):
    """The raw hypergradient an SGD meta-step of size eta took: -(after - before) / eta."""
    return -(raw(after) - raw(before)) / eta


REFERENCE = {  # tuner method, its options -> the hd.hypergrad call from the same state
    "forward": ({}, dict(method="reverse")),
    "greedy": ({}, dict(method="truncated", window=1)),
    "truncated": ({"window": 3}, dict(method="truncated", window=3)),
}


@pytest.mark.parametrize("method", sorted(REFERENCE))
def test_first_meta_step_is_minus_eta_times_the_reference_hypergradient(method):
    """hyper_every=T: the first meta-step comes after T steps at the initial values, so the
    reference is `hd.hypergrad(steps=T)` on a fresh problem with the same data and seed."""
    opts, ref_call = REFERENCE[method]
    tuner = hd.OnlineTuner(make_problem(), method=method, meta_optimizer="sgd", meta_lr=ETA,
                           clip=None, hyper_every=T, reset_every=None, **opts)
    before = tuner.hparams
    tuner.run(T)
    rec = tuner.history[-1]
    ref = hd.hypergrad(make_problem(), steps=T, **ref_call)
    ref_raw = torch.stack([ref.raw_grad[n] for n in NAMES])
    assert ref_raw.abs().min() > 1e-8  # both coordinates move
    got = signed_raw_hypergrad(before, tuner.hparams)
    assert torch.allclose(got, ref_raw, rtol=1e-9, atol=0), (got, ref_raw)
    assert rec["val_loss"] == pytest.approx(ref.value, rel=1e-12)
    assert rec["hypergrad_norm"] == pytest.approx(ref_raw.norm().item(), rel=1e-9)


@pytest.mark.parametrize("method", ["forward", "greedy"])
def test_a_later_meta_step_matches_reverse_through_the_adapted_trajectory(method):
    """hyper_every=1: every step uses different values. Reverse mode on a problem whose
    hyperparameters are a Piecewise(T) schedule holding the values each step used gives
    dE/dλ_t per step; forward's tangent sums all of them, greedy's is the last one only."""
    tuner = hd.OnlineTuner(make_problem(), method=method, meta_optimizer="sgd", meta_lr=0.05,
                           clip=None, hyper_every=1, reset_every=None)
    tuner.run(T)
    used = [r["hparams"] for r in tuner.history]
    assert used[0]["lr"] != used[-1]["lr"]  # the values did move
    ref_problem = make_problem(space(hd.Piecewise(T)))
    ref_problem.set_hparams({n: torch.tensor([u[n] for u in used], dtype=torch.float64)
                             for n in NAMES})
    ref = hd.hypergrad(ref_problem, steps=T, method="reverse")
    per_step = torch.stack([ref.grad[n] for n in NAMES])  # (names, T), natural units
    expected = per_step.sum(1) if method == "forward" else per_step[:, -1]
    # natural-unit hypergradient from the last meta-step: d raw = d nat / value (log)
    last = used[-1]
    got = signed_raw_hypergrad(last, tuner.hparams, eta=0.05) / torch.tensor(
        [last[n] for n in NAMES], dtype=torch.float64)
    assert torch.allclose(got, expected, rtol=1e-9, atol=0), (got, expected)
    assert tuner.history[-1]["val_loss"] == pytest.approx(ref.value, rel=1e-12)


def value_after(problem, hp, start_hp, steps, window):
    """E(s_T) when steps 0..T-window-1 use `start_hp` (held constant) and the last `window`
    steps use `hp`: the function of λ a truncated (or greedy, window 1) meta-step descends."""
    state = problem.init_state()
    with torch.no_grad():
        for t in range(steps):
            values = start_hp if t < steps - window else hp
            state, _ = problem.step(state, problem.train_batch(t), values)
        return problem.val_loss(state.params, state.buffers, problem.val_batch(steps)).item()


@pytest.mark.parametrize("method", sorted(REFERENCE))
@pytest.mark.parametrize("meta", ["adam", "sgd"])
def test_one_small_meta_step_lowers_the_validation_loss_it_was_computed_on(method, meta):
    opts, _ = REFERENCE[method]
    window = {"forward": T, "greedy": 1, "truncated": 3}[method]
    tuner = hd.OnlineTuner(make_problem(), method=method, meta_optimizer=meta, meta_lr=1e-3,
                           hyper_every=T, reset_every=None, **opts)
    before = tuner.hparams
    tuner.run(T)
    after = tuner.hparams
    assert all(float(after[n]) != float(before[n]) for n in NAMES)
    p = make_problem()
    e_before = value_after(p, before, before, T, window)
    e_after = value_after(p, after, before, T, window)
    assert tuner.history[-1]["val_loss"] == pytest.approx(e_before, rel=1e-12)
    assert e_after < e_before


@pytest.mark.parametrize("method", sorted(REFERENCE))
def test_meta_step_records_the_signed_hypergradient(method):
    """Each meta-step record holds "hypergrad": name -> natural-unit hypergradient."""
    opts, ref_call = REFERENCE[method]
    tuner = hd.OnlineTuner(make_problem(), method=method, hyper_every=T, reset_every=None,
                           **opts)
    tuner.run(T)
    rec = tuner.history[-1]
    ref = hd.hypergrad(make_problem(), steps=T, **ref_call)
    for n in NAMES:
        assert float(rec["hypergrad"][n]) == pytest.approx(ref.grad[n].item(), rel=1e-9), n


def test_run_sets_the_schedule_horizon_to_its_steps():
    """run(T) on a fresh tuner makes T the horizon: a Piecewise(2) learning rate uses its
    first value for steps 0..T/2-1 and its second after (meta_lr 0: the values stay put)."""
    p = make_problem(hd.Space({
        "lr": hd.Real(0.05, low=1e-4, high=1.0, log=True, schedule=hd.Piecewise(2)),
        "weight_decay": hd.Real(1e-2, low=1e-6, high=0.5, log=True)}))
    p.set_hparams({"lr": torch.tensor([0.05, 0.01], dtype=torch.float64)})
    tuner = hd.OnlineTuner(p, meta_optimizer="sgd", meta_lr=0.0).run(6)
    used = [r["hparams"]["lr"] for r in tuner.history]
    assert used == pytest.approx([0.05] * 3 + [0.01] * 3, rel=1e-12)


def test_evaluate_scores_the_tuned_weights():
    """tuner.evaluate("val") is the loss and accuracy of the tuner's current weights on the
    whole validation split (its model, evaluated here by hand)."""
    tuner = hd.OnlineTuner(make_problem(), meta_lr=0.05).run(4)
    got = tuner.evaluate("val")
    x, y = data(n=64)
    x, y = x[:24] + 0.1, y[:24]
    with torch.no_grad():
        out = tuner.model.eval()(x)
    assert got["loss"] == pytest.approx(torch.nn.functional.cross_entropy(out, y).item(),
                                        rel=1e-12)
    assert got["acc"] == pytest.approx((out.argmax(-1) == y).double().mean().item())
    fresh = make_problem().evaluate(make_problem().params0, {}, "val")
    assert got["loss"] != pytest.approx(fresh["loss"])  # the weights did train


@pytest.mark.parametrize("clip", [None, 1e-4])
def test_offline_meta_step_is_minus_eta_times_the_reverse_hypergradient(clip):
    """OfflineTuner(method="reverse", sgd): one meta-step over a whole T-step run from the
    problem's own initial weights moves raw λ by -η dE/draw (clipped to norm η·clip), records
    that hypergradient, and lowers E(s_T)."""
    off = hd.OfflineTuner(make_problem(), method="reverse", steps=T, meta_steps=1,
                          meta_optimizer="sgd", meta_lr=ETA, clip=clip, fresh_init=False,
                          reshuffle=False)
    before = off.hparams
    off.run()
    ref = hd.hypergrad(make_problem(), steps=T, method="reverse")
    ref_raw = torch.stack([ref.raw_grad[n] for n in NAMES])
    got = signed_raw_hypergrad(before, off.hparams)
    if clip is None:
        assert torch.allclose(got, ref_raw, rtol=1e-9, atol=0), (got, ref_raw)
    else:
        assert ref_raw.norm() > clip
        assert (got * ETA).norm().item() == pytest.approx(ETA * clip, rel=1e-9)
        assert torch.allclose(got / got.norm(), ref_raw / ref_raw.norm(), rtol=1e-9)
    rec = off.history[-1]
    assert rec["val_loss"] == pytest.approx(ref.value, rel=1e-12)
    for n in NAMES:
        assert float(rec["hypergrad"][n]) == pytest.approx(ref.grad[n].item(), rel=1e-9), n
    after = hd.hypergrad(make_problem(), steps=T, method="reverse", hparams=off.hparams)
    assert after.value < ref.value


def test_offline_adam_meta_step_moves_each_coordinate_by_meta_lr():
    """Adam's first step is meta_lr times the sign of the gradient in every coordinate."""
    off = hd.OfflineTuner(make_problem(), method="reverse", steps=T, meta_steps=1,
                          meta_optimizer="adam", meta_lr=ETA, fresh_init=False, reshuffle=False)
    before = off.hparams
    off.run()
    ref = hd.hypergrad(make_problem(), steps=T, method="reverse")
    step = raw(off.hparams) - raw(before)
    expected = -ETA * torch.sign(torch.stack([ref.raw_grad[n] for n in NAMES]))
    # (up to eps / |g|: Adam divides by |g| + 1e-8)
    assert torch.allclose(step, expected, rtol=1e-4), (step, expected)


def test_the_meta_step_reads_validation_batch_t():
    """val_batch_size below the validation set: the meta-step after T steps uses validation
    batch T, as hd.hypergrad does."""
    x, y = data(n=64)

    def small_val():
        return hd.Problem(mlp(), optimizer=hd.optim.SGD(momentum=0.9), space=space(),
                          train=(x, y), val=(x[:24] + 0.1, y[:24]), batch_size=16,
                          val_batch_size=8, seed=1)

    tuner = hd.OnlineTuner(small_val(), meta_optimizer="sgd", meta_lr=ETA, clip=None,
                           hyper_every=T, reset_every=None)
    before = tuner.hparams
    tuner.run(T)
    ref = hd.hypergrad(small_val(), steps=T, method="reverse")
    assert tuner.history[-1]["val_loss"] == pytest.approx(ref.value, rel=1e-12)
    got = signed_raw_hypergrad(before, tuner.hparams)
    assert torch.allclose(got, torch.stack([ref.raw_grad[n] for n in NAMES]), rtol=1e-9)
