"""The exact proxy front as the study meets it: per-layer option tables, the optimum within the budgets,
budgets refused before anything expensive, and the seeds the study starts from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from hwprune import cost_models, prunable
from hwprune.errors import ConfigError
from hwprune.search._job import SearchSettings
from hwprune.search._pareto import ExactFront, exact_front, hypervolume_subset
from hwprune.search._precision_axis import PrecisionAxis, Precisions
from hwprune.search._proxy import SaliencyProxy
from hwprune.search._space import SearchSpace, Widths
from hwprune.search._study import SearchObjective, block_params

Seed = tuple[Widths, Precisions | None]


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


@dataclass(frozen=True)
class ExactStart:
    """The exact proxy front and what the study takes from it.

    Attributes:
        exact: The whole exact front.
        optimum: Its points within the latency and parameter budgets.
        reference: The hypervolume reference point (dense latency, worst loss).
        seeds: Configurations enqueued before the sampler's own: dense, the uniform baselines, the
            dense model at each other precision, and `exact_seeds` points of the optimum.
    """

    exact: ExactFront
    optimum: ExactFront
    reference: tuple[float, float]
    seeds: list[Seed]


def exact_start(
    settings: SearchSettings,
    space: SearchSpace,
    objective: SearchObjective,
    proxy: SaliencyProxy,
    axis: PrecisionAxis | None,
) -> ExactStart:
    """Solve the exact proxy front, refuse a parameter budget it leaves empty, and pick the seeds."""
    lats, losses, options, option_precisions = option_tables(space, objective.cost_model, proxy, axis)
    # With depth pruning the option without units drops the layer, and a model keeps one layer.
    drops = proxy.dropped(options.units, options.mlp)  # (options,)
    exact = exact_front(lats, losses, base=objective.cost_model.base_ms, excluded=[drops] * space.num_layers)
    # Hypervolume is bounded by the dense latency and the worst loss
    # (the costliest option of every layer: removing all its units, or, with depth, maybe dropping it).
    reference = (objective.dense_ms, float(sum(loss.max() for loss in losses)))
    n = space.num_layers
    at_reference = None if axis is None else axis.reference(n)
    seeds: list[Seed] = [(space.dense(), at_reference)]
    seeds += [(space.uniform(f), at_reference) for f in settings.uniform_baselines]
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
    return ExactStart(exact, optimum, reference, seeds)
