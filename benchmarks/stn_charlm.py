"""A character-level HyperLSTM language model on text that ships with Python (pydoc_data.topics):
embedding, LSTM input, variational hidden and output dropout tuned by an STN vs a fixed grid.

Run: .venv/bin/python benchmarks/stn_charlm.py [--steps 600] [--chars 30000]
     (the 100k-character run: --chars 100000 --steps 500 --out benchmarks/results/stn_charlm_100k.json)
The fixed-dropout runs use the same model and trainer with no perturbation and no
hyperparameter steps (the centred correction is then exactly zero: a plain LSTM with per-example
dropout). Reports validation and test perplexity per character and bits per character.
Writes benchmarks/results/stn_charlm.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import hyperdescent as hd
from hyperdescent import stn

RESULTS = Path(__file__).parent / "results"
NAMES = ["dropout_emb", "dropout_in", "dropout_hid", "dropout_out"]

BENCH_ARGS = ["--steps", "600"]
BENCH_QUICK_ARGS = ["--steps", "20", "--chars", "20000", "--grid", "0.1", "--out",
                    "/tmp/hyperdescent_quick/stn_charlm.json"]


def data(args):
    text = stn.text.python_corpus(max_chars=args.chars)
    ids, vocab = stn.text.char_splits(text)
    w = {s: stn.text.windows(v, args.length) for s, v in ids.items()}
    return w, vocab


def trainer(w, vocab, start, tuned, args):
    space = hd.Space({n: hd.Real(start, low=0.0, high=0.9) for n in NAMES})
    model = stn.text.hyper_lstm_lm(len(vocab), len(NAMES), embed=args.embed, hidden=args.hidden,
                                   seed=args.seed)
    extra = {} if tuned else {"perturb": False, "val_steps": 0}
    return stn.STNTrainer(model, space, w["train"], w["valid"], w["test"],
                          loss=stn.text.lm_loss, batch_size=args.batch, lr=args.lr,
                          momentum=0.9, warmup_steps=args.warmup, hyper_lr=args.hyper_lr,
                          tau=args.tau, grad_clip=1.0, seed=args.seed, **extra)


def result(tr, wall):
    val, test = tr.evaluate("val"), tr.evaluate("test")
    return {"wall_s": wall, "val_loss": val["loss"], "test_loss": test["loss"],
            "val_ppl": math.exp(val["loss"]), "test_ppl": math.exp(test["loss"]),
            "test_bpc": test["loss"] / math.log(2), "final_hparams": tr.hparams,
            "trajectory": [{"step": r["step"], **r["hparams"]} for r in tr.history
                           if "event" not in r and r["step"] % 20 == 0]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--chars", type=int, default=30_000)
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--embed", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1.0)
    ap.add_argument("--hyper-lr", type=float, default=0.01)
    ap.add_argument("--tau", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--start", type=float, default=0.05)
    ap.add_argument("--grid", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "stn_charlm.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    w, vocab = data(args)
    out = {"args": vars(args), "vocab": len(vocab),
           "sizes": {k: int(v[0].numel()) for k, v in w.items()}, "torch": torch.__version__}
    runs = {}
    for label, start, tuned in [("stn", args.start, True)] + [
            (f"fixed_{p}", p, False) for p in args.grid]:
        tr = trainer(w, vocab, start, tuned, args)
        t0 = time.perf_counter()
        tr.run(args.steps)
        runs[label] = result(tr, time.perf_counter() - t0)
        r = runs[label]
        print(f"{label}: val ppl {r['val_ppl']:.3f} test ppl {r['test_ppl']:.3f} "
              f"({r['test_bpc']:.3f} bpc) {r['wall_s']:.0f}s "
              f"{ {k: round(v, 3) for k, v in r['final_hparams'].items()} }", flush=True)
    out["runs"] = runs
    fixed = {k: v for k, v in runs.items() if k != "stn"}
    best = min(fixed, key=lambda k: fixed[k]["val_loss"])
    out["summary"] = {"stn_test_ppl": runs["stn"]["test_ppl"], "best_fixed": best,
                      "best_fixed_test_ppl": fixed[best]["test_ppl"],
                      "stn_wall_over_fixed_wall": runs["stn"]["wall_s"] / fixed[best]["wall_s"]}
    print(json.dumps(out["summary"], indent=1))
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(path)


if __name__ == "__main__":
    main()
