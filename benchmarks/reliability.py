"""Reliability figures: kills survived, faults survived, fuzz cases without a bare traceback,
trials lost across concurrent workers, and the divergence guard's false and true alarms.

Run: .venv/bin/python benchmarks/reliability.py [--kills 3] [--fault-seeds 3] [--fuzz 200]
Writes benchmarks/results/reliability.json and reliability.md and prints the table.

- kills: a child process runs a tuner's `run(..., checkpoint=..., checkpoint_every=k)`
  (OnlineTuner's three methods on digits_mlp, OfflineTuner FDS, an STNTrainer) and is
  SIGKILLed at a random step; the run resumed from the checkpoint must end bit-identical
  (history records without wall times, weights, hyperparameters, meta-optimizer) to an
  uninterrupted run. Per tuner and dtype.
- compare kills: `hyperdescent compare` (an oho run, then random search and TPE studies) is
  SIGKILLed once a random number of trial records is written, then resumed with --resume; it
  survives when every study ends with its trial budget finished, the trials finished before
  the kill unchanged, every finished trial recorded once and no run begun twice.
- faults: a NaN batch loss, an infinite loss, a 1e6x loss spike, a float16 overflow (each
  once), a NaN in one training row (every batch holding it), an infinite hypergradient, or a
  start at the learning rate's upper bound on inputs x30; a run survives when it finishes
  with finite hyperparameters and no exception.
- fuzz: tests/test_fuzz.py with HD_FUZZ_EXAMPLES cases per test; bare tracebacks are tests
  that failed with an exception other than our error types.
- concurrent: 4 processes on one study in a journal file (the default for a path) and in
  SQLite, trials lost or duplicated against the trials each worker ran.
- guard: first alarms on synthetic loss sequences, noise-aware (default) vs noise-blind
  (noise_tolerance=0), and the noisy regression of issue 17 through OnlineTuner.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import hyperdescent as hd
from hyperdescent.tuners.guard import DivergenceGuard

ROOT = Path(__file__).resolve().parents[1]
BENCH_ARGS = []
BENCH_QUICK_ARGS = ["--kills", "1", "--fault-seeds", "1", "--fuzz", "20", "--guard-seeds", "10"]
STEPS, EVERY = 60, 7


# -- kills -------------------------------------------------------------------------------------
def make_problem(dtype: str, seed: int = 0) -> hd.Problem:
    """digits_mlp at lr 0.05 / weight decay 1e-4, in the given dtype."""
    task = hd.tasks.get("digits_mlp")
    model = task.make_model(seed).to(getattr(torch, dtype))
    space = hd.Space({"lr": hd.Real(0.05, low=1e-5, high=2.0, log=True),
                      "weight_decay": hd.Real(1e-4, low=1e-7, high=1e-1, log=True)})
    return hd.Problem(model, optimizer=hd.optim.SGD(momentum=0.9), space=space,
                      train=task.train, val=task.val, batch_size=64, val_batch_size=128,
                      seed=seed)


def _stn_parts(dtype: str):
    from hyperdescent import stn
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    xtr, xva = torch.randn(64, 6, generator=g, dtype=dt), torch.randn(32, 6, generator=g, dtype=dt)
    w = torch.randn(6, 3, generator=g, dtype=dt)
    space = hd.Space({"dropout": hd.Real(0.3, low=0.0, high=0.9),
                      "noise": hd.Real(0.1, low=0.0, high=1.0)})
    torch.manual_seed(1)
    seq = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                              torch.nn.Linear(16, 3)).to(dt)
    opts = dict(batch_size=16, lr=0.05, warmup_steps=3, hyper_lr=0.05, seed=3,
                augment=stn.Augmentation(noise="noise"))
    return (stn.from_sequential(seq, space), space, (xtr, (xtr @ w).argmax(1)),
            (xva, (xva @ w).argmax(1)), opts)


def build(tuner: str, dtype: str):
    """A fresh tuner of kind `tuner` ('online/forward', 'offline/fds', 'stn', ...)."""
    if tuner.startswith("online/"):
        return hd.OnlineTuner(make_problem(dtype), method=tuner.split("/")[1], meta_lr=0.05,
                              snapshot_every=10)
    if tuner == "offline/fds":
        from hyperdescent.tuners.offline import OfflineTuner
        return OfflineTuner(make_problem(dtype), method="fds", steps=20, meta_steps=6,
                            val_fraction=0.25)
    model, space, train, val, opts = _stn_parts(dtype)
    return hd.stn.STNTrainer(model, space, train, val, **opts)


def load(tuner: str, dtype: str, path: Path):
    """The tuner restored from `path` (or a fresh one when no checkpoint was written)."""
    if not path.exists():
        return build(tuner, dtype)
    if tuner.startswith("online/"):
        return hd.OnlineTuner.load(path, make_problem(dtype))
    if tuner == "offline/fds":
        from hyperdescent.tuners.offline import OfflineTuner
        return OfflineTuner.load(path, make_problem(dtype))
    model, space, train, val, opts = _stn_parts(dtype)
    return hd.stn.STNTrainer.load(path, model, space, train, val, **opts)


# total steps (meta-steps for the offline tuner) and checkpoint interval
LENGTH = {"online": (STEPS, EVERY), "offline": (6, 1), "stn": (40, 3)}


def length(tuner: str) -> tuple[int, int]:
    return LENGTH[tuner.split("/")[0]]


def finish(tuner: str, t) -> object:
    total, _ = length(tuner)
    return t.run(total) if tuner != "offline/fds" else t.run(meta_steps=total)


def position(t) -> int:
    return getattr(t, "m", None) if hasattr(t, "m") else t.t


def _child(tuner: str, dtype: str, path: str, conn) -> None:
    """The run that gets killed (a forked process): reports each step's position on `conn`."""
    total, every = length(tuner)

    def tick(t, record):
        conn.send(position(t))
        time.sleep(0.002)
    t = build(tuner, dtype)
    if tuner == "offline/fds":
        t.run(meta_steps=total, checkpoint=path, checkpoint_every=every, callback=tick)
    else:
        t.run(total, callback=tick, checkpoint=path, checkpoint_every=every)


def _plain(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items() if "wall" not in str(k)
                and "memory" not in str(k)}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def comparable(t) -> dict:
    """What must match bit for bit between a resumed and an uninterrupted run (wall times
    and memory readings left out)."""
    out = {"history": _plain(t.history), "hparams": _plain(t.hparams),
           "weights": _plain(dict(t.model.state_dict()))}
    for name in ("events", "t", "m", "meta_lr", "raw", "values", "scale"):
        if hasattr(t, name):
            v = getattr(t, name)
            out[name] = _plain({k: x.detach() if isinstance(x, torch.Tensor) else x
                                for k, x in v.items()} if isinstance(v, dict) else v)
    return out


def kill_and_resume(tuner: str, dtype: str, reference: dict, rng: random.Random) -> dict:
    """One SIGKILL at a random step and a resume; whether it ended bit-identical."""
    total, _ = length(tuner)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ck.pt"
        kill_at = rng.randrange(1, total)
        recv, send = multiprocessing.Pipe(duplex=False)
        # forked, so the child starts at once with everything imported
        child = multiprocessing.get_context("fork").Process(
            target=_child, args=(tuner, dtype, str(path), send))
        child.start()
        last = 0
        while recv.poll(120):
            last = recv.recv()
            if last >= kill_at:
                break
        os.kill(child.pid, signal.SIGKILL)
        child.join(120)
        t = load(tuner, dtype, path)
        resumed_from = position(t)
        finish(tuner, t)
        return {"tuner": tuner, "dtype": dtype, "killed_after": last,
                "resumed_from": resumed_from, "identical": comparable(t) == reference}


TUNERS = ("online/forward", "online/greedy", "online/truncated", "offline/fds", "stn")


def kills(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for tuner in TUNERS:
        for dtype in ("float64", "float32"):
            try:
                reference = comparable(finish(tuner, build(tuner, dtype)))
            except Exception as e:  # a tuner that cannot run here is reported, not skipped
                out.append({"tuner": tuner, "dtype": dtype, "identical": False,
                            "error": f"{type(e).__name__}: {e}"})
                continue
            out += [kill_and_resume(tuner, dtype, reference, rng) for _ in range(n)]
    return out


# -- compare kills -------------------------------------------------------------------------------
COMPARE = """
task = "cancer_logreg"
steps = 40
seeds = [0]
[budget]
trials = 6
[[methods]]
label = "oho"
kind = "oho"
[[methods]]
label = "random"
kind = "random"
settings = {eval_every = 10}
[[methods]]
label = "tpe"
kind = "tpe"
settings = {eval_every = 10}
"""


def compare_kill(rng: random.Random) -> dict:
    """One compare SIGKILLed after a random number of trial records, resumed; the checks."""
    import optuna

    from hyperdescent.blackbox.resume import study_file
    from hyperdescent.cli import main as cli
    from hyperdescent.experiment.rundir import read_records
    with tempfile.TemporaryDirectory() as tmp:
        cfg, out = Path(tmp) / "cfg.toml", Path(tmp) / "run"
        cfg.write_text(COMPARE)
        kill_after = rng.randrange(1, 12)
        code = ("import sys; from hyperdescent.cli import main; sys.exit(main(['compare', "
                f"{str(cfg)!r}, '--out', {str(out)!r}, '--no-progress']))")
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and sum(
                r.get("kind") == "trial" for r in read_records(out / "metrics.jsonl")) < kill_after:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = read_records(out / "metrics.jsonl")
        with contextlib.redirect_stdout(io.StringIO()):  # the results table: not ours to print
            rc = cli(["compare", str(cfg), "--resume", str(out), "--no-progress"])
        after = read_records(out / "metrics.jsonl")
        ok = rc == 0 and after[:len(before)] == before
        starts = [(r["method"], r["seed"]) for r in after if r.get("kind") == "run_start"]
        ok = ok and len(starts) == len(set(starts)) == 3
        for i, label in ((1, "random"), (2, "tpe")):
            path = study_file(out, i, label, 0)
            study = optuna.load_study(study_name="hyperdescent-seed0", storage=(
                optuna.storages.JournalStorage(
                    optuna.storages.journal.JournalFileBackend(str(path)))))
            done = {t.number: t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")}
            recs = [r for r in after if r.get("kind") == "trial" and r["method"] == label]
            old = [r for r in before if r.get("kind") == "trial" and r["method"] == label]
            ok = ok and len(done) == 6 and sorted(r["trial"] for r in recs) == sorted(done)
            ok = ok and all(done[r["trial"]].params == r["params"] for r in old)
        killed = sum(r.get("kind") == "trial_killed" for r in after)
        return {"kill_after_trials": kill_after, "trial_records_before": sum(
            r.get("kind") == "trial" for r in before), "trials_cut_short": killed,
            "survived": bool(ok)}


# -- faults ------------------------------------------------------------------------------------
class FaultyLoss:
    """cross_entropy whose training loss at step `at` (first time only) is `fault(loss)`."""

    def __init__(self, at: int, fault):
        self.at, self.fault, self.t, self.model, self.fired = at, fault, 0, None, False

    def __call__(self, out, y):
        loss = torch.nn.functional.cross_entropy(out, y)
        if self.model is not None and self.model.training and self.t == self.at \
                and not self.fired:
            return self.fault(loss)
        return loss


LOSS_FAULTS = {
    "nan_batch": lambda v: v * math.nan,
    "inf_loss": lambda v: v * math.inf,
    "spike_1e6": lambda v: v * 1e6,
    "float16_overflow": lambda v: (v * 1e5).half().float() * v / v.detach(),
}


def fault_run(kind: str, seed: int, steps: int = 80) -> dict:
    """One run with one injected fault; survived = finished with finite hyperparameters."""
    task = hd.tasks.get("digits_mlp")
    space = hd.Space({"lr": hd.Real(1.0 if kind == "exploding_lr" else 0.05, low=1e-5,
                                    high=1.0, log=True),
                      "weight_decay": hd.Real(1e-4, low=1e-7, high=1e-1, log=True)})
    at = random.Random(seed).randrange(10, steps - 10)
    loss = FaultyLoss(at, LOSS_FAULTS.get(kind, lambda v: v))
    scale = 30.0 if kind == "exploding_lr" else 1.0
    x = task.train[0] * scale
    if kind == "nan_row":  # a bad row in the data: every batch holding it, every epoch
        x = x.clone()
        x[at, 3] = math.nan
    p = hd.Problem(task.make_model(seed), loss=loss, optimizer=hd.optim.SGD(momentum=0.9),
                   space=space, train=(x, task.train[1]),
                   val=(task.val[0] * scale, task.val[1]), batch_size=64, val_batch_size=128,
                   seed=seed)
    loss.model = p.model
    tuner = hd.OnlineTuner(p, meta_lr=0.5 if kind == "exploding_lr" else 0.05,
                           snapshot_every=10)
    if kind == "inf_hypergrad":
        real = tuner.engine.readout

        def readout(carry, state, vb):
            value, grads = real(carry, state, vb)
            if tuner.t == at:
                grads = {k: g * math.inf for k, g in grads.items()}
            return value, grads
        tuner.engine.readout = readout
    error = None
    try:
        while tuner.t < steps:
            loss.t = tuner.t
            rec = tuner.step()
            if rec.get("event") == "rollback" and rec["step"] == at:
                loss.fired = True
    except Exception as e:  # counted, not hidden: the figure is runs that survived
        error = f"{type(e).__name__}: {e}"
    finite = all(torch.isfinite(v).all().item()
                 for v in hd.space.flatten(tuner.hparams).values())
    reasons = sorted({e["event"] for e in tuner.events})
    return {"fault": kind, "seed": seed, "at": at, "survived": error is None and finite,
            "error": error, "events": reasons, "rollbacks": tuner.rollbacks}


def faults(seeds: int) -> list[dict]:
    kinds = list(LOSS_FAULTS) + ["nan_row", "inf_hypergrad", "exploding_lr"]
    return [fault_run(k, s) for k in kinds for s in range(seeds)]


# -- fuzz --------------------------------------------------------------------------------------
def fuzz(examples: int) -> dict:
    """Run tests/test_fuzz.py with `examples` cases per test, counting every attempted call."""
    env = {**os.environ, "HD_FUZZ_EXAMPLES": str(examples), "OMP_NUM_THREADS": "1"}
    code = ("import sys, pytest, test_fuzz as F\n"
            "n = [0]\nreal = F.attempt\n"
            "def counted(*a, **k):\n    n[0] += 1\n    return real(*a, **k)\n"
            "F.attempt = counted\n"
            "rc = pytest.main(['-q', '-p', 'no:cacheprovider', F.__file__])\n"
            "print('CASES', n[0], 'RC', int(rc))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", env=env,
                       capture_output=True, text=True, timeout=3000)
    tail = r.stdout.strip().splitlines()
    cases = next((int(line.split()[1]) for line in tail if line.startswith("CASES")), 0)
    failed = sum(1 for line in tail if line.startswith("FAILED"))
    return {"examples_per_test": examples, "cases": cases, "bare_tracebacks": failed,
            "pytest": next((line for line in tail if "passed" in line or "failed" in line), "")}


# -- concurrent studies --------------------------------------------------------------------------
def _worker(storage, seed: int, n_trials: int, out_path: str) -> None:
    def objective(values, trial):
        value = (math.log10(float(values["lr"])) + 2.0) ** 2
        with open(out_path, "a") as f:
            f.write(json.dumps({"number": trial.number, "value": value}) + "\n")
        return value
    try:
        hd.blackbox.search(objective,
                           hd.Space({"lr": hd.Real(0.1, low=1e-4, high=1.0, log=True)}),
                           sampler="random", n_trials=n_trials, storage=storage,
                           study_name="shared", seed=seed)
    except Exception as e:  # SQLite under concurrency: recorded as the worker's error
        with open(out_path + ".err", "w") as f:
            f.write(f"{type(e).__name__}: {str(e).splitlines()[0]}")
        sys.exit(1)


def concurrent(kind: str, workers: int = 4, n_trials: int = 10) -> dict:
    import optuna

    from hyperdescent.blackbox.storage import shared_storage
    with tempfile.TemporaryDirectory() as tmp:
        storage = (Path(tmp) / "study.log" if kind == "journal"
                   else f"sqlite:///{tmp}/study.db")
        ctx = multiprocessing.get_context("fork")
        procs = [ctx.Process(target=_worker, args=(storage, i, n_trials, f"{tmp}/w{i}.jsonl"))
                 for i in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(300)
        ran = [json.loads(line) for i in range(workers) if Path(f"{tmp}/w{i}.jsonl").exists()
               for line in Path(f"{tmp}/w{i}.jsonl").read_text().splitlines()]
        errors = [Path(f"{tmp}/w{i}.jsonl.err").read_text() for i in range(workers)
                  if Path(f"{tmp}/w{i}.jsonl.err").exists()]
        trials = optuna.load_study(storage=shared_storage(storage), study_name="shared").trials
        complete = {t.number: t.value for t in trials
                    if t.state == optuna.trial.TrialState.COMPLETE}
        numbers = [r["number"] for r in ran]
        lost = sum(1 for r in ran if complete.get(r["number"]) != r["value"])
        return {"storage": kind, "workers": workers, "asked": workers * n_trials,
                "trials_run": len(ran), "trials_lost": lost,
                "duplicated": len(numbers) - len(set(numbers)),
                "exit_codes": [p.exitcode for p in procs], "errors": errors[:2]}


# -- the guard ---------------------------------------------------------------------------------
def _alarm(losses, **kw) -> int | None:
    guard = DivergenceGuard(**kw)
    for t, loss in enumerate(losses):
        if guard.diverged(t + 1, loss):
            return t
    return None


def sequences(seed: int, n: int = 3000) -> dict[str, tuple[list[float], bool]]:
    """Synthetic batch-loss sequences and whether each should raise an alarm."""
    g = torch.Generator().manual_seed(10_000 + seed)
    noise = torch.randn(n, generator=g, dtype=torch.float64).tolist()
    skew = torch.empty(n, 16, dtype=torch.float64).exponential_(1.0, generator=g)
    skew4 = torch.empty(n, 4, dtype=torch.float64).exponential_(1.0, generator=g)
    blow = [1.0] * 200 + [1.02 ** t for t in range(1, n - 199)]
    fall = [2.3 - 1.5 * t / 150 for t in range(150)]
    stall = fall + [0.8 + 1.5 * t / 60 for t in range(1, 61)] + [2.3] * (n - 210)
    nan_at = [50 + 6 * x for x in noise[:1500]] + [math.nan] + [50.0] * (n - 1501)
    return {
        "noisy_flat (50 +- 6)": ([50 + 6 * x for x in noise], False),
        "noisy_falling (50 -> 10, sd 6)": (
            [10 + 40 * math.exp(-t / 300) + 6 * x for t, x in enumerate(noise)], False),
        "skewed, batch of 16 exp. losses": (skew.mean(1).tolist(), False),
        "skewed, batch of 4 exp. losses": (skew4.mean(1).tolist(), False),
        "slow blow-up (sd 0.1, +2%/step)": ([m + 0.1 * x for m, x in zip(blow, noise)], True),
        "sudden NaN": (nan_at, True),
        "dead-ReLU stall (sd 0.1, back to chance)": (
            [m + (0.1 * x if t < 150 else 0.0) for t, (m, x) in enumerate(zip(stall, noise))],
            True),
        "jump to 4x, stays (sd 0.1)": (
            [(1.0 if t < 300 else 4.0) + 0.1 * x for t, x in enumerate(noise)], True),
    }


def guard_rates(seeds: int) -> list[dict]:
    rows = {}
    for s in range(seeds):
        for name, (losses, should) in sequences(s).items():
            for mode, kw in (("noise-aware", {}), ("noise-blind", {"noise_tolerance": 0.0})):
                r = rows.setdefault((name, mode), {"sequence": name, "guard": mode,
                                                   "should_alarm": should, "runs": 0,
                                                   "alarms": 0})
                r["runs"] += 1
                r["alarms"] += _alarm(losses, **kw) is not None
    return list(rows.values())


def noisy_regression(steps: int = 300) -> list[dict]:
    """Issue 17's case through OnlineTuner: batch MSE ~50 +- 10, noiseless validation."""
    out = []
    for label, kw in (("noise-aware guard", {}), ("noise-blind guard", {"noise_tolerance": 0.0}),
                      ("guard off (max_rollbacks=0)", {"max_rollbacks": 0})):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(512, 5, generator=g, dtype=torch.float64)
        w = torch.randn(5, 1, generator=g, dtype=torch.float64)
        y = x @ w + 7.0 * torch.randn(512, 1, generator=g, dtype=torch.float64)
        xv = torch.randn(128, 5, generator=g, dtype=torch.float64)
        torch.manual_seed(0)
        p = hd.Problem(torch.nn.Linear(5, 1).double(), loss=torch.nn.functional.mse_loss,
                       optimizer=hd.optim.SGD(momentum=0.9),
                       space=hd.Space({"lr": hd.Real(1e-3, low=1e-5, high=1.0, log=True)}),
                       train=(x, y), val=(xv, xv @ w), batch_size=16, seed=0)
        tuner = hd.OnlineTuner(p, **kw).run(steps)
        out.append({"guard": label, "rollbacks": tuner.rollbacks, "meta_lr": tuner.meta_lr,
                    "final_lr": tuner.hparams["lr"].item(),
                    "val_loss": tuner.evaluate("val")["loss"],
                    "events": sorted({e["event"] for e in tuner.events})})
    return out


# -- report ------------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    lines = ["# Reliability (benchmarks/reliability.py)", ""]
    k = res["kills"]
    lines += ["## Kills survived / kills tried (SIGKILL at a random step, resumed bit-identical)",
              "", "| tuner | dtype | survived / tried |", "|---|---|---|"]
    for tuner in TUNERS:
        for dtype in ("float64", "float32"):
            rs = [r for r in k if r["tuner"] == tuner and r["dtype"] == dtype]
            err = next((r["error"] for r in rs if "error" in r), "")
            lines.append(f"| {tuner} | {dtype} | {sum(r['identical'] for r in rs)} / {len(rs)} "
                         f"{err[:80]} |")
    c = res["compare_kills"]
    lines += ["", "## Compare kills survived / kills tried (SIGKILL after a random number of "
              "trial records, then --resume)", "",
              f"{sum(r['survived'] for r in c)} / {len(c)} (trials cut short by the kill and "
              f"run again: {sum(r['trials_cut_short'] for r in c)})"]
    f = res["faults"]
    lines += ["", "## Faults injected / runs that finished with finite hyperparameters", "",
              "| fault | finished finite / runs | events |", "|---|---|---|"]
    for kind in dict.fromkeys(r["fault"] for r in f):
        rs = [r for r in f if r["fault"] == kind]
        ev = sorted({e for r in rs for e in r["events"]})
        lines.append(f"| {kind} | {sum(r['survived'] for r in rs)} / {len(rs)} | "
                     f"{', '.join(ev)} |")
    z = res["fuzz"]
    lines += ["", "## Fuzz", "", f"fuzz cases tried {z['cases']}, bare tracebacks "
              f"{z['bare_tracebacks']} ({z['examples_per_test']} examples per test; {z['pytest']})"]
    lines += ["", "## Concurrent studies (4 processes, one study)", "",
              "| storage | trials run | lost | duplicated | worker errors |", "|---|---|---|---|---|"]
    for c in res["concurrent"]:
        lines.append(f"| {c['storage']} | {c['trials_run']} / {c['asked']} | {c['trials_lost']} | "
                     f"{c['duplicated']} | {'; '.join(e[:60] for e in c['errors']) or '-'} |")
    lines += ["", "## Guard: runs with an alarm / runs (3000-step synthetic sequences)", "",
              "| sequence | should alarm | noise-aware | noise-blind |", "|---|---|---|---|"]
    g = res["guard"]
    for name in dict.fromkeys(r["sequence"] for r in g):
        aware = next(r for r in g if r["sequence"] == name and r["guard"] == "noise-aware")
        blind = next(r for r in g if r["sequence"] == name and r["guard"] == "noise-blind")
        lines.append(f"| {name} | {'yes' if aware['should_alarm'] else 'no'} | "
                     f"{aware['alarms']} / {aware['runs']} | {blind['alarms']} / {blind['runs']} |")
    lines += ["", "## Issue 17's noisy regression through OnlineTuner (300 steps)", "",
              "| guard | rollbacks | meta_lr | final lr | val loss |", "|---|---|---|---|---|"]
    for r in res["noisy_regression"]:
        lines.append(f"| {r['guard']} | {r['rollbacks']} | {r['meta_lr']:.3g} | "
                     f"{r['final_lr']:.3g} | {r['val_loss']:.4g} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=3, help="kills per method and dtype")
    ap.add_argument("--fault-seeds", type=int, default=3)
    ap.add_argument("--fuzz", type=int, default=200, help="examples per fuzz test")
    ap.add_argument("--guard-seeds", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reliability"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rng = random.Random(args.seed)
    res = {"kills": kills(args.kills, args.seed),
           "compare_kills": [compare_kill(rng) for _ in range(args.kills)],
           "faults": faults(args.fault_seeds),
           "concurrent": [concurrent("journal"), concurrent("sqlite")],
           "guard": guard_rates(args.guard_seeds), "noisy_regression": noisy_regression(),
           "fuzz": fuzz(args.fuzz)}
    res["seconds"] = time.perf_counter() - t0
    res["args"] = vars(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
