"""The Optuna study: per-layer widths in, (predicted latency, proxy loss) out; resumable storage."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from hwprune import cost_models
from hwprune._progress import Progress
from hwprune.search._space import SaliencyProxy, SearchSpace

log = logging.getLogger(__name__)

IDENTITY_ATTR = "hwprune_identity"


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


def block_params(spec: cost_models.BlockSpec, units: np.ndarray, mlp: np.ndarray) -> np.ndarray:
    """Weights of the blocks (biases and norms aside) at the given widths, summed over layers."""
    return spec.params(units, mlp).sum(-1)


def open_storage(storage: str | None, run_dir: Path) -> tuple[Any, bool]:
    """The study storage, and whether it is the single-process default (a journal in the run dir).

    Args:
        storage: None for `<run_dir>/study.journal`; a path ending in .journal/.log for a journal
            file; anything else is an Optuna RDB URL (sqlite:///..., postgresql://...).
    """
    if storage is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(run_dir / "study.journal"))), True
    if storage.endswith((".journal", ".log")):
        Path(storage).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(Path(storage).expanduser()))), False
    return storage, False


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
        self.dense_params = float(block_params(cost_model.spec, *space.dense()))

    def suggest(self, trial: optuna.Trial) -> tuple[np.ndarray, np.ndarray]:
        n_u, n_m = len(self.space.unit_choices), len(self.space.mlp_choices)
        ui = [trial.suggest_int(f"units_{i}", 0, n_u - 1) for i in range(self.space.num_layers)]
        mi = [trial.suggest_int(f"mlp_{i}", 0, n_m - 1) for i in range(self.space.num_layers)]
        return self.space.widths(np.array(ui), np.array(mi))

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        units, mlp = self.suggest(trial)
        latency = float(self.cost_model.predict(units, mlp).latency_ms)
        loss = float(self.proxy.loss(units, mlp)[0])
        params = float(block_params(self.cost_model.spec, units, mlp))
        trial.set_user_attr("units", units.tolist())
        trial.set_user_attr("mlp", mlp.tolist())
        trial.set_user_attr("block_params", params)
        c = self.constraints
        if c.latency_ms is not None:
            trial.set_constraint("latency_ms", latency - c.latency_ms)
        if c.latency_fraction is not None:
            trial.set_constraint("latency_fraction", latency / self.dense_ms - c.latency_fraction)
        if c.params_fraction is not None:
            trial.set_constraint("params_fraction", params / self.dense_params - c.params_fraction)
        return latency, loss

    def params_of(self, units: np.ndarray, mlp: np.ndarray) -> dict[str, int]:
        """Trial parameters (choice indices) of a configuration, for enqueueing it."""
        uc, mc = list(self.space.unit_choices), list(self.space.mlp_choices)
        out = {f"units_{i}": uc.index(int(u)) for i, u in enumerate(units)}
        out |= {f"mlp_{i}": mc.index(int(m)) for i, m in enumerate(mlp)}
        return out


def run_study(
    objective: SearchObjective,
    *,
    sampler: optuna.samplers.BaseSampler,
    storage: Any,
    single_process: bool,
    n_trials: int,
    seeds: list[tuple[np.ndarray, np.ndarray]],
    identity: Mapping[str, Any] | None = None,
    study_name: str | None = None,
) -> optuna.Study:
    """Create or resume the study and run it until it holds `n_trials` finished trials.

    Seeds (dense, uniform ratios, exact-front points) are enqueued once; a resumed study skips those
    it already has. Trials left running by a killed process are marked failed (single-process
    storage only: with a shared database they may belong to another worker).

    Args:
        identity: What the study is about (model, task, hardware, workload, saliency, space). It is
            recorded in a new study; resuming or joining a study recorded for anything else stops
            with an error naming the differences, before any trial runs. A single-process storage
            (a run directory's journal) holds one identity only.
        study_name: The study's name; default derived from `identity`.

    Raises:
        ValueError: The storage holds this study (or, for a run directory, any study) for
            another identity.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    identity = dict(identity or {})
    name = study_name or (study_name_for(identity) if identity else "hwprune")
    if single_process and identity:
        for other in optuna.get_all_study_names(storage):
            recorded = optuna.load_study(study_name=other, storage=storage).user_attrs.get(IDENTITY_ATTR)
            if recorded is not None and recorded != identity:
                raise ValueError(
                    f"this run directory holds a study made for other settings ({'; '.join(identity_differences(recorded, identity))}); "
                    "resume it with the settings it was made with, or start a new run directory"
                )
    study = optuna.create_study(
        study_name=name,
        storage=storage,
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
    if single_process:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(t.number, state=TrialState.FAIL)
            log.info("trial %d was left running by an interrupted run; marked failed", t.number)
    known = {tuple(sorted(t.params.items())) for t in study.get_trials(deepcopy=False)}
    known |= {
        tuple(sorted(t.system_attrs.get("fixed_params", {}).items()))
        for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    }
    for units, mlp in seeds:
        params = objective.params_of(units, mlp)
        if tuple(sorted(params.items())) not in known:
            study.enqueue_trial(params, skip_if_exists=True)
            known.add(tuple(sorted(params.items())))
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    remaining = max(n_trials - done, 0)
    if done:
        log.info("resuming study: %d trials finished, %d to go", done, remaining)
    if remaining:
        tracker = Progress("search, trials", remaining, logger=log)
        study.optimize(objective, n_trials=remaining, callbacks=[lambda s, t: tracker.advance()])
    return study
