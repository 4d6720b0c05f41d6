"""Several workers on one shared study: trials handed out within the budget, dead workers' trials
retried, the front re-scored once."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from hwprune._progress import Progress
from hwprune.search._interrupt import Interrupt
from hwprune.search._storage import StudyStorage, process_is_gone, worker_id

if TYPE_CHECKING:
    from hwprune.search._study import SearchObjective

log = logging.getLogger("hwprune.search._study")

RESCORED_ATTR = "hwprune_rescored_by"


def params_key(params: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """A hashable form of a trial's parameters."""
    return tuple(sorted(params.items()))


def _trial_key(trial: optuna.trial.FrozenTrial) -> tuple[tuple[str, Any], ...]:
    """The widths a trial has, or will have when it runs (a queued trial's fixed parameters)."""
    if trial.state == TrialState.WAITING:
        return params_key(trial.system_attrs.get("fixed_params", {}))
    return params_key(trial.params)


LIVE = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)


class _SharedTrial:
    """The objective as one worker of several runs it: within the study's budget, never a repeat.

    Trial numbers are handed out by the storage in order, so a trial with `n_trials` live (finished,
    running or queued) trials before it is surplus: pruned unrun, and the study finishes with
    exactly `n_trials` complete. A trial whose widths another live trial already has is pruned too.
    """

    def __init__(self, objective: SearchObjective, n_trials: int, worker: str) -> None:
        self.objective, self.n_trials, self.worker = objective, n_trials, worker
        self.given_up: set[int] = set()  # earlier trials that stayed half-suggested: never waited for again

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        trial.set_user_attr("worker", self.worker)
        live = trial.study.get_trials(deepcopy=False, states=LIVE)
        if sum(t.number < trial.number for t in live) >= self.n_trials:
            trial.set_user_attr("surplus", True)
            raise optuna.TrialPruned("the study's trial budget is handed out")
        widths, precisions = self.objective.suggest(trial)
        twin = self._earlier_twin(trial)
        if twin is not None:
            trial.set_user_attr("duplicate_of", twin)
            raise optuna.TrialPruned(f"trial {twin} has the same widths")
        return self.objective.score(trial, widths, precisions)

    def _earlier_twin(self, trial: optuna.Trial, patience_s: float = 5.0) -> int | None:
        """The number of an earlier live trial with this trial's widths, if any.

        An earlier trial still being suggested (fewer parameters than ours) may become a twin: wait
        for its parameters (milliseconds), so that of two equal trials the later one always yields.
        """
        mine, size = params_key(trial.params), len(trial.params)
        deadline = time.monotonic() + patience_s
        while True:
            earlier = [
                t for t in trial.study.get_trials(deepcopy=False, states=LIVE) if t.number < trial.number
            ]
            twin = next((t.number for t in earlier if _trial_key(t) == mine), None)
            if twin is not None:
                return twin
            pending = [
                t.number
                for t in earlier
                if t.state == TrialState.RUNNING and len(t.params) < size and t.number not in self.given_up
            ]
            if not pending:
                return None
            if time.monotonic() > deadline:  # a worker stuck that long is dead or dying
                self.given_up.update(pending)
                return None
            time.sleep(0.005)


def work_shared(
    study: optuna.Study,
    objective: SearchObjective,
    storage: StudyStorage,
    n_trials: int,
    poll_s: float,
    interrupt: Interrupt,
) -> None:
    """Run trials until the study holds `n_trials` complete ones, whoever ran them."""
    worker = worker_id()
    guarded = _SharedTrial(objective, n_trials, worker)
    at_start = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    tracker = Progress(f"search, trials of study {study.study_name}", max(n_trials - at_start, 0), logger=log)
    while not interrupt.requested:
        trials = study.get_trials(deepcopy=False)
        if _fail_dead_workers(study, storage, trials):
            continue  # states changed: count again
        count = {s: sum(t.state == s for t in trials) for s in LIVE}
        complete = count[TrialState.COMPLETE]
        tracker.advance(max(complete - at_start - tracker.done, 0))  # every worker's trials count
        if complete >= n_trials:
            break
        if sum(count.values()) >= n_trials and not count[TrialState.WAITING]:
            time.sleep(poll_s)  # the rest is running elsewhere: wait for it to finish or go stale
            if storage.heartbeat:  # Optuna checks heartbeats before each trial it runs, not while we wait
                optuna.storages.fail_stale_trials(study)
            continue
        study.optimize(guarded, n_trials=1)
    mine = sum(
        t.user_attrs.get("worker") == worker
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    )
    log.info(
        "study %s complete: %d trials, %d of them by this worker (%s)",
        study.study_name,
        n_trials,
        mine,
        worker,
    )


def _fail_dead_workers(
    study: optuna.Study,
    storage: StudyStorage,
    trials: list[optuna.trial.FrozenTrial],
    untagged_s: float = 120.0,
) -> bool:
    """Fail running trials (of `trials`, just fetched) whose worker is gone; True if any was.

    Those that had reached the objective are queued again. PostgreSQL's heartbeats are Optuna's
    own check (before every trial it runs); a journal file, which has none, finds a dead worker by
    the process id of its trials on this machine (a journal is shared by one machine). A trial still
    without its worker tag after `untagged_s` never reached the objective: its worker died while
    sampling, before Optuna's first heartbeat, which Optuna's own check never counts as stale.
    """
    now, failed = datetime.now(), False
    for t in (t for t in trials if t.state == TrialState.RUNNING):
        worker = t.user_attrs.get("worker")
        if worker is None:
            if now - (t.datetime_start or now) < timedelta(seconds=untagged_s):
                continue
        elif storage.heartbeat or not process_is_gone(worker):
            continue
        with storage.lock("reap"):  # two workers must not both fail and re-queue it
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.number not in {r.number for r in running}:
                continue
            study.tell(t.number, state=TrialState.FAIL)
            if worker is not None and t.params:
                study.enqueue_trial(t.params)
        failed = True
        log.warning(
            "trial %d's worker %s is gone: marked failed%s",
            t.number,
            worker or "(untagged)",
            " and queued again" if worker else "",
        )
    return failed


@contextlib.contextmanager
def rescoring_turn(study: optuna.Study, storage: StudyStorage, run_dir: Path) -> Iterator[str | None]:
    """Whose turn it is to re-score the study's front: yields None for this process, else who has it.

    A single-process study is always re-scored here. Of the workers of a shared study, the first to
    finish takes the storage's lock and re-scores; the study then records who did (only when the
    re-scoring succeeded: if it fails, the next worker to finish, or any rerun, does it).
    """
    if not storage.shared:
        yield None
        return
    with storage.lock(f"rescore:{study.study_name}", wait=False) as mine:
        if not mine:
            yield "another worker, re-scoring now"
            return
        done = study.user_attrs.get(RESCORED_ATTR)
        if done:
            yield f"worker {done['worker']} into {done['run_dir']}"
            return
        yield None
        study.set_user_attr(RESCORED_ATTR, {"worker": worker_id(), "run_dir": str(run_dir.resolve())})
