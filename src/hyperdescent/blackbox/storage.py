"""Study storage shared by many workers: a database URL becomes an Optuna RDBStorage with
heartbeats, so that a trial whose worker died is marked failed and run again by another one; a
file path (`pathlib.Path` or a `journal:PATH` URL) becomes a JournalStorage on that file, which
processes on one machine share without SQLite's "database is locked"."""

from __future__ import annotations

import importlib.util
import inspect
import os
import warnings
from typing import Any

import optuna

from ..errors import ConfigError

DATABASE_SCHEMES = ("postgresql", "postgres", "mysql")
# the keyword was renamed in Optuna 5 (the old one still works there, with a FutureWarning)
_STALE_CALLBACK = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in
                   inspect.signature(optuna.storages.RDBStorage.__init__).parameters
                   else "failed_trial_callback")
_RETRY = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback",
                 optuna.storages.RetryFailedTrialCallback)


def is_database_url(storage: Any) -> bool:
    """Whether `storage` is a PostgreSQL or MySQL URL (SQLAlchemy form, driver suffix allowed)."""
    return isinstance(storage, str) and storage.split(":", 1)[0].split("+", 1)[0].lower() \
        in DATABASE_SCHEMES


def _with_driver(url: str) -> str:
    """`url` with an installed PostgreSQL driver named (psycopg 3, else psycopg2) where it names
    none: SQLAlchemy's default driver differs between versions."""
    scheme, rest = url.split(":", 1)
    if scheme.lower() not in ("postgresql", "postgres"):
        return url
    for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}:{rest}"
    raise ConfigError(f"storage {url.split('@')[-1]!r} needs a PostgreSQL driver: "
                      f"pip install 'hyperdescent[postgres]'")


def journal_path(storage: Any) -> str | None:
    """The file of a journal storage (a path, or a `journal:PATH` / `journal:///abs` URL)."""
    if isinstance(storage, os.PathLike):
        return os.fspath(storage)
    if isinstance(storage, str) and storage.startswith("journal:"):
        path = storage[len("journal:"):]
        path = path[2:] if path.startswith("//") else path
        if not path:
            raise ConfigError(f"storage {storage!r} names no file; give journal:PATH")
        return path
    return None


def shared_storage(storage: Any, heartbeat_interval: int = 10, grace_period: int | None = None,
                   max_retry: int = 3) -> Any:
    """An RDBStorage with a heartbeat every `heartbeat_interval` s and `max_retry` reruns of a
    trial left running by a dead worker, for a database URL; a JournalStorage with a file
    backend for a path; any other storage unchanged."""
    path = journal_path(storage)
    if path is not None:
        from optuna.storages.journal import JournalFileBackend, JournalStorage
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        return JournalStorage(JournalFileBackend(path))
    if not is_database_url(storage):
        return storage
    url = _with_driver(storage)
    try:
        with warnings.catch_warnings():  # heartbeats are asked for: no "experimental" warning
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                engine_kwargs={"pool_pre_ping": True},
                **{_STALE_CALLBACK: _RETRY(max_retry=max_retry)})
    except ImportError as e:
        raise ConfigError(f"storage {storage.split('@')[-1]!r} needs a database driver: "
                          f"pip install 'hyperdescent[postgres]' (psycopg2)") from e
