"""Continuing a black-box study whose process was killed: the study lives in a journal file of
the run directory; trials the dead process left running are marked failed and queued again
with the values they had, so that the study ends with as many finished trials as it was asked
for and every trial that finished before the kill is kept as it was."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import optuna
from optuna.storages.journal import BaseJournalBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from ..experiment.run_checkpoint import run_stem

STUDIES = "studies"
RETRY_OF = "retry_of"  # user attribute of a queued rerun: the number of the killed trial
_DONE = (TrialState.COMPLETE, TrialState.PRUNED)
_SET_STATE = 6  # optuna.storages.journal's operation code for a trial's state and values


class RunJournal(BaseJournalBackend):
    """An Optuna journal in a file that one process writes (a run directory's study): its
    logs are kept in memory too, so no operation takes a file lock or re-reads the file as a
    journal shared between processes must; every append is flushed (a killed process loses
    none) and, once a trial finishes, fsync'ed, before its record goes to metrics.jsonl."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._logs: list[dict[str, Any]] = []
        if self.path.is_file():
            for line in self.path.read_bytes().splitlines(keepends=True):
                if not line.endswith(b"\n"):
                    break  # torn by a kill mid-write: never complete
                self._logs.append(json.loads(line))

    def read_logs(self, log_number_from: int) -> Iterable[dict[str, Any]]:
        """The logs from number `log_number_from` on."""
        return self._logs[log_number_from:]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        """Append `logs` to the file and to memory (as read back from the file would be)."""
        lines = [json.dumps(log, separators=(",", ":")) for log in logs]
        finished = any(log.get("op_code") == _SET_STATE and TrialState(log["state"]).is_finished()
                       for log in logs)
        with self.path.open("ab") as f:
            f.write("".join(line + "\n" for line in lines).encode("utf-8"))
            f.flush()
            if finished:
                os.fsync(f.fileno())
        self._logs.extend(json.loads(line) for line in lines)


def study_file(run_dir: str | Path, index: int, label: str, seed: int) -> Path:
    """The journal of method number `index` (labelled `label`) for `seed` in `run_dir`: one
    file per run, so each keeps the study name (hence Hyperband's brackets) of a run in memory."""
    return Path(run_dir) / STUDIES / f"{run_stem(index, label, seed)}.journal"


def repair_journal(path: str | Path) -> None:
    """Make a journal left by a killed process appendable: drop a torn last line (a write cut
    short, which would corrupt the next one) and the lock file of a lock it died holding
    (a journal that Optuna's JournalFileBackend wrote)."""
    path = Path(path)
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
                f.flush()
                os.fsync(f.fileno())
    # the caller resumes a run directory whose writer is dead, so nobody else holds the lock
    Path(f"{path}.lock").unlink(missing_ok=True)


def open_study_storage(path: str | Path, resume: bool) -> JournalStorage:
    """The JournalStorage on `path` (a RunJournal): repaired first when resuming, else
    started afresh (a journal without its run's records is not one to continue)."""
    path = Path(path)
    if resume:
        repair_journal(path)
    else:
        path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(RunJournal(path))


def fail_killed(storage, study_name: str) -> list[FrozenTrial]:
    """Mark the trials left RUNNING in `study_name` failed and queue each failed trial once
    again with its values; returns the finished trials (complete, pruned, failed) by number,
    or [] when the study does not exist yet."""
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return []
    study_id = storage.get_study_id_from_name(study_name)
    for ft in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, ft.number)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get(RETRY_OF) for t in trials}
    for ft in trials:
        # a rerun queued before a second kill is not queued again
        if ft.state == TrialState.FAIL and ft.number not in retried:
            study.enqueue_trial(dict(ft.params), user_attrs={RETRY_OF: ft.number},
                                skip_if_exists=False)
    return sorted((t for t in study.get_trials(deepcopy=False)
                   if t.state in (*_DONE, TrialState.FAIL)), key=lambda t: t.number)
