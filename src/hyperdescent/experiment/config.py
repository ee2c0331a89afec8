"""Experiment configs: TOML files validated with pydantic, errors that name the offending key.

A config names a task, seeds, one budget shared by every method, and the methods to compare::

    name = "digits"
    task = "digits_mlp"
    seeds = [0, 1]
    steps = 800                         # inner steps of one training run (default: task.steps)
    target_val_loss = "random"          # a float, or the label of a method (default: the first
                                        # black-box method): its median final best val loss
    [budget]                            # at least one of these
    wall_clock_s = 30
    inner_steps = 20000
    trials = 50
    [space.lr]                          # optional; merged field-wise into the task's space
    init = 5e-4
    [[methods]]
    label = "OHO"
    kind = "oho"                        # oho | greedy | truncated | random | grid | tpe | gp
    settings = { meta_lr = 0.03 }       #  | cmaes | qmc
    [[methods]]
    label = "TPE + hyperband"
    kind = "tpe"
    pruner = "hyperband"                # median | successive_halving | hyperband (black-box only)

`output_dir` (optional) is the folder in which `<date>-<time>-<name>/` run directories are
created (default `runs`, relative to the current directory).
"""

from __future__ import annotations

import inspect
import json
import math
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

from ..errors import ConfigError
from ..optim.names import TASK_HPARAMS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the tomli backport
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

GRADIENT_KINDS = {"oho": "forward", "greedy": "greedy", "truncated": "truncated"}
OFFLINE_KINDS = ("fds",)  # OfflineTuner: meta-steps over whole runs (offline_runner.py)
STN_KINDS = ("stn",)  # STNTrainer: dropout (and input noise) tuned in one run (stn_runner.py)
BLACKBOX_KINDS = ("random", "grid", "tpe", "gp", "cmaes", "qmc")
PBT_KINDS = ("pbt",)  # Population Based Training through Ray Tune (pbt_runner.py)
KINDS = (*GRADIENT_KINDS, *OFFLINE_KINDS, *STN_KINDS, *BLACKBOX_KINDS, *PBT_KINDS)
PRUNERS = ("median", "successive_halving", "hyperband")
# hyperparameters both kinds of method can set: the arguments of the tasks' optimizers
HPARAM_NAMES = TASK_HPARAMS
# settings that are not OnlineTuner arguments
_GRADIENT_EXTRA = {"eval_every": "full-validation evaluation (and log record) every N steps",
                   "val_batch_size": "validation minibatch of each meta-step (default: the task's batch size)"}
_BLACKBOX_SETTINGS = {"eval_every": "validation evaluation (and pruning check) every N steps",
                      "grid_points": "points per dimension of kind='grid'",
                      "sampler_kwargs": "extra arguments of the Optuna sampler",
                      "pruner_kwargs": "extra arguments of the Optuna pruner"}


def gradient_settings() -> list[str]:
    """Setting names a gradient method accepts: OnlineTuner's arguments plus eval_every, val_batch_size."""
    from ..tuners.online import OnlineTuner
    names = [n for n in inspect.signature(OnlineTuner.__init__).parameters
             if n not in ("self", "problem", "method")]
    return names + list(_GRADIENT_EXTRA)


def _offline_settings() -> list[str]:
    from .offline_runner import offline_settings
    return offline_settings()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Budget(_Strict):
    """The budget every method gets: wall-clock seconds, inner training steps, trials."""

    wall_clock_s: float | None = Field(None, gt=0)
    inner_steps: StrictInt | None = Field(None, gt=0)
    trials: StrictInt | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _at_least_one(self) -> Budget:
        if self.wall_clock_s is None and self.inner_steps is None and self.trials is None:
            raise ValueError("needs at least one of wall_clock_s, inner_steps, trials")
        return self


class HParam(_Strict):
    """One Real hyperparameter; fields left out are taken from the task's default space."""

    init: float | None = None
    low: float | None = None
    high: float | None = None
    log: bool | None = None
    per: Literal["global", "layer", "parameter"] | None = None
    schedule: StrictInt | None = Field(None, ge=1, description="Piecewise(K) blocks")


class Method(_Strict):
    """One method of a comparison: a label, a kind, an optional pruner and settings."""

    label: str = Field(min_length=1)
    kind: Literal[KINDS]  # type: ignore[valid-type]
    pruner: Literal[PRUNERS] | None = None  # type: ignore[valid-type]
    settings: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, HParam] | None = None

    @property
    def gradient(self) -> bool:
        """True for gradient kinds: OnlineTuner's (oho, greedy, truncated) and OfflineTuner's (fds)."""
        return self.kind in GRADIENT_KINDS or self.kind in OFFLINE_KINDS or self.kind in STN_KINDS

    @model_validator(mode="after")
    def _check(self) -> Method:
        if self.pruner is not None and self.gradient:
            raise ValueError(
                f"pruner: a pruner applies to black-box kinds {list(BLACKBOX_KINDS)} only, not "
                f"to kind {self.kind!r}")
        allowed = (_offline_settings() if self.kind in OFFLINE_KINDS else gradient_settings()) \
            if self.gradient else list(_BLACKBOX_SETTINGS)
        if self.kind in STN_KINDS:
            from .stn_runner import stn_settings
            allowed = stn_settings()
        if self.kind in PBT_KINDS:
            from .pbt_runner import PBT_SETTINGS
            allowed = list(PBT_SETTINGS)
        for key in self.settings:
            if key not in allowed:
                raise ValueError(f"settings.{key}: unknown setting for kind {self.kind!r}; "
                                 f"allowed: {allowed}")
        every = self.settings.get("eval_every")
        if every is not None and (not isinstance(every, int) or isinstance(every, bool)
                                  or every < 1):
            raise ValueError(f"settings.eval_every: must be an integer >= 1, got {every!r}")
        return self


class RayOptions(_Strict):
    """`[ray]`: the cluster for executor = "ray" (a local Ray when `address` is unset)."""

    address: str | None = None
    num_cpus: StrictInt | None = Field(None, gt=0, description="CPUs of a local Ray")
    max_concurrent: StrictInt | None = Field(None, gt=0, description="trials at once")
    max_failures: StrictInt = Field(2, ge=0, description="restarts of a trial whose worker died")


class Config(_Strict):
    """A validated experiment config (see the module docstring for the TOML layout)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._+-]+$")
    task: str
    seeds: list[StrictInt] = Field(default_factory=lambda: [0], min_length=1)
    budget: Budget
    output_dir: str | None = None
    target_val_loss: float | str | None = None
    steps: StrictInt | None = Field(None, gt=0)
    space: dict[str, HParam] | None = None
    methods: list[Method] = Field(min_length=1)
    executor: Literal["local", "ray"] = "local"
    ray: RayOptions | None = None

    @model_validator(mode="after")
    def _check(self) -> Config:
        from ..tasks import names
        if self.task not in names():
            raise ValueError(f"task: unknown task {self.task!r}; the bundled tasks are {names()}")
        labels = [m.label for m in self.methods]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"methods: labels must be unique, {dup} repeat")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: must be distinct, got {self.seeds}")
        if isinstance(self.target_val_loss, str) and self.target_val_loss not in labels:
            raise ValueError(f"target_val_loss: {self.target_val_loss!r} is neither a number nor "
                             f"the label of a method {labels}")
        if isinstance(self.target_val_loss, float) and not math.isfinite(self.target_val_loss):
            raise ValueError(f"target_val_loss: must be finite, got {self.target_val_loss}")
        for where, space in [("space", self.space)] + [
                (f"methods[{i}].space", m.space) for i, m in enumerate(self.methods)]:
            for hname, hp in (space or {}).items():
                if hname not in HPARAM_NAMES:
                    raise ValueError(f"{where}.{hname}: unknown hyperparameter; accepted: "
                                     f"{list(HPARAM_NAMES)}")
                if hp.per == "parameter":
                    users = [m.label for m in self.methods if not m.gradient
                             and (m.space if m.space is not None else self.space) is space]
                    if users:
                        raise ValueError(
                            f"{where}.{hname}.per: 'parameter' has far too many dimensions for "
                            f"black-box method(s) {users}; use 'layer' or 'global'")
        return self

    # -- derived ---------------------------------------------------------------------------
    def method(self, label: str) -> Method:
        """The method with this label."""
        for m in self.methods:
            if m.label == label:
                return m
        raise ConfigError(f"no method labelled {label!r}; the config has "
                          f"{[m.label for m in self.methods]}")

    def target_label(self) -> str | None:
        """Label of the method whose median best val loss defines the target (None if a float)."""
        if isinstance(self.target_val_loss, float):
            return None
        if isinstance(self.target_val_loss, str):
            return self.target_val_loss
        for m in self.methods:
            if not m.gradient:
                return m.label
        return self.methods[0].label


# -- errors ----------------------------------------------------------------------------------
_MODELS = {"": Config, "budget": Budget, "method": Method, "hparam": HParam}


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model a location points into (for listing the allowed keys)."""
    path = [p for p in loc if not isinstance(p, int)]
    if not path:
        return Config
    if path[0] == "budget" and len(path) == 1:
        return Budget
    if path[0] == "methods":
        if len(path) == 1:
            return Method
        if path[1] == "space" and len(path) == 3:
            return HParam
        return None
    if path[0] == "space" and len(path) == 2:
        return HParam
    return None


def _loc(loc: tuple) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def format_errors(err: ValidationError, source: str = "config") -> str:
    """One line per pydantic error: `config key 'methods[1].kind': what is wrong (got ...)`."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            model = _model_at(loc[:-1])
            allowed = f" (allowed: {', '.join(model.model_fields)})" if model else ""
            lines.append(f"{source} key {_loc(loc)!r}: unknown key{allowed}")
            continue
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
            # the validator names the key itself: "key: message"
            head, sep, rest = msg.partition(": ")
            if sep and " " not in head:
                key = f"{_loc(loc)}.{head}" if loc else head
                lines.append(f"{source} key {key!r}: {rest}")
                continue
            lines.append(f"{source} key {_loc(loc) or '(top level)'!r}: {msg}")
            continue
        if e["type"] == "missing":
            lines.append(f"{source} key {_loc(loc)!r}: required but missing")
            continue
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{source} key {_loc(loc)!r}: {msg}{got_s}")
    return "; ".join(lines)


def validate_config(data: dict[str, Any], source: str = "config") -> Config:
    """A `Config` from a plain dict, or ConfigError with one message naming every bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a table of keys, got {type(data).__name__}")
    if "name" not in data and isinstance(data.get("task"), str):
        data = {"name": data["task"], **data}
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, source)) from None


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML experiment config; `name` defaults to the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if tomllib is None:  # pragma: no cover
        raise ConfigError("reading TOML configs on Python 3.10 needs `pip install tomli`")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    data.setdefault("name", path.stem)
    return validate_config(data, source=str(path))


# -- writing TOML ----------------------------------------------------------------------------
def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        s = repr(v)
        return s if any(c in s for c in ".en") else s + ".0"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    if isinstance(v, dict):
        items = [f"{_key(k)} = {_scalar(x)}" for k, x in v.items() if x is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    raise ConfigError(f"cannot write {type(v).__name__} value {v!r} to TOML")


def _key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "_-" for c in k) else json.dumps(k)


def dumps_toml(data: dict[str, Any]) -> str:
    """A small TOML writer: scalars, lists, inline tables, tables and arrays of tables."""
    lines: list[str] = []
    tables: list[tuple[str, dict]] = []
    arrays: list[tuple[str, list]] = []
    for k, v in data.items():
        if v is None:
            continue
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            arrays.append((k, v))
        else:
            lines.append(f"{_key(k)} = {_scalar(v)}")
    for k, v in tables:
        flat = {a: b for a, b in v.items() if not isinstance(b, dict)}
        sub = {a: b for a, b in v.items() if isinstance(b, dict)}
        if flat or not sub:
            lines += ["", f"[{_key(k)}]"] + [f"{_key(a)} = {_scalar(b)}" for a, b in flat.items()
                                             if b is not None]
        for a, b in sub.items():
            lines += ["", f"[{_key(k)}.{_key(a)}]"] + [f"{_key(c)} = {_scalar(d)}"
                                                       for c, d in b.items() if d is not None]
    for k, items in arrays:
        for item in items:
            lines += ["", f"[[{_key(k)}]]"] + [f"{_key(a)} = {_scalar(b)}"
                                               for a, b in item.items() if b is not None]
    return "\n".join(lines).lstrip("\n") + "\n"


def config_dict(cfg: Config) -> dict[str, Any]:
    """The config as a plain dict without unset optional keys (what `dump_config` writes)."""
    return cfg.model_dump(mode="json", exclude_none=True)


def dump_config(cfg: Config) -> str:
    """The config as TOML text that `load_config` reads back to an equal Config."""
    return dumps_toml(config_dict(cfg))
