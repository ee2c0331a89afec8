"""Self-tuning networks: best-response layers, augmentations, the trainer and its checkpoints."""

import pytest
import torch
from torch import nn

import hyperdescent as hd
from hyperdescent import stn
from hyperdescent.errors import DataError, HyperparameterError

D = torch.float64


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def _nonzero_hnet(layer, seed=3):
    with torch.no_grad():
        for m in layer.modules():
            if hasattr(m, "hnet"):
                m.hnet.weight.copy_(_x(*m.hnet.weight.shape, seed=seed))
    return layer


# -- layers ----------------------------------------------------------------------------------
def test_zero_correction_equals_plain_linear_and_conv():
    torch.manual_seed(0)
    lin = nn.Linear(5, 4).double()
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2).double()
    h = _x(6, 2, seed=1)
    hl = stn.HyperLinear.from_linear(lin, 2, zero_init=True)
    hc = stn.HyperConv2d.from_conv(conv, 2, zero_init=True)
    x, xi = _x(6, 5), _x(6, 2, 7, 7)
    assert torch.equal(hl(x, h), lin(x))
    assert torch.equal(hc(xi, h), conv(xi))
    # the plain STN initialisation (not zero) differs, and differs per example
    hl2 = stn.HyperLinear.from_linear(lin, 2, zero_init=False)
    assert not torch.equal(hl2(x, h), lin(x))


def test_zero_correction_embedding_and_sequential():
    emb = stn.HyperEmbedding(7, 4, 2, zero_init=True, dtype=D)
    idx = torch.tensor([[0, 3], [6, 1]])
    assert torch.equal(emb(idx, _x(2, 2)), emb.elem(idx))
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Dropout(0.2), nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.5),
                        nn.Linear(8, 3)).double()
    space = hd.Space({"dropout_in": hd.Real(0.2, low=0, high=0.9),
                      "dropout_h": hd.Real(0.5, low=0, high=0.9)})
    model = stn.from_sequential(seq, space)
    assert model.hparam_names() == ["dropout_in", "dropout_h"]
    x = _x(4, 5)
    ctx = stn.HyperContext(hnet=_x(4, 2), values=None)
    assert torch.equal(model(x, ctx), seq.eval()(x))


def test_per_example_hparams_give_per_example_outputs():
    torch.manual_seed(0)
    layers = [_nonzero_hnet(stn.HyperLinear(5, 4, 3, dtype=D)),
              _nonzero_hnet(stn.HyperConv2d(2, 3, 3, 3, padding=1, dtype=D))]
    inputs = [_x(4, 5), _x(4, 2, 5, 5)]
    h = _x(4, 3, seed=2)
    for layer, x in zip(layers, inputs):
        out = layer(x, h)
        for i in range(4):
            torch.testing.assert_close(out[i:i + 1], layer(x[i:i + 1], h[i:i + 1]))
        # the same input under another example's λ gives another output
        same = x[:1].expand_as(x)
        o = layer(same, h)
        assert not torch.allclose(o[0], o[1])


@pytest.mark.parametrize("kind", ["linear", "conv", "embedding", "lstm"])
def test_gradient_wrt_hparams_matches_central_differences(kind):
    torch.manual_seed(0)
    h = _x(3, 2, seed=4).requires_grad_(True)
    if kind == "linear":
        layer, x = stn.HyperLinear(4, 3, 2, dtype=D), _x(3, 4)
        def f(h): return layer(x, h)
    elif kind == "conv":
        layer, x = stn.HyperConv2d(2, 2, 3, 2, dtype=D), _x(3, 2, 4, 4)
        def f(h): return layer(x, h)
    elif kind == "embedding":
        layer, x = stn.HyperEmbedding(5, 3, 2, dtype=D), torch.tensor([[1, 4], [0, 2], [3, 3]])
        def f(h): return layer(x, h)
    else:
        layer, x = stn.HyperLSTM(3, 4, 2, dtype=D), _x(3, 5, 3)
        def f(h): return layer(x, stn.HyperContext(h))[0]
    _nonzero_hnet(layer)
    assert torch.autograd.gradcheck(f, (h,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_dropout_rate_per_example_and_replayable():
    x = torch.ones(3, 2000, dtype=D)
    p = torch.tensor([0.0, 0.5, 0.9], dtype=D)
    out = stn.dropout(x, p, torch.Generator().manual_seed(0))
    assert torch.equal(out[0], x[0])
    for i in (1, 2):
        kept = (out[i] != 0).double().mean()
        assert abs(kept - (1 - p[i])) < 0.04
        assert torch.allclose(out[i][out[i] != 0], 1 / (1 - p[i]))
    again = stn.dropout(x, p, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert stn.dropout(x, None) is x


def test_from_sequential_seed_fixes_the_new_weights():
    space = hd.Space({"dropout": hd.Real(0.1, low=0, high=0.9)})
    seq = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), nn.Linear(4, 2)).double()
    a = stn.from_sequential(seq, space, centred=False, seed=5).state_dict()
    torch.manual_seed(123)
    b = stn.from_sequential(seq, space, centred=False, seed=5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_from_sequential_refuses_mismatched_dropout_names():
    seq = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1))
    with pytest.raises(HyperparameterError, match="nn.Dropout"):
        stn.from_sequential(seq, hd.Space({"noise": hd.Real(0.1, low=0, high=1)}))


# -- augmentations ---------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation", "hue", "translate",
                                "noise"])
def test_augmentation_zero_strength_is_identity_per_example(op):
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(1), dtype=D)
    s = torch.tensor([0.0, 0.4], dtype=D)
    fn = stn.augment.gaussian_noise if op == "noise" else getattr(stn.augment, op)
    out = fn(x, s, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    torch.testing.assert_close(out[0], x[0])
    assert not torch.allclose(out[1], x[1])


def test_cutout_applies_rounded_values():
    x = torch.ones(4, 1, 12, 12, dtype=D)
    holes = torch.tensor([0.4, 1.2, 1.0, 2.0], dtype=D)     # rounds to 0, 1, 1, 2
    length = torch.tensor([5.0, 2.6, 0.3, 1.0], dtype=D)    # rounds to 5, 3, 0, 1
    out = stn.augment.cutout(x, holes, length, torch.Generator().manual_seed(0))
    zeros = (out == 0).sum(dim=(1, 2, 3))
    assert zeros[0] == 0 and zeros[2] == 0
    assert 0 < zeros[1] <= 9 and 0 < zeros[3] <= 2


def test_augmentation_pipeline_names_and_errors():
    aug = stn.Augmentation(noise="noise", cutout=("holes", "length"))
    assert aug.names() == ["holes", "length", "noise"]
    x = torch.rand(2, 1, 8, 8, dtype=D)
    assert aug(x, None) is x
    with pytest.raises(HyperparameterError, match="unknown augmentation"):
        stn.Augmentation(blur="b")
    with pytest.raises(HyperparameterError, match="holes, length"):
        stn.Augmentation(cutout="holes")
    with pytest.raises(DataError, match="3-channel"):
        stn.augment.hue(x, 0.1)


# -- trainer ---------------------------------------------------------------------------------
def _problem(n=64, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    xtr, xva = torch.randn(n, d, generator=g, dtype=D), torch.randn(n // 2, d, generator=g, dtype=D)
    w = torch.randn(d, classes, generator=g, dtype=D)
    return (xtr, (xtr @ w).argmax(1)), (xva, (xva @ w).argmax(1))


def _model(centred=True):
    torch.manual_seed(1)
    seq = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)).double()
    return seq


SPACE = hd.Space({"dropout": hd.Real(0.3, low=0.0, high=0.9),
                  "noise": hd.Real(0.1, low=0.0, high=1.0)})


def _trainer(centred=True, **kw):
    train, val = _problem()
    model = stn.from_sequential(_model(), SPACE, centred=centred)
    opts = dict(batch_size=16, lr=0.05, warmup_steps=3, hyper_lr=0.05, seed=3,
                augment=stn.Augmentation(noise="noise"))
    opts.update(kw)
    return model, train, val, opts


def test_trainer_runs_and_tunes():
    model, train, val, opts = _trainer()
    tr = stn.STNTrainer(model, SPACE, train, val, **opts)
    start = tr.hparams
    tr.run(12)
    assert tr.t == 12 and tr.hyper_t == (12 - 3) // 2
    assert tr.hparams != start and set(tr.scale) == {"dropout", "noise"}
    assert len(tr.history) == 12
    assert [r["step"] for r in tr.history if "val_loss" in r] == [5, 7, 9, 11]
    sched = tr.schedule()
    assert len(sched) == 12 and sched.at(0) == pytest.approx(start)
    ev = tr.evaluate("val")
    assert 0 <= ev["acc"] <= 1 and ev["loss"] > 0


def test_penalty_coefficient_is_tunable_by_name():
    model, train, val, opts = _trainer()
    space = hd.Space({**SPACE, "l2": hd.Real(1e-3, low=1e-6, high=1.0, log=True)})
    model = stn.from_sequential(_model(), space, dropout=["dropout"], seed=0)
    tr = stn.STNTrainer(model, space, train, val, **opts,
                        regularizers={"l2": lambda m: sum((p * p).sum() for p in m.parameters())})
    tr.run(9)
    assert tr.hparams["l2"] != pytest.approx(1e-3, rel=1e-9) and 1e-6 <= tr.hparams["l2"] <= 1


def test_schedule_replays_dropout_in_a_plain_model():
    model, train, val, opts = _trainer()
    tr = stn.STNTrainer(model, SPACE, train, val, **opts).run(9)
    sched = tr.schedule()
    plain = _model()
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    stn.attach_dropout(sched, plain, ["dropout"], opt)
    for t in range(9):
        assert plain[2].p == sched.at(t)["dropout"]
        opt.step()
    assert sched.at(8)["dropout"] != sched.at(0)["dropout"]
    with pytest.raises(HyperparameterError, match="nn.Dropout"):
        stn.attach_dropout(sched, plain, ["dropout", "noise"], opt)


def test_centred_model_predicts_with_its_elementary_weights():
    model, train, val, opts = _trainer(centred=True)
    tr = stn.STNTrainer(model, SPACE, train, val, **opts)
    tr.run(10)
    # the correction has learnt something, yet vanishes at the current λ
    assert any(m.hnet.weight.abs().sum() > 0 for m in model.layers if hasattr(m, "hnet"))
    plain = nn.Sequential(*[m.elem if hasattr(m, "elem") else
                            (nn.Identity() if isinstance(m, stn.HyperDropout) else m)
                            for m in model.layers])
    x = train[0][:5]
    torch.testing.assert_close(tr.predict(x), plain(x), rtol=0, atol=0)
    # the uncentred STN does not have that property
    m2, *_ = _trainer(centred=False)
    tr2 = stn.STNTrainer(m2, SPACE, train, val, **opts)
    tr2.run(10)
    plain2 = nn.Sequential(*[m.elem if hasattr(m, "elem") else
                             (nn.Identity() if isinstance(m, stn.HyperDropout) else m)
                             for m in m2.layers])
    assert not torch.allclose(tr2.predict(x), plain2(x))


def test_hyper_step_gradient_matches_central_differences():
    model, train, val, opts = _trainer(centred=False, perturb=False)
    tr = stn.STNTrainer(model, SPACE, train, val, **opts)
    tr.run(6)
    _nonzero_hnet(model)
    x, y = val
    lam = tr.meta.values()["lambda"].clone().requires_grad_(True)

    def val_loss(lam):
        ctx = stn.HyperContext(lam.expand(len(x), -1), None)
        model.eval()
        return torch.nn.functional.cross_entropy(model(x, ctx), y)

    g, = torch.autograd.grad(val_loss(lam), lam)
    eps = 1e-6
    fd = torch.stack([(val_loss(lam.detach() + eps * e) - val_loss(lam.detach() - eps * e))
                      / (2 * eps) for e in torch.eye(len(lam), dtype=D)])
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-9)
    assert g.abs().sum() > 0


@pytest.mark.parametrize("name", ["lr", "momentum", "weight_decay"])
def test_optimizer_hparams_refused_with_pointer_to_online_tuner(name):
    model, train, val, opts = _trainer()
    space = hd.Space({"dropout": hd.Real(0.3, low=0, high=0.9),
                      "noise": hd.Real(0.1, low=0, high=1),
                      name: hd.Real(0.1, low=1e-4, high=1.0, log=True)})
    with pytest.raises(HyperparameterError, match="hd.OnlineTuner"):
        stn.STNTrainer(model, space, train, val, **opts)


def test_space_errors_name_the_input():
    model, train, val, opts = _trainer()
    with pytest.raises(HyperparameterError, match="'holes'.*Int"):
        stn.STNTrainer(model, hd.Space({**SPACE, "holes": hd.Int(1, 0, 3)}), train, val, **opts)
    with pytest.raises(HyperparameterError, match="'extra' is used by no"):
        stn.STNTrainer(model, hd.Space({**SPACE, "extra": hd.Real(0.1, low=0, high=1)}),
                       train, val, **opts)
    with pytest.raises(HyperparameterError, match="does not declare"):
        stn.STNTrainer(model, hd.Space({"dropout": SPACE["dropout"]}), train, val, **opts)
    with pytest.raises(HyperparameterError, match="grad_clip"):
        stn.STNTrainer(model, SPACE, train, val, grad_clip=0, **opts)


def test_save_load_mid_run_is_bit_identical(tmp_path):
    model, train, val, opts = _trainer()
    full = stn.STNTrainer(model, SPACE, train, val, **opts).run(14)
    ck = tmp_path / "stn.pt"
    m1, *_ = _trainer()
    stn.STNTrainer(m1, SPACE, train, val, **opts).run(8, checkpoint=ck, checkpoint_every=4)
    m2, *_ = _trainer()
    resumed = stn.STNTrainer.load(ck, m2, SPACE, train, val, **opts)
    assert resumed.t == 8
    resumed.run(14)
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert full.hparams == resumed.hparams and full.scale == resumed.scale
    assert full.history == resumed.history
    with pytest.raises(HyperparameterError, match="other settings"):
        stn.STNTrainer.load(ck, _trainer()[0], SPACE, train, val, **{**opts, "tau": 0.5})


def test_rollback_on_non_finite_loss():
    model, train, val, opts = _trainer()
    calls = {"n": 0}

    def loss(out, y):
        calls["n"] += model.training
        value = torch.nn.functional.cross_entropy(out, y)
        return value * float("nan") if calls["n"] == 9 else value

    tr = stn.STNTrainer(model, SPACE, train, val, loss=loss, **opts)
    tr.run(10)
    events = [r for r in tr.history if r.get("event") == "rollback"]
    assert len(events) == 1 and events[0]["from_step"] == 9 and tr.t == 10
    assert len(tr.schedule()) == 10
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- text ------------------------------------------------------------------------------------
def test_ptb_loader_reads_the_format(tmp_path):
    (tmp_path / "ptb.train.txt").write_text(" the cat sat <unk> \n\n a dog sat \n")
    (tmp_path / "ptb.valid.txt").write_text(" the dog ran \n")
    (tmp_path / "ptb.test.txt").write_text(" a cat \n")
    ids, vocab = stn.text.load_ptb(tmp_path)
    assert vocab == sorted(["the", "cat", "sat", "<unk>", "<eos>", "a", "dog"])
    words = [vocab[i] for i in ids["train"]]
    assert words == ["the", "cat", "sat", "<unk>", "<eos>", "a", "dog", "sat", "<eos>"]
    assert [vocab[i] for i in ids["valid"]] == ["the", "dog", "<unk>", "<eos>"]  # ran -> <unk>
    (tmp_path / "ptb.char.train.txt").write_text("a _ b\n")
    (tmp_path / "ptb.char.valid.txt").write_text("b\n")
    (tmp_path / "ptb.char.test.txt").write_text("c\n")
    with pytest.raises(DataError, match="'c'"):
        stn.text.load_ptb(tmp_path, level="char")
    with pytest.raises(DataError, match="lacks"):
        stn.text.load_ptb(tmp_path / "nowhere")


def test_char_lm_on_python_corpus_trains_with_stn():
    text = stn.text.python_corpus(max_chars=3000)
    assert len(text) == 3000
    ids, vocab = stn.text.char_splits(text, (0.8, 0.1, 0.1))
    assert sum(len(v) for v in ids.values()) == 3000
    train, val = stn.text.windows(ids["train"], 20), stn.text.windows(ids["valid"], 20)
    names = ["dropout_emb", "dropout_in", "dropout_hid", "dropout_out"]
    space = hd.Space({n: hd.Real(0.2, low=0.0, high=0.9) for n in names})
    model = stn.text.hyper_lstm_lm(len(vocab), 4, embed=8, hidden=12, seed=0, dtype=D)
    tr = stn.STNTrainer(model, space, train, val, loss=stn.text.lm_loss, batch_size=8,
                        lr=0.5, momentum=0.0, warmup_steps=2, grad_clip=1.0, seed=0)
    before = tr.evaluate("val")["loss"]
    tr.run(8)
    assert tr.hyper_t == 3 and tr.evaluate("val")["loss"] < before


# -- experiment harness ----------------------------------------------------------------------
def test_compare_runs_kind_stn_beside_random_search(tmp_path):
    import json

    from hyperdescent.errors import ConfigError
    from hyperdescent.experiment import compare, validate_config

    cfg = validate_config({
        "name": "stn-tiny", "task": "digits_logreg", "seeds": [0], "steps": 24,
        "budget": {"trials": 1},
        "methods": [{"label": "STN", "kind": "stn",
                     "settings": {"dropout": 0.2, "noise": 0.1, "warmup_steps": 4,
                                  "eval_every": 8}},
                    {"label": "random", "kind": "random"}]})
    path = compare(cfg, out=tmp_path / "r", progress=False)
    summary = json.loads((path / "summary.json").read_text())
    assert summary["complete"] and set(summary["methods"]) == {"STN", "random"}
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    end = [r for r in records if r["kind"] == "run_end" and r["method"] == "STN"][0]
    assert end["inner_steps"] == 24 and end["hyper_steps"] == 10
    assert set(end["final_hparams"]) == {"dropout0", "noise"}
    assert "| STN |" in (path / "report.md").read_text()
    with pytest.raises(ConfigError, match="settings.meta_lr"):
        validate_config({"task": "digits_logreg", "budget": {"trials": 1},
                         "methods": [{"label": "S", "kind": "stn",
                                      "settings": {"meta_lr": 0.1}}]})
