"""The run directory's study journal (blackbox/resume.py): Optuna's file format, a torn last
line dropped, trials left running failed and queued again once."""

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from hyperdescent.blackbox import resume


def _objective(trial):
    return (trial.suggest_float("x", -2.0, 2.0) - 0.5) ** 2


def test_run_journal_writes_what_optunas_file_backend_reads(tmp_path):
    from optuna.storages.journal._storage import JournalOperation
    assert resume._SET_STATE == JournalOperation.SET_TRIAL_STATE_VALUES  # fsync's trigger
    path = tmp_path / "s.journal"
    study = optuna.create_study(study_name="s", storage=resume.open_study_storage(path, False),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(_objective, n_trials=4)
    theirs = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(
        str(path))))
    assert [(t.number, t.params, t.value, t.state) for t in theirs.trials] == \
        [(t.number, t.params, t.value, t.state) for t in study.trials]
    # reopened with a write torn by a kill: the torn line is gone, the rest continues
    with path.open("ab") as f:
        f.write(b'{"op_code": 4, "worker_id": "x", "study_id"')
    again = optuna.load_study(study_name="s", storage=resume.open_study_storage(path, True))
    assert len(again.trials) == 4
    again.optimize(_objective, n_trials=1)
    assert [t.number for t in optuna.load_study(study_name="s", storage=JournalStorage(
        JournalFileBackend(str(path)))).trials] == [0, 1, 2, 3, 4]
    # not resuming: a journal left there is not continued
    fresh = resume.open_study_storage(path, False)
    with pytest.raises(KeyError):
        optuna.load_study(study_name="s", storage=fresh)


def test_fail_killed_fails_running_trials_and_queues_each_once(tmp_path):
    path = tmp_path / "s.journal"
    storage = resume.open_study_storage(path, False)
    assert resume.fail_killed(storage, "s") == []  # no study yet
    study = optuna.create_study(study_name="s", storage=storage)
    study.optimize(_objective, n_trials=2)
    cut = study.ask()  # a trial the dead process was running
    x = cut.suggest_float("x", -2.0, 2.0)
    storage = resume.open_study_storage(path, True)
    done = resume.fail_killed(storage, "s")
    assert [(t.number, t.state) for t in done] == [(0, TrialState.COMPLETE),
                                                   (1, TrialState.COMPLETE),
                                                   (2, TrialState.FAIL)]
    waiting = optuna.load_study(study_name="s", storage=storage).get_trials(
        states=(TrialState.WAITING,))
    assert len(waiting) == 1
    assert waiting[0].user_attrs[resume.RETRY_OF] == 2
    # a second resume before the rerun ran queues nothing more
    resume.fail_killed(resume.open_study_storage(path, True), "s")
    study = optuna.load_study(study_name="s", storage=resume.open_study_storage(path, True))
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 1
    study.optimize(_objective, n_trials=1)
    assert study.trials[-1].params == {"x": x} and study.trials[-1].state == TrialState.COMPLETE
