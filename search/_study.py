"""The Optuna study: per-layer widths in, (predicted latency, proxy loss) out; resumable storage."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from rich.progress import Progress

from hwprune import cost_models
from hwprune.search._space import SaliencyProxy, SearchSpace

log = logging.getLogger(__name__)

STUDY_NAME = "hwprune"


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
    heads = units * spec.heads_per_unit
    per_layer = spec.hidden * spec.head_dim * (2 * heads + 2 * units) + spec.hidden * mlp * (
        3 if spec.gated_mlp else 2
    )
    return np.asarray(per_layer).sum(-1)


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
) -> optuna.Study:
    """Create or resume the study and run it until it holds `n_trials` finished trials.

    Seeds (dense, uniform ratios, exact-front points) are enqueued once; a resumed study skips those
    it already has. Trials left running by a killed process are marked failed (single-process
    storage only: with a shared database they may belong to another worker).
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=storage,
        sampler=sampler,
        directions=["minimize", "minimize"],
        load_if_exists=True,
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
        with Progress(transient=True) as progress:
            task = progress.add_task("search", total=remaining)
            study.optimize(
                objective,
                n_trials=remaining,
                callbacks=[lambda s, t: progress.advance(task)],
            )
    return study
