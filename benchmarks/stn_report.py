"""Tables of the STN experiments from their JSON results: benchmarks/results/stn_results.md.

Run: .venv/bin/python benchmarks/stn_report.py   (after stn_mnist1d, stn_digits_cnn, stn_charlm,
stn_offset; a missing result is skipped)
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _load(name):
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _hp(d):
    return ", ".join(f"{k} {v:.3f}" for k, v in d.items())


def mnist1d(d, with_overhead=True):
    a = d["args"]
    out = [f"## mnist1d_mlp: per-layer dropout + input noise ({a['steps']} weight steps, seed "
           f"{a['seed']}, lr {a['lr']}, hyper_lr {a['hyper_lr']}, tau {a['tau']}, warm-up "
           f"{a['warmup']})", "",
           "`python benchmarks/stn_mnist1d.py --steps " + str(a["steps"]) + f" --seed {a['seed']}"
           + (f" --variants {' '.join(a['variants'])}" if "variants" in a else "")
           + f" --starts {' '.join(str(x) for x in a['starts'])}`; trajectories: "
           f"`{Path(a['out']).with_suffix('.png').name}`.", "",
           "| variant | start | final val loss | test loss | test acc | retrain with schedule: "
           "val / test | retrain fixed at final: val / test | final values |",
           "|---|---|---|---|---|---|---|---|"]
    for r in d["stn_runs"]:
        rs, rf = r["retrain_schedule"], r["retrain_fixed_final"]
        out.append(f"| {'Δ-STN' if r['centred'] else 'STN'} | {r['start']} | {r['val_loss']:.4f} "
                   f"| {r['test_loss']:.4f} | {r['test_acc']:.3f} | {rs['val_loss']:.4f} / "
                   f"{rs['test_loss']:.4f} | {rf['val_loss']:.4f} / {rf['test_loss']:.4f} | "
                   f"{_hp(r['final_hparams'])} |")
    out += ["", "| fixed dropout (all layers, no noise) | final val loss | best val seen | test "
            "loss | test acc |", "|---|---|---|---|---|"]
    for g in d["fixed_grid"]:
        out.append(f"| {g['dropout']} | {g['val_loss']:.4f} | {g['best_val_loss']:.4f} | "
                   f"{g['test_loss']:.4f} | {g['test_acc']:.3f} |")
    return out + (overhead(_load("stn_overhead") or d["overhead"]) if with_overhead else [""])


def overhead(o):
    med = o["seconds_per_step_median"]
    rounds = o.get("args", {}).get("overhead_rounds", 5)
    return ["", f"Wall time per weight step on mnist1d_mlp (median of {rounds} interleaved rounds "
            "of 20 steps in one process, loaded shared machine; `python "
            "benchmarks/stn_mnist1d.py --only-overhead`): plain " + f"{med['plain'] * 1e3:.2f} "
            f"ms, STN train step {o['ratio_stn_train_step']:.2f}x, Δ-STN train step "
            f"{o['ratio_delta_stn_train_step']:.2f}x, STN per weight step including its share "
            f"of hyperparameter steps (2 train : 1 val) "
            f"{o['ratio_stn_per_weight_step_with_hyper']:.2f}x.", ""]


def digits(d):
    a = d["args"]
    out = [f"## digits CNN: dropout x2, noise, translation, cutout holes/length "
           f"({a['steps']} weight steps per run)", "",
           "`python benchmarks/stn_digits_cnn.py --steps " + str(a["steps"]) + "`: one Δ-STN run, "
           "then random search and TPE with the STN's wall time as their timeout (a trial "
           "running at the timeout finishes).", "",
           "| seed | method | val loss | test loss | test acc | wall s | trials |",
           "|---|---|---|---|---|---|---|"]
    for seed, rs in d["seeds"].items():
        for k, v in rs.items():
            out.append(f"| {seed} | {k} | {v['val_loss']:.4f} | {v['test_loss']:.4f} | "
                       f"{v['test_acc']:.3f} | {v['wall_s']:.0f} | {v.get('n_trials', 1)} |")
    out += ["", "| method | median val loss | median test loss | median test acc |",
            "|---|---|---|---|"]
    for k, v in d["summary"].items():
        out.append(f"| {k} | {v['median_val_loss']:.4f} | {v['median_test_loss']:.4f} | "
                   f"{v['median_test_acc']:.3f} |")
    finals = [rs["stn"]["final_hparams"] for rs in d["seeds"].values()]
    out += ["", "STN final values: " + "; ".join(_hp(f) for f in finals), ""]
    return out


def charlm(d):
    a = d["args"]
    out = [f"## char-level HyperLSTM on pydoc_data text ({a['chars']} characters, vocab "
           f"{d['vocab']}, {a['steps']} steps of {a['batch']}x{a['length']}, hidden "
           f"{a['hidden']})", "",
           f"`python benchmarks/stn_charlm.py --chars {a['chars']} --steps {a['steps']}`", "",
           "| run | val ppl | test ppl | test bpc | wall s | final values |",
           "|---|---|---|---|---|---|"]
    for k, r in d["runs"].items():
        out.append(f"| {k} | {r['val_ppl']:.3f} | {r['test_ppl']:.3f} | {r['test_bpc']:.3f} | "
                   f"{r['wall_s']:.0f} | {_hp(r['final_hparams'])} |")
    return out + [""]


def offset(d):
    out = ["## diagnostic: non-centred STN with its hypernetwork input shifted by the start "
           "λ0", "", "`python benchmarks/stn_offset.py`", "",
           "| start | final val loss | test loss | final values |", "|---|---|---|---|"]
    for r in d["runs"]:
        out.append(f"| {r['start']} | {r['val_loss']:.4f} | {r['test_loss']:.4f} | "
                   f"{_hp(r['final_hparams'])} |")
    return out + [""]


def harness(d):
    out = [f"## hyperdescent compare: kind stn beside random search and TPE ({d['task']}, "
           f"budget {d['budget']}, {d['steps']}-step runs, seeds {d['seeds']})", "",
           "`hyperdescent compare benchmarks/stn_compare_mnist1d.toml` (STN tunes dropout and "
           "input noise; random and TPE tune the task's lr and weight decay); trajectories: "
           "`stn_compare_mnist1d_hparams.png`.", "",
           "| method | best val loss | test loss | test acc | inner steps | wall s |",
           "|---|---|---|---|---|---|"]
    for label, m in d["methods"].items():
        out.append(f"| {label} | {m['best_val_loss']:.4f} | {m['test_loss']:.4f} | "
                   f"{m['test_acc']:.3f} | {m['inner_steps']} | {m['wall_time_s']:.0f} |")
    return out + [""]


def main(argv=None):
    lines = ["# Self-tuning network experiments", "",
             "Machine: a shared 2-core CPU with several other jobs running (wall times are "
             "inflated and noisy; ratios are measured inside one process).", ""]
    for name, fn in (("stn_mnist1d", mnist1d),
                     ("stn_mnist1d_seed1", lambda d: mnist1d(d, with_overhead=False)),
                     ("stn_offset", offset),
                     ("stn_digits_cnn", digits), ("stn_charlm", charlm),
                     ("stn_charlm_100k", charlm), ("stn_compare_mnist1d_summary", harness)):
        d = _load(name)
        if d is not None:
            lines += fn(d)
    path = RESULTS / "stn_results.md"
    path.write_text("\n".join(lines) + "\n")
    print(path)


if __name__ == "__main__":
    main()
