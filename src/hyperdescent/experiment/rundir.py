"""Run directories: `runs/<YYYYmmdd>-<HHMMSS>-<name>/` holding config.toml, metrics.jsonl, summary.json.

`metrics.jsonl` is appended as the run goes, one JSON record per line, flushed and fsync'ed
after every record, so an interrupted run keeps every record written so far and
`hyperdescent report RUN_DIR` can rebuild its report.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from ..distributed import is_writer
from ..errors import ConfigError
from .config import Config, dump_config, load_config

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


def jsonable(x: Any) -> Any:
    """`x` with tensors/numpy scalars as floats and non-finite floats as None (strict JSON)."""
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "tolist"):  # torch tensors, numpy arrays and scalars
        return jsonable(x.tolist())
    return str(x)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file; a torn last line (killed mid-write) is skipped."""
    out = []
    path = Path(path)
    if not path.is_file():
        return out
    with path.open() as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _continues(cfg: Config, method) -> bool:
    """Whether an unfinished run of `method` may continue where it stopped rather than start
    again: a local black-box run does, from the study it keeps in the run directory."""
    return cfg.executor == "local" and not method.gradient and method.kind != "pbt"


def _checkpointed(path: Path, cfg: Config) -> dict[tuple[str, int], int]:
    """The local gradient runs that left a checkpoint in run directory `path`: (label, seed) ->
    the inner step of the last evaluation it holds (later records are written again)."""
    from .run_checkpoint import DirCheckpoint, read_runner, run_checkpoint_dir
    from .runners import resumable
    out = {}
    for i, m in enumerate(cfg.methods):
        if cfg.executor != "local" or not resumable(m):
            continue
        for s in cfg.seeds:
            d = DirCheckpoint(run_checkpoint_dir(path, i, m.label, s)).latest()
            if d is not None:
                out[(m.label, s)] = read_runner(d)["state"]["last_logged"]
    return out


class RunDir:
    """One run's directory: config.toml at the start, metrics.jsonl as it goes, summary.json at the end."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._metrics = None

    @classmethod
    def create(cls, name: str, out: str | Path | None = None,
               parent: str | Path | None = None) -> RunDir:
        """A fresh run directory: `out` itself if given, else `<parent or runs>/<date>-<time>-<name>/`."""
        if out is not None:
            path = Path(out)
            if (path / METRICS).exists() or (path / CONFIG).exists():
                raise ConfigError(f"--out {str(path)!r} already holds a run (config.toml / "
                                  f"metrics.jsonl); choose another directory")
            path.mkdir(parents=True, exist_ok=True)
            return cls(path)
        base = Path(parent) if parent is not None else Path.cwd() / "runs"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = base / f"{stamp}-{name}"
        k = 1
        while True:
            try:
                path.mkdir(parents=True, exist_ok=False)
                break
            except FileExistsError:
                k += 1
                path = base / f"{stamp}-{name}-{k}"
        return cls(path)

    @classmethod
    def reopen(cls, path: str | Path, cfg: Config) -> tuple[RunDir, set[tuple[str, int]]]:
        """An interrupted run directory to continue with `cfg` (which must be the config it
        was started with): (the directory, the (method, seed) runs that finished). Records of
        runs that did not finish are dropped (atomically), so that their rerun writes each
        record exactly once, except those of local black-box runs, which continue their
        studies and record only the trials still missing, and those of local gradient runs
        up to the checkpoint they resume from."""
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise ConfigError(f"--resume {str(path)!r} is not a run directory (no {CONFIG})")
        if dump_config(load_config(path / CONFIG)) != dump_config(cfg):
            raise ConfigError(f"--resume {str(path)!r} was started with another config; resume "
                              f"it with the config.toml it holds")
        records = read_records(path / METRICS)
        done = {(r["method"], r["seed"]) for r in records if r.get("kind") == "run_end"}
        from ..blackbox.resume import study_file  # optuna, only when resuming
        going_on = {(m.label, s) for i, m in enumerate(cfg.methods) if _continues(cfg, m)
                    for s in cfg.seeds if study_file(path, i, m.label, s).is_file()}
        resumed = {k: v for k, v in _checkpointed(path, cfg).items() if k not in done}
        keep = [r for r in records if "method" not in r
                or (r["method"], r.get("seed")) in done | going_on
                or r.get("inner_steps", -1) <= resumed.get((r["method"], r.get("seed")), -2)]
        rd = cls(path)
        if is_writer() and len(keep) != len(records):
            tmp = path / f".{METRICS}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(jsonable(r), allow_nan=False) + "\n" for r in keep)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path / METRICS)
        (path / SUMMARY).unlink(missing_ok=True)
        return rd, done

    @property
    def metrics_path(self) -> Path:
        """Path of metrics.jsonl."""
        return self.path / METRICS

    def write_config(self, cfg: Config) -> Path:
        """Write config.toml (the validated config, reloadable by `load_config`)."""
        p = self.path / CONFIG
        if is_writer():
            p.write_text(dump_config(cfg))
        return p

    def config(self) -> Config:
        """The run's config, read back from config.toml."""
        return load_config(self.path / CONFIG)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl and make it durable (flush + fsync); under data
        parallelism only rank 0 writes."""
        if not is_writer():
            return
        if self._metrics is None:
            self._metrics = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115
        self._metrics.write(json.dumps(jsonable(record), allow_nan=False) + "\n")
        self._metrics.flush()
        os.fsync(self._metrics.fileno())

    def records(self) -> list[dict[str, Any]]:
        """Every record written so far."""
        return read_records(self.metrics_path)

    def write_summary(self, summary: dict[str, Any]) -> Path:
        """Write summary.json."""
        p = self.path / SUMMARY
        if is_writer():
            p.write_text(json.dumps(jsonable(summary), indent=2, allow_nan=False) + "\n")
        return p

    def close(self) -> None:
        """Close metrics.jsonl (reopened on the next `log`)."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __str__(self) -> str:
        return str(self.path)
