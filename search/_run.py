"""One search run, top to bottom: saliency, cost model, exact front, Optuna study, real re-scoring."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from hwprune import cost_models, hessian, prunable
from hwprune.errors import ConfigError
from hwprune.search._blocks import check_workload, model_cost_model, model_mixed_cost_model
from hwprune.search._job import SearchJob, SearchSettings
from hwprune.search._memory import MemoryLog
from hwprune.search._outcome import RunOutcome
from hwprune.search._pareto import ExactFront, exact_front, hypervolume, hypervolume_subset
from hwprune.search._precision_axis import PrecisionAxis, Precisions, axis_precisions
from hwprune.search._proxy import SaliencyProxy
from hwprune.search._rescore import rescore_front
from hwprune.search._space import SearchSpace, Widths
from hwprune.search._storage import StudyStorage, open_storage, worker_seed
from hwprune.search._study import SearchObjective, block_params, run_study
from hwprune.search._workers import rescoring_turn

log = logging.getLogger("hwprune.search")

# A calibrated model further than this from its own tables is flagged in the log and the report.
ROUGH_FIT = 0.15


def option_tables(
    space: SearchSpace,
    cost_model: cost_models.CostModel,
    proxy: SaliencyProxy,
    axis: PrecisionAxis | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], Widths, Precisions | None]:
    """Per layer, latency and proxy loss of every option (one choice on each axis), and the options'
    widths and precisions ((options,) arrays; no precisions without the axis).

    With depth pruning the option without units is the dropped layer: no latency, its layer score.
    """
    axes = [space.unit_choices, space.mlp_choices] + (
        [space.expert_choices, space.expert_width_choices] if space.moe else []
    )
    if axis is not None:
        axes += [tuple(range(len(axis.precisions)))] * 2
    grid = [g.ravel() for g in np.meshgrid(*(np.array(a) for a in axes), indexing="ij")]
    if axis is None:
        options, precisions = Widths(*grid), None  # (options,) each
        block = cost_model.block_latency_ms(*options)
    else:
        options, precisions = Widths(*grid[:-2]), Precisions(*grid[-2:])
        block = axis.cost.mixed_block_latency_ms(*options, *precisions)
    block = np.where(proxy.dropped(options.units, options.mlp), 0.0, block)
    lats = [block for _ in range(space.num_layers)]
    losses = [proxy.block_loss(i, *options) for i in range(space.num_layers)]
    if axis is not None and precisions is not None:
        losses = [
            loss + axis.block_loss(i, options.units, options.mlp, *precisions)
            for i, loss in enumerate(losses)
        ]
    return lats, losses, options, precisions


def pick(options: Widths, choices: np.ndarray) -> Widths:
    """The widths of option `choices` (..., layers) of each layer."""
    units, mlp, experts, width = (None if a is None else a[choices] for a in options)
    assert units is not None and mlp is not None
    return Widths(units, mlp, experts, width)


def pick_precisions(options: Precisions | None, choices: np.ndarray) -> Precisions | None:
    """The precisions of option `choices` (..., layers) of each layer (None without the axis)."""
    return None if options is None else Precisions(options.attention[choices], options.mlp[choices])


def within_budgets(exact: ExactFront, options: Widths, objective: SearchObjective) -> ExactFront:
    """The points of the exact front within the objective's latency and parameter budgets.

    No configuration dominates an exact-front point, so each one within the budgets is optimal under
    them. A latency budget only removes points: those within it are the whole constrained optimum.
    Under a parameter budget they are part of it (a configuration dominated only by over-budget ones
    is optimal too).
    """
    constraints = objective.constraints
    optimum = exact.within(constraints.latency_limit(objective.dense_ms))
    if constraints.params_fraction is not None:
        params = block_params(objective.cost_model.spec, pick(options, optimum.choices))  # (P,)
        optimum = optimum.subset(params <= constraints.params_fraction * objective.dense_params)
    return optimum


def check_budget(settings: SearchSettings, cost_model: cost_models.CostModel) -> None:
    """Refuse a latency budget no configuration meets, before the saliency and the study run."""
    n, spec = cost_model.spec.num_layers, cost_model.spec
    zeros = np.zeros(n, dtype=int)
    # Routed experts cannot all go: top_k of them stay, at the narrowest width a plan allows.
    narrowest = np.full(n, prunable.EXPERT_WIDTH_STEP)
    least = {"experts": np.full(n, spec.top_k), "expert_width": narrowest} if spec.experts else {}

    # With a precision axis the fastest configuration runs every block at the fastest precision.
    def predict(units: np.ndarray, mlp: np.ndarray, **kwargs: Any) -> float:
        if not isinstance(cost_model, cost_models.MixedPrecisionModel):
            return float(cost_model.predict(units, mlp, **kwargs).latency_ms)
        every = (np.full(n, k) for k in range(len(cost_model.precisions)))
        return min(
            float(
                cost_model.predict_mixed(
                    units, mlp, attention_precision=k, mlp_precision=k, **kwargs
                ).latency_ms
            )
            for k in every
        )

    if settings.depth and not spec.experts:  # every layer dropped but one, which keeps a single unit
        one = np.eye(n, dtype=int)[0]
        fastest = min(predict(u, m, dropped=one == 0) for u, m in ((one, zeros), (zeros, one)))
    else:  # every prunable unit removed
        fastest = predict(zeros, zeros, **least)
    dense = cost_model.dense_ms()
    for key, budget, limit, unit in (
        ("latency_budget_ms", settings.latency_budget_ms, fastest, "ms"),
        (
            "latency_budget_fraction",
            settings.latency_budget_fraction,
            fastest / dense,
            "of the dense latency",
        ),
    ):
        if budget is not None and budget < limit:
            raise ConfigError(
                f"search.{key}={budget} is unreachable: the fastest configuration (every prunable unit "
                f"removed{', one layer left' if settings.depth else ''}) predicts {limit:.4g} {unit} on {cost_model.hardware} ({cost_model.workload.describe()}); "
                f"valid: >= {limit:.4g}"
            )


def check_params_budget(
    settings: SearchSettings,
    exact: ExactFront,
    optimum: ExactFront,
    options: Widths,
    objective: SearchObjective,
) -> None:
    """Refuse a parameter budget under which only the configuration that removes every unit is optimal.

    Such a budget (0.001 for 0.1) makes "remove everything" the study's one feasible optimum, and
    every plan on its front a degenerate one.
    """
    if settings.params_budget_fraction is None:
        return
    spec, dense = objective.cost_model.spec, objective.dense_params
    params = block_params(spec, pick(options, exact.choices)) / dense  # (P,) of the exact front
    least = float(params.min())  # every prunable unit removed
    within = block_params(spec, pick(options, optimum.choices)) / dense
    if (within > least).any():
        return
    smallest = float(params[params > least].min()) if (params > least).any() else 1.0
    raise ConfigError(
        f"search.params_budget_fraction={settings.params_budget_fraction} leaves no optimal configuration "
        f"but the one that removes every unit: the next smallest on the exact front keeps {smallest:.3g} of "
        f"the blocks' parameters; valid: >= {smallest:.3g} (or null)"
    )


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
    settings, profile, model = job.settings, job.hardware, job.model
    memory = MemoryLog()
    memory.end("load (model, task data)")  # the process's peak so far: loading happened before
    run_dir.mkdir(parents=True, exist_ok=True)
    if storage is None:
        storage = open_run_storage(settings, run_dir)
    seed = settings.seed
    if storage.shared:
        seed = worker_seed(settings.seed)
        log.info(
            "a worker of a shared study: sampler seed %d (search.seed %d and this process)",
            seed,
            settings.seed,
        )
    sampler = job.sampler(seed=seed)
    if profile.measure_peaks:
        profile = cost_models.local_profile(profile)
    structure = prunable.discover(model)
    job.saliency.check_structure(structure)  # before the task's data and the scoring passes
    cost_model = model_cost_model(profile, model, job.workload)
    spec = cost_model.spec
    log.info(
        "%s on %s (%s): latency from the %s model",
        job.name,
        profile.name,
        cost_model.workload.describe(),
        cost_model.source,
    )
    precisions = search_precisions(settings, profile, cost_model.workload.dtype, structure)
    if isinstance(cost_model, cost_models.CalibratedModel) and max(cost_model.fit_error) > ROUGH_FIT:
        log.warning(
            "the calibrated model fits the tables it was fitted to only within %s: treat its latencies "
            "as rough (profile this workload for a table)",
            ", ".join(f"{e:.0%}" for e in cost_model.fit_error),
        )
    if len(precisions) > 1:
        cost_model = model_mixed_cost_model(profile, model, job.workload, precisions)
        log.info(
            "precision axis: attention and MLP of each layer choose among %s (latency from %s)",
            list(precisions),
            ", ".join(f"{p}: {src}" for p, src in cost_model.sources.items()),
        )
    check_budget(settings, cost_model)
    check_workload(model, cost_model.workload)

    task = job.task
    task.prepare(model)
    calibration = task.calibration(model)
    job.saliency.check_objective(calibration)  # before the scoring passes (and any cached scores)
    scores = hessian.cached_score(
        job.saliency, model, calibration, cache_dir=job.cache_dir, options=job.scoring
    )

    layer_scores = None
    if settings.depth:
        layer_scores = hessian.cached_layer_scores(
            model, calibration, cache_dir=job.cache_dir, options=job.scoring
        )
        log.info(
            "layer scores (loss of dropping each layer): %s", ", ".join(f"{v:.3g}" for v in layer_scores)
        )

    memory.end("saliency")
    axis = None
    if isinstance(cost_model, cost_models.MixedPrecisionModel):
        started = time.perf_counter()
        quantized = tuple(p for p in cost_model.precisions if p != "fp32")  # fp32 rounds nothing
        sensitivity = hessian.cached_precision_sensitivity(
            model, calibration, quantized, cache_dir=job.cache_dir
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
        memory.end("precision sensitivity")
    step = settings.mlp_step or (cost_models.width_step(profile, spec.mlp) if spec.mlp else 1)
    space = SearchSpace.build(
        structure,
        mlp_step=step,
        unit_step=settings.unit_step,
        expert_width_step=cost_models.width_step(profile, spec.expert_width) if spec.experts else None,
        expert_axes=settings.expert_axes,
    )
    proxy = SaliencyProxy(scores, structure, layer_scores)
    constraints = settings.constraints()
    objective = SearchObjective(space, cost_model, proxy, constraints, axis)

    lats, losses, options, option_precisions = option_tables(space, cost_model, proxy, axis)
    # With depth pruning the option without units drops the layer, and a model keeps one layer.
    drops = proxy.dropped(options.units, options.mlp)  # (options,)
    exact = exact_front(lats, losses, base=cost_model.base_ms, excluded=[drops] * space.num_layers)
    log.info("exact proxy front: %d points", len(exact.latency))
    # Hypervolume is bounded by the dense latency and the worst loss
    # (the costliest option of every layer: removing all its units, or, with depth, maybe dropping it).
    reference = (objective.dense_ms, float(sum(loss.max() for loss in losses)))
    n = space.num_layers
    at_reference = None if axis is None else axis.reference(n)
    seeds = [(space.dense(), at_reference)] + [
        (space.uniform(f), at_reference) for f in settings.uniform_baselines
    ]
    if axis is not None:  # the dense model at each other precision, uniformly
        seeds += [(space.dense(), axis.uniform(p, n)) for p in axis.precisions[1:]]
    # Under a parameter budget these seed the study but do not bound it (see within_budgets).
    optimum = within_budgets(exact, options, objective)
    check_params_budget(settings, exact, optimum, options, objective)
    picks = hypervolume_subset(optimum.latency, optimum.loss, reference, settings.exact_seeds)
    seeds += [
        (pick(options, optimum.choices[p]), pick_precisions(option_precisions, optimum.choices[p]))
        for p in picks
    ]

    ref = prunable.model_ref(model, source=job.source)
    identity = {
        "model": {
            "source": job.source,
            "structure": ref.structure_fingerprint,
            "weights": ref.weights_fingerprint,
        },
        "task": task.description,
        "hardware": profile.name,
        "workload": asdict(cost_model.workload),
        "latency_source": cost_model.source,
        "saliency": {k: scores.meta.get(k) for k in ("params", "calibration")}
        | {"method": scores.method}
        | ({"dtype": job.scoring.dtype} if job.scoring.dtype else {}),  # device, pieces: same scores
        "space": {"units": list(space.unit_choices), "mlp": list(space.mlp_choices)}
        | ({"depth": True} if proxy.depth else {})
        | (
            {"experts": list(space.expert_choices), "expert_width": list(space.expert_width_choices)}
            if space.moe
            else {}
        )
        | ({"precisions": list(axis.precisions)} if axis is not None else {}),
        "constraints": asdict(constraints),
    }
    started = time.perf_counter()
    study = run_study(
        objective,
        sampler=sampler,
        storage=storage,
        n_trials=settings.n_trials,
        seeds=seeds,
        identity=identity,
        study_name=settings.study_name,
    )
    study_seconds = time.perf_counter() - started
    memory.end("study")

    front = study.best_trials
    f_lat = np.array([t.values[0] for t in front])
    f_loss = np.array([t.values[1] for t in front])
    hv_ratio = None
    if constraints.params_fraction is None and len(optimum.latency):  # the whole constrained optimum
        hv_ratio = hypervolume(f_lat, f_loss, reference) / max(
            hypervolume(optimum.latency, optimum.loss, reference), 1e-30
        )
        log.info("hypervolume of the Optuna front / exact front: %.4f", hv_ratio)

    outcome = RunOutcome(
        job,
        run_dir,
        structure,
        cost_model,
        task,
        scores,
        space,
        study,
        exact,
        [],
        hv_ratio,
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
