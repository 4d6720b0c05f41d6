"""The Optuna study: per-layer widths in, (predicted latency, proxy loss) out; resumable storage."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from hwprune import cost_models
from hwprune._progress import Progress
from hwprune.search._proxy import SaliencyProxy
from hwprune.search._space import SearchSpace, Widths
from hwprune.search._storage import StudyStorage, process_is_gone, worker_id

log = logging.getLogger(__name__)

IDENTITY_ATTR = "hwprune_identity"
RESCORED_ATTR = "hwprune_rescored_by"


def study_name_for(identity: Mapping[str, Any]) -> str:
    """A study name derived from what the study is about: one study per identity in a shared storage."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return f"hwprune-{digest[:12]}"


def identity_differences(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """`key: recorded -> wanted` for every part of two identities that differs."""
    keys = sorted(set(recorded) | set(wanted))
    return [
        f"{k}: {recorded.get(k)!r} -> {wanted.get(k)!r}" for k in keys if recorded.get(k) != wanted.get(k)
    ]


@dataclass(frozen=True)
class Constraints:
    """Optional budgets; a trial over any of them is infeasible (Optuna's constrained domination).

    Attributes:
        latency_ms: Latency budget in milliseconds.
        latency_fraction: Latency budget as a fraction of the dense model's predicted latency.
        params_fraction: Budget on the blocks' parameters as a fraction of the dense model's.
    """

    latency_ms: float | None = None
    latency_fraction: float | None = None
    params_fraction: float | None = None

    def __post_init__(self) -> None:
        for name in ("latency_ms", "latency_fraction", "params_fraction"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"constraint {name} must be positive, got {value}")

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.latency_ms, self.latency_fraction, self.params_fraction))

    def latency_limit(self, dense_ms: float) -> float:
        """The tightest latency budget in milliseconds (infinite without one)."""
        limits = [
            self.latency_ms,
            None if self.latency_fraction is None else self.latency_fraction * dense_ms,
        ]
        return min((v for v in limits if v is not None), default=float("inf"))


def block_params(spec: cost_models.BlockSpec, widths: Widths) -> np.ndarray:
    """Weights of the blocks (biases and norms aside) at the given widths, summed over layers."""
    return spec.params(*widths).sum(-1)


class SearchObjective:
    """Scores one trial: predicted latency on the target and summed saliency of the removed units."""

    def __init__(
        self,
        space: SearchSpace,
        cost_model: cost_models.CostModel,
        proxy: SaliencyProxy,
        constraints: Constraints,
    ) -> None:
        self.space, self.cost_model, self.proxy, self.constraints = space, cost_model, proxy, constraints
        self.dense_ms = cost_model.dense_ms()
        self.dense_params = float(block_params(cost_model.spec, space.dense()))

    def suggest(self, trial: optuna.Trial) -> Widths:
        n = self.space.num_layers
        axes = [("units", self.space.unit_choices), ("mlp", self.space.mlp_choices)]
        if self.space.moe:
            axes += [
                ("experts", self.space.expert_choices),
                ("expert_width", self.space.expert_width_choices),
            ]
        picked = [
            np.array([trial.suggest_int(f"{name}_{i}", 0, len(c) - 1) for i in range(n)]) for name, c in axes
        ]
        return self.space.widths(*picked)

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        return self.score(trial, self.suggest(trial))

    def score(self, trial: optuna.Trial, widths: Widths) -> tuple[float, float]:
        """The objectives of the suggested widths; constraints and widths recorded on the trial.

        Raises:
            optuna.TrialPruned: With depth pruning, for widths that drop every layer (not a model).
        """
        units, mlp, experts, expert_width = widths
        dropped = self.proxy.dropped(units, mlp)
        if dropped.all():
            raise optuna.TrialPruned("these widths drop every layer; a model keeps at least one")
        latency = float(
            self.cost_model.predict(
                units, mlp, dropped=dropped, experts=experts, expert_width=expert_width
            ).latency_ms
        )
        loss = float(self.proxy.loss(*widths)[0])
        params = float(block_params(self.cost_model.spec, widths))
        for name, value in widths._asdict().items():
            if value is not None:
                trial.set_user_attr(name, value.tolist())
        trial.set_user_attr("block_params", params)
        c = self.constraints
        if c.latency_ms is not None:
            trial.set_constraint("latency_ms", latency - c.latency_ms)
        if c.latency_fraction is not None:
            trial.set_constraint("latency_fraction", latency / self.dense_ms - c.latency_fraction)
        if c.params_fraction is not None:
            trial.set_constraint("params_fraction", params / self.dense_params - c.params_fraction)
        return latency, loss

    def params_of(self, widths: Widths) -> dict[str, int]:
        """Trial parameters (choice indices) of a configuration, for enqueueing it."""
        choices = {
            "units": self.space.unit_choices,
            "mlp": self.space.mlp_choices,
            "experts": self.space.expert_choices,
            "expert_width": self.space.expert_width_choices,
        }
        out: dict[str, int] = {}
        for name, values in widths._asdict().items():
            if values is not None:
                out |= {f"{name}_{i}": list(choices[name]).index(int(v)) for i, v in enumerate(values)}
        return out


def run_study(
    objective: SearchObjective,
    *,
    sampler: optuna.samplers.BaseSampler,
    storage: StudyStorage,
    n_trials: int,
    seeds: list[Widths],
    identity: Mapping[str, Any] | None = None,
    study_name: str | None = None,
    poll_s: float = 1.0,
) -> optuna.Study:
    """Create, resume or join the study and run it until it holds `n_trials` finished trials.

    Seeds (dense, uniform ratios, exact-front points) are enqueued once. On a single-process storage,
    trials left running by a killed process are marked failed. On a shared storage this is one worker
    of several: `n_trials` is the study's total, no configuration is run twice, and trials of
    workers that died are failed (by heartbeat on PostgreSQL, by process id on a journal file) and run
    again by whoever is left.

    Args:
        identity: What the study is about (model, task, hardware, workload, saliency, space). It is
            recorded in a new study; resuming or joining a study recorded for anything else stops
            with an error naming the differences, before any trial runs. A single-process storage
            (a run directory's journal) holds one identity only.
        study_name: The study's name; default derived from `identity`.
        poll_s: How often a worker whose budget is all handed out checks on the others' trials.

    Raises:
        ValueError: The storage holds this study (or, for a run directory, any study) for
            another identity, or another process holds a single-process storage.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage.hold_single_worker()
    identity = dict(identity or {})
    name = study_name or (study_name_for(identity) if identity else "hwprune")
    with storage.lock("create"):  # workers starting together create the study and its seeds once
        study = _open_study(objective, sampler, storage, name, identity, seeds)
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if done:
        log.info("resuming study %s: %d of %d trials finished", name, done, n_trials)
    if not storage.shared:
        if remaining := max(n_trials - done, 0):
            tracker = Progress("search, trials", remaining, logger=log)
            study.optimize(objective, n_trials=remaining, callbacks=[lambda s, t: tracker.advance()])
        return study
    with warnings.catch_warnings():  # Optuna flags its heartbeat API experimental on every use
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        _work_shared(study, objective, storage, n_trials, poll_s)
    return study


def _open_study(
    objective: SearchObjective,
    sampler: optuna.samplers.BaseSampler,
    storage: StudyStorage,
    name: str,
    identity: dict[str, Any],
    seeds: list[Widths],
) -> optuna.Study:
    """The study `name`, checked against `identity`, with its seeds enqueued once."""
    if storage.kind == "run_dir" and identity:
        for other in optuna.get_all_study_names(storage.storage):
            recorded = optuna.load_study(study_name=other, storage=storage.storage).user_attrs.get(
                IDENTITY_ATTR
            )
            if recorded is not None and recorded != identity:
                raise ValueError(
                    f"this run directory holds a study made for other settings ({'; '.join(identity_differences(recorded, identity))}); "
                    "resume it with the settings it was made with, or start a new run directory"
                )
    study = optuna.create_study(
        study_name=name,
        storage=storage.storage,
        sampler=sampler,
        directions=["minimize", "minimize"],
        load_if_exists=True,
    )
    recorded = study.user_attrs.get(IDENTITY_ATTR)
    if identity and recorded is None:
        study.set_user_attr(IDENTITY_ATTR, identity)
    elif identity and recorded != identity:
        raise ValueError(
            f"study {name!r} was made for other settings ({'; '.join(identity_differences(recorded or {}, identity))}); "
            "join it with the same settings or give this search another search.study_name"
        )
    if not storage.shared:  # this process holds the storage: whatever is running was interrupted
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(t.number, state=TrialState.FAIL)
            log.info("trial %d was left running by an interrupted run; marked failed", t.number)
    known = {_key(t.params) for t in study.get_trials(deepcopy=False)}
    known |= {
        _key(t.system_attrs.get("fixed_params", {}))
        for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    }
    for widths in seeds:
        params = objective.params_of(widths)
        if _key(params) not in known:
            study.enqueue_trial(params, skip_if_exists=True)
            known.add(_key(params))
    return study


def _key(params: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(params.items()))


def _params_key(trial: optuna.trial.FrozenTrial) -> tuple[tuple[str, Any], ...]:
    """The widths a trial has, or will have when it runs (a queued trial's fixed parameters)."""
    if trial.state == TrialState.WAITING:
        return _key(trial.system_attrs.get("fixed_params", {}))
    return _key(trial.params)


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
        widths = self.objective.suggest(trial)
        twin = self._earlier_twin(trial)
        if twin is not None:
            trial.set_user_attr("duplicate_of", twin)
            raise optuna.TrialPruned(f"trial {twin} has the same widths")
        return self.objective.score(trial, widths)

    def _earlier_twin(self, trial: optuna.Trial, patience_s: float = 5.0) -> int | None:
        """The number of an earlier live trial with this trial's widths, if any.

        An earlier trial still being suggested (fewer parameters than ours) may become a twin: wait
        for its parameters (milliseconds), so that of two equal trials the later one always yields.
        """
        mine, size = _key(trial.params), len(trial.params)
        deadline = time.monotonic() + patience_s
        while True:
            earlier = [
                t for t in trial.study.get_trials(deepcopy=False, states=LIVE) if t.number < trial.number
            ]
            twin = next((t.number for t in earlier if _params_key(t) == mine), None)
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


def _work_shared(
    study: optuna.Study, objective: SearchObjective, storage: StudyStorage, n_trials: int, poll_s: float
) -> None:
    """Run trials until the study holds `n_trials` complete ones, whoever ran them."""
    worker = worker_id()
    guarded = _SharedTrial(objective, n_trials, worker)
    at_start = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    tracker = Progress(f"search, trials of study {study.study_name}", max(n_trials - at_start, 0), logger=log)
    while True:
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
