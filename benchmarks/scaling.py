"""Scaling out: steps per second of the data-parallel online tuner at 1 and N processes, and the
wall time of a 16-trial compare run in this process vs through Ray Tune with 2 workers.

Run: .venv/bin/python benchmarks/scaling.py [--procs 1 2] [--steps 60] [--trials 16] [--rounds 3]
Each process count runs in fresh processes (gloo on CPU) holding 1/N of every batch of 128. On a
shared machine the load changes from minute to minute, so the process counts (and the local and
Ray compare runs) are interleaved, `--rounds` times, and each ratio is taken within a round.
On N GPUs, one rank per GPU with nccl:
    torchrun --nproc-per-node=N benchmarks/scaling.py --worker --device cuda --steps 200
(under torchrun the script measures that one process count and prints its line).
Writes benchmarks/results/scaling.json and scaling.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hyperdescent as hd

BENCH_ARGS = []
BENCH_QUICK_ARGS = ["--steps", "20", "--trials", "4", "--trial-steps", "50", "--rounds", "1"]
OUT = Path(__file__).parent / "results"


def _problem(args, distributed: bool, device: str) -> hd.Problem:
    task = hd.tasks.get("digits_mlp")
    torch.manual_seed(0)
    d = task.train[0].shape[1]
    model = torch.nn.Sequential(torch.nn.Linear(d, args.width), torch.nn.Tanh(),
                                torch.nn.Linear(args.width, args.width), torch.nn.Tanh(),
                                torch.nn.Linear(args.width, 10)).to(device)
    space = hd.Space({"lr": hd.Real(0.05, low=1e-4, high=2.0, log=True),
                      "weight_decay": hd.Real(1e-4, low=1e-7, high=1e-1, log=True)})
    train = tuple(t.to(device) for t in task.train)
    val = tuple(t.to(device) for t in task.val)
    return hd.Problem(model, optimizer=hd.optim.SGD(momentum=0.9), space=space, train=train,
                      val=val, batch_size=128, val_batch_size=128, distributed=distributed)


def measure(args, device: str = "cpu") -> dict:
    """Steps per second of OnlineTuner (forward, exact) in this process (one rank of a group
    when one is initialized)."""
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    tuner = hd.OnlineTuner(_problem(args, distributed, device), method="forward")
    tuner.run(args.warmup)
    if device == "cuda":
        torch.cuda.synchronize()
    if distributed:
        dist.barrier()
    t0 = time.perf_counter()
    tuner.run(args.steps)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    if distributed:
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {"procs": world, "device": device, "steps": args.steps,
            "steps_per_s": args.steps / elapsed.item(), "width": args.width,
            "final_lr": float(tuner.hparams["lr"])}


def _worker(rank: int, world: int, store: str, args, out: str) -> None:
    torch.set_num_threads(args.threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world)
    try:
        res = measure(args)
        if rank == 0:
            Path(out).write_text(json.dumps(res))
    finally:
        if world > 1:
            dist.destroy_process_group()


def data_parallel(args) -> list[dict]:
    """One measurement per process count and round (the counts interleaved), each in fresh
    processes."""
    rows = []
    for r in range(args.rounds):
        for world in args.procs:
            with tempfile.TemporaryDirectory() as d:
                out = os.path.join(d, "res.json")
                mp.start_processes(_worker, args=(world, os.path.join(d, "store"), args, out),
                                   nprocs=world, join=True, start_method="spawn")
                rows.append({**json.loads(Path(out).read_text()), "round": r})
            print(f"data parallel, round {r}: {rows[-1]['procs']} process(es): "
                  f"{rows[-1]['steps_per_s']:.1f} steps/s")
    return rows


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def paired(rows: list[dict], key: str, value: str, base, other) -> list[float]:
    """other / base of `value` within each round (rows whose `key` is base and other)."""
    by = {(r["round"], r[key]): r[value] for r in rows}
    return [by[(k, other)] / by[(k, base)] for k in sorted({r["round"] for r in rows})
            if (k, base) in by and (k, other) in by]


def compare_wall(args) -> list[dict]:
    """Wall time of one compare run of `trials` random-search trials, local vs Ray (2 CPUs)."""
    import ray

    from hyperdescent.experiment import compare, validate_config
    rows = []
    base = {"name": "scaling", "task": "digits_mlp", "seeds": [0], "steps": args.trial_steps,
            "budget": {"trials": args.trials},
            "methods": [{"label": "random", "kind": "random"}]}
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.rounds):
            for executor in ("local", "ray"):
                cfg = validate_config({**base, "executor": executor, "ray": {"num_cpus": 2}})
                t1 = time.perf_counter()
                compare(cfg, out=Path(d) / f"{executor}{r}", progress=False)
                t2 = time.perf_counter()
                rows.append({"executor": executor, "trials": args.trials, "round": r,
                             "trial_steps": args.trial_steps, "wall_s": t2 - t1,
                             "ray_init_s": init_s if executor == "ray" else 0.0})
                print(f"compare, round {r}, {args.trials} trials, {executor}: {t2 - t1:.1f} s")
        ray.shutdown()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--width", type=int, default=256, help="hidden width of the 2-layer MLP")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--trial-steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--worker", action="store_true", help="under torchrun: measure this group")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.worker:
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        res = measure(args, args.device)
        if dist.get_rank() == 0:
            print(json.dumps(res))
        dist.destroy_process_group()
        return
    result = {"machine": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
                          "torch": torch.__version__},
              "data_parallel": data_parallel(args)}
    try:
        import ray  # noqa: F401
    except ImportError:
        print("Ray is not installed (pip install 'hyperdescent[ray]'): compare timing skipped")
        args.skip_ray = True
    if not args.skip_ray:
        result["compare"] = compare_wall(args)
    result["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    OUT.mkdir(exist_ok=True)
    (OUT / "scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result, args.trials)
    (OUT / "scaling.md").write_text(text)
    print(text)


def markdown(result: dict, trials: int) -> str:
    """The tables of scaling.md, with a warning when the machine was busy with other work."""
    m = result["machine"]
    dp_rows = result["data_parallel"]
    lines = ["# Scaling out", "",
             f"{m['cpus']} CPUs, load average {m['load_avg_1m']:.1f} at the start, "
             f"{m['load_avg_1m_end']:.1f} at the end. Process counts (and executors) "
             "interleaved round by round; ratios taken within a round.", "",
             "| round | processes | steps/s (OnlineTuner, forward, batch 128 split over ranks) |",
             "|---|---|---|"]
    lines += [f"| {r.get('round', 0)} | {r['procs']} | {r['steps_per_s']:.1f} |"
              for r in dp_rows]
    procs = sorted({r["procs"] for r in dp_rows})
    for p in procs[1:]:
        ratios = paired(dp_rows, "procs", "steps_per_s", procs[0], p)
        if ratios:
            lines += ["", f"{p} processes / {procs[0]}: steps/s ratio "
                      f"{', '.join(f'{x:.2f}' for x in ratios)} per round, median "
                      f"{_median(ratios):.2f}."]
    if max(m["load_avg_1m"], m["load_avg_1m_end"]) > m["cpus"]:
        lines += ["", "The machine was busy with other work (load above its CPU count): the "
                  "processes compete with it for the CPUs (N processes also get a larger share "
                  "than one), so these figures say more about that load than about scaling; "
                  "measure on an idle machine or on GPUs (torchrun line in the script's "
                  "docstring)."]
    if "compare" in result:
        rows = result["compare"]
        init = next((r["ray_init_s"] for r in rows if r["ray_init_s"]), 0.0)
        lines += ["", f"| round | executor | wall time of a {trials}-trial compare run (s) |",
                  "|---|---|---|"]
        lines += [f"| {r.get('round', 0)} | {r['executor']} | {r['wall_s']:.1f} |" for r in rows]
        ratios = paired(rows, "executor", "wall_s", "local", "ray")
        lines += ["", f"ray.init took {init:.1f} s once (not in the table). Ray / local wall "
                  f"time: {', '.join(f'{x:.2f}' for x in ratios)} per round, median "
                  f"{_median(ratios):.2f}." if ratios else ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
