"""One search run, top to bottom: saliency, cost model, exact front, Optuna study, real re-scoring."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from hwprune import cost_models, hessian, prunable
from hwprune.errors import ConfigError
from hwprune.search._blocks import check_workload, model_cost_model, model_mixed_cost_model
from hwprune.search._exact import ExactStart, check_budget, exact_start
from hwprune.search._job import SearchJob, SearchSettings
from hwprune.search._memory import MemoryLog
from hwprune.search._outcome import RunOutcome
from hwprune.search._pareto import hypervolume
from hwprune.search._precision_axis import PrecisionAxis, axis_precisions
from hwprune.search._proxy import SaliencyProxy
from hwprune.search._rescore import rescore_front
from hwprune.search._space import SearchSpace
from hwprune.search._storage import StudyStorage, open_storage, worker_seed
from hwprune.search._study import SearchObjective, run_study
from hwprune.search._workers import rescoring_turn

log = logging.getLogger("hwprune.search")

# A calibrated model further than this from its own tables is flagged in the log and the report.
ROUGH_FIT = 0.15


def run_search(job: SearchJob, run_dir: Path, *, storage: StudyStorage | None = None) -> RunOutcome:
    """Score the units, search per-layer widths on the device's latency, re-score the front on the task.

    Args:
        job: The model, task, saliency, device, workload and settings.
        run_dir: Where the study journal (by default) and the candidates' plans go; `write_report`
            writes the rest there.
        storage: The study's storage, opened by the caller (None: opened here from
            `job.settings.storage`). The app opens it before it loads the model, so that a server
            that cannot be reached, or a run directory another process holds, fails first.

    Returns:
        The run's outcome, for `write_report`.
    """
    settings, model = job.settings, job.model
    memory = MemoryLog()
    memory.end("load (model, task data)")  # the process's peak so far: loading happened before
    run_dir.mkdir(parents=True, exist_ok=True)
    if storage is None:
        storage = open_run_storage(settings, run_dir)
    sampler = job.sampler(seed=sampler_seed(settings, storage))
    profile = cost_models.local_profile(job.hardware) if job.hardware.measure_peaks else job.hardware
    structure = prunable.discover(model)
    job.saliency.check_structure(structure)  # before the task's data and the scoring passes
    cost_model = run_cost_model(job, profile, structure)  # every setting checked against it

    calibration, scores, layer_scores = score_units(job)
    memory.end("saliency")
    axis = None
    if isinstance(cost_model, cost_models.MixedPrecisionModel):
        axis = precision_axis(job, cost_model, calibration, structure)
        memory.end("precision sensitivity")

    spec = cost_model.spec
    space = SearchSpace.build(
        structure,
        mlp_step=settings.mlp_step or (cost_models.width_step(profile, spec.mlp) if spec.mlp else 1),
        unit_step=settings.unit_step,
        expert_width_step=cost_models.width_step(profile, spec.expert_width) if spec.experts else None,
        expert_axes=settings.expert_axes,
    )
    proxy = SaliencyProxy(scores, structure, layer_scores)
    objective = SearchObjective(space, cost_model, proxy, settings.constraints(), axis)
    start = exact_start(settings, space, objective, proxy, axis)
    log.info("exact proxy front: %d points", len(start.exact.latency))

    ref = prunable.model_ref(model, source=job.source)
    identity = study_identity(job, ref, profile.name, scores, objective)
    started = time.perf_counter()
    study = run_study(
        objective,
        sampler=sampler,
        storage=storage,
        n_trials=settings.n_trials,
        seeds=start.seeds,
        identity=identity,
        study_name=settings.study_name,
    )
    study_seconds = time.perf_counter() - started
    memory.end("study")

    outcome = RunOutcome(
        job,
        run_dir,
        structure,
        cost_model,
        job.task,
        scores,
        space,
        study,
        start.exact,
        [],
        hypervolume_ratio(study, start, objective),
        extras={"study_seconds": study_seconds, "memory": memory}
        | ({"layer_scores": layer_scores.tolist()} if layer_scores is not None else {}),
    )
    # Re-scoring prunes and recovers every candidate: on a shared study one worker does it.
    with rescoring_turn(study, storage, run_dir) as elsewhere:
        if elsewhere is not None:
            log.info(
                "the front of study %s is re-scored by %s; this worker wrote its trials only",
                study.study_name,
                elsewhere,
            )
            outcome.extras["rescored_by"] = elsewhere
            return outcome
        outcome.candidates = rescore_front(job, outcome, objective, proxy, ref, profile.name)
    return outcome


def score_units(job: SearchJob) -> tuple[hessian.Calibration, hessian.UnitScores, torch.Tensor | None]:
    """The task's calibration data, the saliency of every unit and, with depth, of every layer."""
    job.task.prepare(job.model)
    calibration = job.task.calibration(job.model)
    job.saliency.check_objective(calibration)  # before the scoring passes (and any cached scores)
    scores = hessian.cached_score(
        job.saliency, job.model, calibration, cache_dir=job.cache_dir, options=job.scoring
    )
    layer_scores = None
    if job.settings.depth:
        layer_scores = hessian.cached_layer_scores(
            job.model, calibration, cache_dir=job.cache_dir, options=job.scoring
        )
        log.info(
            "layer scores (loss of dropping each layer): %s", ", ".join(f"{v:.3g}" for v in layer_scores)
        )
    return calibration, scores, layer_scores


def sampler_seed(settings: SearchSettings, storage: StudyStorage) -> int:
    """`search.seed`, or on a shared study a seed of this worker's own (no two propose alike)."""
    if not storage.shared:
        return settings.seed
    seed = worker_seed(settings.seed)
    log.info(
        "a worker of a shared study: sampler seed %d (search.seed %d and this process)", seed, settings.seed
    )
    return seed


def run_cost_model(
    job: SearchJob, profile: cost_models.HardwareProfile, structure: prunable.Structure
) -> cost_models.CostModel:
    """The run's cost model (mixed-precision where the axis is on); budgets and workload checked on it."""
    cost_model = model_cost_model(profile, job.model, job.workload)
    log.info(
        "%s on %s (%s): latency from the %s model",
        job.name,
        profile.name,
        cost_model.workload.describe(),
        cost_model.source,
    )
    precisions = search_precisions(job.settings, profile, cost_model.workload.dtype, structure)
    if isinstance(cost_model, cost_models.CalibratedModel) and max(cost_model.fit_error) > ROUGH_FIT:
        log.warning(
            "the calibrated model fits the tables it was fitted to only within %s: treat its latencies "
            "as rough (profile this workload for a table)",
            ", ".join(f"{e:.0%}" for e in cost_model.fit_error),
        )
    if len(precisions) > 1:
        cost_model = model_mixed_cost_model(profile, job.model, job.workload, precisions)
        log.info(
            "precision axis: attention and MLP of each layer choose among %s (latency from %s)",
            list(precisions),
            ", ".join(f"{p}: {src}" for p, src in cost_model.sources.items()),
        )
    check_budget(job.settings, cost_model)
    check_workload(job.model, cost_model.workload)
    return cost_model


def precision_axis(
    job: SearchJob,
    cost_model: cost_models.MixedPrecisionModel,
    calibration: hessian.Calibration,
    structure: prunable.Structure,
) -> PrecisionAxis:
    """The precision axis: each block's loss increase at each precision, beside its latency."""
    started = time.perf_counter()
    quantized = tuple(p for p in cost_model.precisions if p != "fp32")  # fp32 rounds nothing
    sensitivity = hessian.cached_precision_sensitivity(
        job.model, calibration, quantized, cache_dir=job.cache_dir
    )
    axis = PrecisionAxis.build(cost_model, sensitivity, structure)
    log.info(
        "precision sensitivity (%.0f s): loss increase of the whole model's attention / MLP at %s",
        time.perf_counter() - started,
        ", ".join(
            f"{p} {axis.attention_loss[:, k].sum():.3g} / {axis.mlp_loss[:, k].sum():.3g}"
            for k, p in enumerate(axis.precisions)
            if k
        ),
    )
    return axis


def study_identity(
    job: SearchJob,
    ref: prunable.ModelRef,
    hardware: str,
    scores: hessian.UnitScores,
    objective: SearchObjective,
) -> dict[str, Any]:
    """What the study is about (`search._identity`): a resumed or joined study must match it."""
    space, proxy, axis, cost_model = objective.space, objective.proxy, objective.axis, objective.cost_model
    space_record = (
        {"units": list(space.unit_choices), "mlp": list(space.mlp_choices)}
        | ({"depth": True} if proxy.depth else {})
        | (
            {"experts": list(space.expert_choices), "expert_width": list(space.expert_width_choices)}
            if space.moe
            else {}
        )
        | ({"precisions": list(axis.precisions)} if axis is not None else {})
    )
    return {
        "model": {
            "source": job.source,
            "structure": ref.structure_fingerprint,
            "weights": ref.weights_fingerprint,
        },
        "task": job.task.description,
        "hardware": hardware,
        "workload": asdict(cost_model.workload),
        "latency_source": cost_model.source,
        "saliency": {k: scores.meta.get(k) for k in ("params", "calibration")}
        | {"method": scores.method}
        | ({"dtype": job.scoring.dtype} if job.scoring.dtype else {}),  # device, pieces: same scores
        "space": space_record,
        "constraints": asdict(objective.constraints),
    }


def hypervolume_ratio(study: optuna.Study, start: ExactStart, objective: SearchObjective) -> float | None:
    """Hypervolume of the study's front over the exact optimum's (None under a parameter budget, where
    the points within it are not the whole optimum)."""
    optimum = start.optimum
    if objective.constraints.params_fraction is not None or not len(optimum.latency):
        return None
    front = study.best_trials
    f_lat = np.array([t.values[0] for t in front])
    f_loss = np.array([t.values[1] for t in front])
    ratio = hypervolume(f_lat, f_loss, start.reference) / max(
        hypervolume(optimum.latency, optimum.loss, start.reference), 1e-30
    )
    log.info("hypervolume of the Optuna front / exact front: %.4f", ratio)
    return ratio


def search_precisions(
    settings: SearchSettings,
    profile: cost_models.HardwareProfile,
    reference: str,
    structure: prunable.Structure,
) -> tuple[str, ...]:
    """The precisions of the run's axis, the reference first (one: no axis)."""
    precisions = axis_precisions(settings.precisions, profile, reference)
    if len(precisions) > 1 and any(layer.is_moe for layer in structure.layers):
        if settings.precisions is not None:
            raise ConfigError(
                f"search.precisions={list(settings.precisions)}: the precision axis does not cover "
                f"mixture-of-experts layers yet; valid: search.precisions=[{reference}] (or null)"
            )
        log.info("precision axis off: it does not cover mixture-of-experts layers yet")
        return (reference,)
    return precisions


def open_run_storage(settings: SearchSettings, run_dir: Path) -> StudyStorage:
    """Open the study's storage and, unless it is shared, hold the run directory for this process.

    Raises:
        ValueError: An unsupported storage, or another process holding the run directory.
    """
    storage = open_storage(settings.storage, run_dir, heartbeat_s=settings.heartbeat_s)
    storage.hold_single_worker()
    return storage
