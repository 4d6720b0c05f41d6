"""The Optuna study: per-layer widths in, (predicted latency, proxy loss) out; resumable storage."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from hwprune import cost_models
from hwprune._progress import Progress
from hwprune.errors import ConfigError
from hwprune.search._identity import IDENTITY_ATTR, identity_differences, other_settings, study_name_for
from hwprune.search._interrupt import between_trials
from hwprune.search._precision_axis import PrecisionAxis, Precisions
from hwprune.search._proxy import SaliencyProxy
from hwprune.search._space import SearchSpace, Widths
from hwprune.search._storage import StudyStorage
from hwprune.search._workers import params_key, work_shared

log = logging.getLogger(__name__)


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
                raise ConfigError(f"constraint {name} must be positive, got {value}")

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


# Trial parameter names of the precision axis (index into the axis's precisions, per layer).
PRECISION_PARAMS = ("attention_precision", "mlp_precision")


def block_params(spec: cost_models.BlockSpec, widths: Widths) -> np.ndarray:
    """Weights of the blocks (biases and norms aside) at the given widths, summed over layers."""
    return spec.params(*widths).sum(-1)


class SearchObjective:
    """Scores one trial: predicted latency on the target and the proxy loss of what it changes
    (the summed saliency of the removed units, plus with a precision axis its blocks' precisions)."""

    def __init__(
        self,
        space: SearchSpace,
        cost_model: cost_models.CostModel,
        proxy: SaliencyProxy,
        constraints: Constraints,
        axis: PrecisionAxis | None = None,
    ) -> None:
        self.space, self.cost_model, self.proxy, self.constraints = space, cost_model, proxy, constraints
        self.axis = axis
        self.dense_ms = cost_model.dense_ms()
        self.dense_params = float(block_params(cost_model.spec, space.dense()))

    def suggest(self, trial: optuna.Trial) -> tuple[Widths, Precisions | None]:
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
        precisions = None
        if self.axis is not None:
            top = len(self.axis.precisions) - 1
            precisions = Precisions(
                *(
                    np.array([trial.suggest_int(f"{block}_{i}", 0, top) for i in range(n)])
                    for block in PRECISION_PARAMS
                )
            )
        return self.space.widths(*picked), precisions

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        return self.score(trial, *self.suggest(trial))

    def score(
        self, trial: optuna.Trial, widths: Widths, precisions: Precisions | None = None
    ) -> tuple[float, float]:
        """The objectives of the suggested widths (and precisions); constraints, widths and
        precisions recorded on the trial.

        Raises:
            optuna.TrialPruned: With depth pruning, for widths that drop every layer (not a model).
        """
        units, mlp, experts, expert_width = widths
        dropped = self.proxy.dropped(units, mlp)
        if dropped.all():
            raise optuna.TrialPruned("these widths drop every layer; a model keeps at least one")
        loss = float(self.proxy.loss(*widths)[0])
        if self.axis is not None and precisions is not None:
            precisions = self.axis.canonical(widths, precisions)  # the same objectives, named once
            latency = float(self.axis.latency(widths, precisions, dropped).latency_ms)
            loss += float(self.axis.loss(widths, precisions)[0])
            attention, rest = self.axis.names(precisions)
            trial.set_user_attr("attention_precision", attention)
            trial.set_user_attr("mlp_precision", rest)
        else:
            latency = float(
                self.cost_model.predict(
                    units, mlp, dropped=dropped, experts=experts, expert_width=expert_width
                ).latency_ms
            )
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

    def params_of(self, widths: Widths, precisions: Precisions | None = None) -> dict[str, int]:
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
        if self.axis is not None:
            chosen = precisions or self.axis.reference(self.space.num_layers)
            for block, values in zip(PRECISION_PARAMS, chosen, strict=True):
                out |= {f"{block}_{i}": int(v) for i, v in enumerate(values)}
        return out


def run_study(
    objective: SearchObjective,
    *,
    sampler: optuna.samplers.BaseSampler,
    storage: StudyStorage,
    n_trials: int,
    seeds: list[tuple[Widths, Precisions | None]],
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
    with _optuna_warnings_only():
        return _run_study(objective, sampler, storage, n_trials, seeds, identity, study_name, poll_s)


@contextlib.contextmanager
def _optuna_warnings_only() -> Iterator[None]:
    """Optuna's per-trial INFO lines off (our progress says the same once) while the study runs;
    the caller's verbosity is restored after."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def _run_study(
    objective: SearchObjective,
    sampler: optuna.samplers.BaseSampler,
    storage: StudyStorage,
    n_trials: int,
    seeds: list[tuple[Widths, Precisions | None]],
    identity: Mapping[str, Any] | None,
    study_name: str | None,
    poll_s: float,
) -> optuna.Study:
    storage.hold_single_worker()
    identity = dict(identity or {})
    name = study_name or (study_name_for(identity) if identity else "hwprune")
    with storage.lock("create"):  # workers starting together create the study and its seeds once
        study = _open_study(objective, sampler, storage, name, identity, seeds)
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if done:
        log.info("resuming study %s: %d of %d trials finished", name, done, n_trials)
    with between_trials() as interrupt:
        if not storage.shared:
            if remaining := max(n_trials - done, 0):
                tracker = Progress("search, trials", remaining, logger=log)
                callbacks = [lambda s, t: tracker.advance(), interrupt.stop_study]
                study.optimize(objective, n_trials=remaining, callbacks=callbacks)
        else:
            with warnings.catch_warnings():  # Optuna flags its heartbeat API experimental on every use
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                work_shared(study, objective, storage, n_trials, poll_s, interrupt)
    if interrupt.requested:
        raise KeyboardInterrupt
    return study


def _open_study(
    objective: SearchObjective,
    sampler: optuna.samplers.BaseSampler,
    storage: StudyStorage,
    name: str,
    identity: dict[str, Any],
    seeds: list[tuple[Widths, Precisions | None]],
) -> optuna.Study:
    """The study `name`, checked against `identity`, with its seeds enqueued once."""
    if storage.kind == "run_dir" and identity:
        for other in optuna.get_all_study_names(storage.storage):
            recorded = optuna.load_study(study_name=other, storage=storage.storage).user_attrs.get(
                IDENTITY_ATTR
            )
            if recorded is not None and recorded != identity:
                raise other_settings(identity_differences(recorded, identity))
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
        raise other_settings(identity_differences(recorded or {}, identity), name)
    if not storage.shared:  # this process holds the storage: whatever is running was interrupted
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(t.number, state=TrialState.FAIL)
            log.info("trial %d was left running by an interrupted run; marked failed", t.number)
    known = {params_key(t.params) for t in study.get_trials(deepcopy=False)}
    known |= {
        params_key(t.system_attrs.get("fixed_params", {}))
        for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    }
    for widths, precisions in seeds:
        params = objective.params_of(widths, precisions)
        if params_key(params) not in known:
            study.enqueue_trial(params, skip_if_exists=True)
            known.add(params_key(params))
    return study
