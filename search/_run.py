"""One search run, top to bottom: saliency, cost model, exact front, Optuna study, real re-scoring."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate

from hwprune import cost_models, hessian, prunable
from hwprune.search._blocks import model_cost_model
from hwprune.search._outcome import RunOutcome
from hwprune.search._pareto import ExactFront, exact_front, hypervolume, hypervolume_subset
from hwprune.search._proxy import SaliencyProxy
from hwprune.search._rescore import rescore_front
from hwprune.search._space import SearchSpace, Widths
from hwprune.search._storage import open_storage, worker_seed
from hwprune.search._study import Constraints, SearchObjective, rescoring_turn, run_study
from hwprune.search.config import AppConfig, build_task
from hwprune.search.recovery import Recovery
from hwprune.search.tasks import Task

log = logging.getLogger("hwprune.search")

# A calibrated model further than this from its own tables is flagged in the log and the report.
ROUGH_FIT = 0.15


def option_tables(
    space: SearchSpace, cost_model: cost_models.CostModel, proxy: SaliencyProxy
) -> tuple[list[np.ndarray], list[np.ndarray], Widths]:
    """Per layer, latency and proxy loss of every option (one choice on each axis), and the options'
    widths ((options,) arrays).

    With depth pruning the option without units is the dropped layer: no latency, its layer score.
    """
    axes = [space.unit_choices, space.mlp_choices] + (
        [space.expert_choices, space.expert_width_choices] if space.moe else []
    )
    grid = [g.ravel() for g in np.meshgrid(*(np.array(a) for a in axes), indexing="ij")]
    options = Widths(*grid)  # (options,) each
    block = cost_model.block_latency_ms(*options)
    block = np.where(proxy.dropped(options.units, options.mlp), 0.0, block)
    lats = [block for _ in range(space.num_layers)]
    losses = [proxy.block_loss(i, *options) for i in range(space.num_layers)]
    return lats, losses, options


def pick(options: Widths, choices: np.ndarray) -> Widths:
    """The widths of option `choices` (..., layers) of each layer."""
    units, mlp, experts, width = (None if a is None else a[choices] for a in options)
    assert units is not None and mlp is not None
    return Widths(units, mlp, experts, width)


def model_front(front: ExactFront, proxy: SaliencyProxy, options: Widths) -> ExactFront:
    """The exact front without its point that drops every layer (depth pruning), which is no model."""
    chosen = pick(options, front.choices)
    keep = ~proxy.dropped(chosen.units, chosen.mlp).all(-1)  # (P,)
    return ExactFront(latency=front.latency[keep], loss=front.loss[keep], choices=front.choices[keep])


def check_budget(cfg: AppConfig, cost_model: cost_models.CostModel) -> None:
    """Refuse a latency budget no configuration meets, before the saliency and the study run."""
    n, spec = cost_model.spec.num_layers, cost_model.spec
    zeros = np.zeros(n, dtype=int)
    # Routed experts cannot all go: top_k of them stay, at the narrowest width a plan allows.
    narrowest = np.full(n, prunable.EXPERT_WIDTH_STEP)
    least = {"experts": np.full(n, spec.top_k), "expert_width": narrowest} if spec.experts else {}
    if cfg.search.depth and not spec.experts:  # every layer dropped but one, which keeps a single unit
        one = np.eye(n, dtype=int)[0]
        fastest = min(
            float(cost_model.predict(u, m, dropped=one == 0).latency_ms)
            for u, m in ((one, zeros), (zeros, one))
        )
    else:
        fastest = float(cost_model.predict(zeros, zeros, **least).latency_ms)  # every prunable unit removed
    dense = cost_model.dense_ms()
    for key, budget, limit, unit in (
        ("latency_budget_ms", cfg.search.latency_budget_ms, fastest, "ms"),
        (
            "latency_budget_fraction",
            cfg.search.latency_budget_fraction,
            fastest / dense,
            "of the dense latency",
        ),
    ):
        if budget is not None and budget < limit:
            raise ValueError(
                f"search.{key}={budget} is unreachable: the fastest configuration (every prunable unit "
                f"removed{', one layer left' if cfg.search.depth else ''}) predicts {limit:.4g} {unit} on {cost_model.profile} ({cost_model.workload.describe()}); "
                f"valid: >= {limit:.4g}"
            )


def check_lengths(model: torch.nn.Module, workload: cost_models.Workload) -> None:
    """Refuse a workload longer than the model's position table, before anything expensive."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    tokens = workload.seq_len + workload.kv_len
    if isinstance(limit, int) and tokens > limit:
        what = f"workload.seq_len={workload.seq_len}" + (
            f" + workload.kv_len={workload.kv_len}" if workload.kv_len else ""
        )
        raise ValueError(
            f"{what} exceeds the model's max_position_embeddings={limit}; valid: <= {limit} tokens"
        )


def run_search(cfg: AppConfig, run_dir: Path) -> RunOutcome:
    profile = cfg.hardware.validate()
    # Every configured method is built before anything expensive, so bad settings fail first.
    method: hessian.Saliency = instantiate(cfg.saliency.method)
    if cfg.search.depth and not method.estimates_loss:
        raise ValueError(
            f"search.depth=true needs saliency that estimates the loss, to weigh a dropped layer's measured "
            f"loss against slimmer layers; saliency={method.name} does not; valid: "
            f"{[m.name for m in hessian.METHODS if m.estimates_loss]}"
        )
    recovery: Recovery = instantiate(cfg.recovery.method)
    sampler = instantiate(cfg.search.sampler)
    # The study's storage first: a server that cannot be reached, or a run directory another
    # process holds, fails before the model loads.
    run_dir.mkdir(parents=True, exist_ok=True)
    storage = open_storage(cfg.search.storage, run_dir, heartbeat_s=cfg.search.heartbeat_s)
    storage.hold_single_worker()
    if storage.shared:
        seed = worker_seed(cfg.search.seed)
        log.info(
            "a worker of a shared study: sampler seed %d (search.seed %d and this process)",
            seed,
            cfg.search.seed,
        )
        sampler = instantiate(cfg.search.sampler, seed=seed)
    if profile.measure_peaks:
        profile = cost_models.local_profile(profile)
    model = prunable.load_model(cfg.model.source, cfg.model.class_name)
    structure = prunable.discover(model)
    method.check_structure(structure)  # before the task's data and the scoring passes
    cost_model = model_cost_model(profile, model, cfg.workload.build())
    spec = cost_model.spec
    log.info(
        "%s on %s (%s): latency from the %s model",
        cfg.model.name,
        profile.name,
        cost_model.workload.describe(),
        cost_model.source,
    )
    check_budget(cfg, cost_model)
    check_lengths(model, cost_model.workload)
    if isinstance(cost_model, cost_models.CalibratedModel) and max(cost_model.fit_error) > ROUGH_FIT:
        log.warning(
            "the calibrated model fits the tables it was fitted to only within %s: treat its latencies "
            "as rough (profile this workload for a table)",
            ", ".join(f"{e:.0%}" for e in cost_model.fit_error),
        )

    task: Task = build_task(cfg.task, cfg.model.source)
    task.prepare(model)
    calibration = task.calibration(model)
    scores = hessian.cached_score(
        method, model, calibration, cache_dir=cfg.saliency.cache_dir, options=cfg.saliency.options()
    )

    layer_scores = None
    if cfg.search.depth:
        layer_scores = hessian.cached_layer_scores(
            model, calibration, cache_dir=cfg.saliency.cache_dir, options=cfg.saliency.options()
        )
        log.info(
            "layer scores (loss of dropping each layer): %s", ", ".join(f"{v:.3g}" for v in layer_scores)
        )

    step = cfg.search.mlp_step or (cost_models.width_step(profile, spec.mlp) if spec.mlp else 1)
    space = SearchSpace.build(
        structure,
        mlp_step=step,
        unit_step=cfg.search.unit_step,
        expert_width_step=cost_models.width_step(profile, spec.expert_width) if spec.experts else None,
        expert_axes=cfg.search.expert_axes,
    )
    proxy = SaliencyProxy(scores, structure, layer_scores)
    constraints = Constraints(
        latency_ms=cfg.search.latency_budget_ms,
        latency_fraction=cfg.search.latency_budget_fraction,
        params_fraction=cfg.search.params_budget_fraction,
    )
    objective = SearchObjective(space, cost_model, proxy, constraints)

    lats, losses, options = option_tables(space, cost_model, proxy)
    exact = model_front(exact_front(lats, losses, base=cost_model.base_ms), proxy, options)
    log.info("exact proxy front: %d points", len(exact.latency))
    # Hypervolume is bounded by the dense latency and the worst loss
    # (the costliest option of every layer: removing all its units, or, with depth, maybe dropping it).
    reference = (objective.dense_ms, float(sum(loss.max() for loss in losses)))
    seeds = [space.dense()] + [space.uniform(f) for f in cfg.search.uniform_baselines]
    # A latency budget only removes points, so the exact front's points within it stay optimal; a
    # parameter budget is another axis, where the exact front says nothing.
    optimum = (
        None if constraints.params_fraction else exact.within(constraints.latency_limit(objective.dense_ms))
    )
    if optimum is not None:
        picks = hypervolume_subset(optimum.latency, optimum.loss, reference, cfg.search.exact_seeds)
        seeds += [pick(options, optimum.choices[p]) for p in picks]

    ref = prunable.model_ref(model, source=cfg.model.source)
    identity = {
        "model": {
            "source": cfg.model.source,
            "structure": ref.structure_fingerprint,
            "weights": ref.weights_fingerprint,
        },
        "task": task.description,
        "hardware": profile.name,
        "workload": asdict(cost_model.workload),
        "latency_source": cost_model.source,
        "saliency": {k: scores.meta.get(k) for k in ("params", "calibration")}
        | {"method": scores.method}
        | ({"dtype": cfg.saliency.dtype} if cfg.saliency.dtype else {}),  # device, pieces: same scores
        "space": {"units": list(space.unit_choices), "mlp": list(space.mlp_choices)}
        | ({"depth": True} if proxy.depth else {})
        | (
            {"experts": list(space.expert_choices), "expert_width": list(space.expert_width_choices)}
            if space.moe
            else {}
        ),
        "constraints": asdict(constraints),
    }
    started = time.perf_counter()
    study = run_study(
        objective,
        sampler=sampler,
        storage=storage,
        n_trials=cfg.search.n_trials,
        seeds=seeds,
        identity=identity,
        study_name=cfg.search.study_name,
    )
    study_seconds = time.perf_counter() - started

    front = study.best_trials
    f_lat = np.array([t.values[0] for t in front])
    f_loss = np.array([t.values[1] for t in front])
    hv_ratio = None
    if optimum is not None and len(optimum.latency):  # against the exact front within the budget
        hv_ratio = hypervolume(f_lat, f_loss, reference) / max(
            hypervolume(optimum.latency, optimum.loss, reference), 1e-30
        )
        log.info("hypervolume of the Optuna front / exact front: %.4f", hv_ratio)

    outcome = RunOutcome(
        cfg,
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
        extras={"study_seconds": study_seconds}
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
        outcome.candidates = rescore_front(cfg, outcome, objective, proxy, model, recovery, ref, profile.name)
    return outcome
