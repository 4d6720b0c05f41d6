"""Re-scoring a study's front on the real task: prune, recover, measure, write each plan."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from hwprune import cost_models, hessian, prunable
from hwprune.search._int8 import Int8Recipe
from hwprune.search._job import SearchJob, SearchSettings
from hwprune.search._memory import MemoryLog, release
from hwprune.search._outcome import Candidate, RunOutcome
from hwprune.search._pareto import pareto_mask
from hwprune.search._precision import (
    int8_calibration,
    int8_model,
    measured_precision,
    precision_name,
    to_precision,
)
from hwprune.search._proxy import SaliencyProxy
from hwprune.search._space import SearchSpace, Widths
from hwprune.search._study import SearchObjective
from hwprune.search.recovery import NoRecovery, Recovery, RecoveryData
from hwprune.search.tasks import Task

log = logging.getLogger("hwprune.search")


def trial_widths(trial: optuna.trial.FrozenTrial) -> Widths:
    """The widths a trial recorded."""
    attrs = trial.user_attrs
    experts, width = (np.array(attrs[k]) if k in attrs else None for k in ("experts", "expert_width"))
    return Widths(np.array(attrs["units"]), np.array(attrs["mlp"]), experts, width)


def trial_precisions(trial: optuna.trial.FrozenTrial) -> tuple[list[str], list[str]] | None:
    """The per-layer (attention, MLP) precisions a trial recorded (None: no precision axis)."""
    attrs = trial.user_attrs
    if "attention_precision" not in attrs:
        return None
    return list(attrs["attention_precision"]), list(attrs["mlp_precision"])


def widths_key(widths: Widths, precisions: tuple[list[str], list[str]] | None = None) -> tuple:
    """A hashable form of `widths` (and precisions)."""
    key = tuple(None if a is None else tuple(int(v) for v in a) for a in widths)
    return key if precisions is None else (*key, tuple(precisions[0]), tuple(precisions[1]))


def spread(indices: np.ndarray, latency: np.ndarray, count: int) -> list[int]:
    """Up to `count` of `indices`, evenly spaced in latency order (always the fastest and slowest)."""
    if len(indices) <= count:
        return [int(i) for i in indices]
    order = indices[np.argsort(latency[indices])]
    picks = np.unique(np.round(np.linspace(0, len(order) - 1, count)).astype(int))
    return [int(order[p]) for p in picks]


def rescore_front(
    job: SearchJob,
    outcome: RunOutcome,
    objective: SearchObjective,
    proxy: SaliencyProxy,
    ref: prunable.ModelRef,
    hardware: str,
) -> list[Candidate]:
    """Dense, uniform baselines and spread front points, pruned, recovered and measured on the task."""
    cost_model = outcome.cost_model
    candidates = baselines(outcome.space, cost_model, proxy, objective, job.settings.uniform_baselines)
    # Baselines are seeds, on the front where nothing beats them: each is re-scored once, as itself.
    seen = {widths_key(c.widths, c.precisions) for c in candidates}
    candidates += front_picks(outcome.study.best_trials, seen, job.settings, objective.dense_ms)
    precision = measured_precision(cost_model.workload.dtype)
    if precision != cost_model.workload.dtype:
        log.warning(
            "%s runs %s: its latency is priced in %s, but the metric is measured on the %s model (no %s "
            "quantisation is measured yet)",
            hardware,
            cost_model.workload.dtype,
            cost_model.workload.dtype,
            precision,
            cost_model.workload.dtype,
        )
    rescore = Rescoring(
        task=outcome.task,
        recovery=job.recovery,
        recovery_samples=job.recovery_samples,
        recovery_seed=job.recovery_seed,
        model_ref=ref,
        hardware=hardware,
        int8=job.int8,
    )
    rescore.evaluate(
        candidates, job.model, proxy, cost_model, outcome.run_dir, memory=outcome.extras.get("memory")
    )
    return candidates


def baselines(
    space: SearchSpace,
    cost_model: cost_models.CostModel,
    proxy: SaliencyProxy,
    objective: SearchObjective,
    fractions: Sequence[float],
) -> list[Candidate]:
    """The dense model, the uniform baselines and, with a precision axis, the dense model at each precision."""
    axis, n = objective.axis, space.num_layers
    at_reference = None if axis is None else axis.names(axis.reference(n))
    candidates = [
        Candidate("dense", space.dense(), objective.dense_ms, 0.0, label="dense", precisions=at_reference)
    ]
    for f in fractions:
        w = space.uniform(f)
        predicted = cost_model.predict(w.units, w.mlp, experts=w.experts, expert_width=w.expert_width)
        candidates.append(
            Candidate(
                "uniform",
                w,
                float(predicted.latency_ms),
                float(proxy.loss(*w)[0]),
                label=f"uniform {f:.0%}",
                precisions=at_reference,
            )
        )
    for p in axis.precisions[1:] if axis is not None else ():
        assert axis is not None
        dense, uniform = space.dense(), axis.uniform(p, n)
        candidates.append(
            Candidate(
                "uniform",
                dense,
                float(axis.latency(dense, uniform).latency_ms),
                float(axis.loss(dense, uniform)[0]),
                label=f"dense {p}",
                precisions=axis.names(uniform),
            )
        )
    return candidates


def front_picks(
    front: list[optuna.trial.FrozenTrial], seen: set[tuple], settings: SearchSettings, dense_ms: float
) -> list[Candidate]:
    """Up to `search.rescore` front points not `seen`, spread over the asked speedups."""
    f_lat = np.array([t.values[0] for t in front])
    fresh = [i for i, t in enumerate(front) if widths_key(trial_widths(t), trial_precisions(t)) not in seen]
    # Re-scoring costs a recovery per plan: spend it on the speedups the user asked about.
    low, high = settings.rescore_min_speedup, settings.rescore_max_speedup or np.inf
    wanted = [i for i in fresh if low <= dense_ms / f_lat[i] <= high]
    if len(wanted) < len(fresh):
        log.info(
            "re-scoring %d of %d front points: predicted speedup in [%.2f, %s]",
            min(len(wanted), settings.rescore),
            len(fresh),
            low,
            f"{high:.2f}" if np.isfinite(high) else "inf",
        )
    if fresh and not wanted:
        log.warning("no front point has a predicted speedup in [%.2f, %.2f]: none re-scored", low, high)
    return [
        Candidate(
            "search",
            trial_widths(front[i]),
            front[i].values[0],
            front[i].values[1],
            label=f"trial {front[i].number}",
            precisions=trial_precisions(front[i]),
        )
        for i in spread(np.array(wanted, dtype=int), f_lat, settings.rescore)
    ]


@dataclass
class Rescoring:
    """Prunes candidates for real, recovers them, measures the task metric and writes their plans.

    Attributes:
        task: The task whose metric is measured (prepared with the dense model).
        recovery: Applied to every pruned candidate (not the dense model) before its metric.
        recovery_samples: Training samples the task lends to recovery.
        recovery_seed: Seed of that draw.
        model_ref: The dense model's reference (source and fingerprints), recorded in the plans.
        hardware: The target's profile name, recorded in the plans.
        int8: How plans priced at int8 are quantised before their metric.
    """

    task: Task
    recovery: Recovery
    recovery_samples: int
    recovery_seed: int
    model_ref: prunable.ModelRef
    hardware: str
    int8: Int8Recipe = field(default_factory=Int8Recipe)

    def evaluate(
        self,
        candidates: list[Candidate],
        model: torch.nn.Module,
        proxy: SaliencyProxy,
        cost_model: cost_models.CostModel,
        run_dir: Path,
        *,
        memory: MemoryLog | None = None,
    ) -> None:
        """Fill in each candidate's metrics and plan file; mark the dominated ones.

        Each candidate's pruned copy, recovery buffers and evaluation outputs live only while it is
        scored: its memory goes back to the system before the next one (`memory` logs each one's
        peak).
        """
        task, recovers = self.task, not isinstance(self.recovery, NoRecovery)
        data = (
            task.recovery_data(samples=self.recovery_samples, seed=self.recovery_seed) if recovers else None
        )
        precision = measured_precision(cost_model.workload.dtype)  # the front's metric is measured at it
        calibration = int8_calibration(task, self.int8) if precision == "int8" else []
        quantization = self.int8.describe() if precision == "int8" else None  # the same for every plan
        for i, c in enumerate(candidates, start=1):
            plan = proxy.plan(c.widths, self.model_ref, hardware=self.hardware)
            pruned = prunable.pruned_copy(model, plan, check_weights=False)
            c.metric = c.metric_unrecovered = task.evaluate(pruned)
            # A plan that removes nothing (the dense model at other precisions) has nothing to recover.
            removes = widths_key(c.widths) != widths_key(candidates[0].widths)
            recipe = self._recover(c, pruned, model, plan, data) if data is not None and removes else None
            plan = self._measure_deployed(c, pruned, plan, precision, calibration, cost_model.workload)
            c.params = sum(p.numel() for p in pruned.parameters())
            c.layers = len(plan.layers) - len(plan.dropped())
            c.flops = float(cost_model.spec.flops(cost_model.workload, *c.widths))
            c.degenerate = (
                ""
                if c.kind == "dense"
                else degenerate_reason(c.widths, cost_model.spec, c.precisions, cost_model.workload.dtype)
            )
            metadata = self._plan_metadata(
                c, candidates[0], cost_model, proxy.scores.method, recipe, quantization
            )
            name = c.label.replace(" ", "_").replace("%", "pct")
            c.plan_path = str(
                replace(plan, metadata=metadata).save(run_dir / "plans" / f"{name}.yaml").relative_to(run_dir)
            )
            recovered = f" (unrecovered {c.metric_unrecovered:.3f}, {c.recovery} {c.recovery_seconds:.1f} s)"
            log.info(
                "[%d/%d] %-12s %8.3f ms  %s %.3f%s%s",
                i,
                len(candidates),
                c.label,
                c.latency_ms,
                task.metric_name,
                c.metric,
                "" if np.isnan(c.metric_validation) else f" (validation {c.metric_validation:.3f})",
                recovered if recipe else "",
            )
            del pruned, plan
            release()
            if memory is not None:
                memory.end(f"re-score {c.label}")
        mark_dominated(candidates, higher_is_better=task.higher_is_better)

    def _recover(
        self,
        c: Candidate,
        pruned: torch.nn.Module,
        model: torch.nn.Module,
        plan: prunable.PrunePlan,
        data: RecoveryData,
    ) -> dict[str, Any]:
        """Recover `pruned` in place toward `model`; the candidate's metric after it, and the recipe run."""
        report = self.recovery.recover(pruned, model, data, layers=plan.kept_layers())
        c.metric, c.recovery, c.recovery_seconds = self.task.evaluate(pruned), report.method, report.seconds
        return {**report.recipe(), "data_samples": self.recovery_samples, "data_seed": self.recovery_seed}

    def _measure_deployed(
        self,
        c: Candidate,
        pruned: torch.nn.Module,
        plan: prunable.PrunePlan,
        precision: str,
        calibration: list[hessian.Batch],
        workload: cost_models.Workload,
    ) -> prunable.PrunePlan:
        """The candidate's metric (and validation metric) as its plan deploys it; the plan with its precisions.

        The front pairs a precision's latency with its metric: per block at the candidate's
        precisions, as the int8 QDQ model ONNX Runtime runs, or the whole model at `precision`.
        """
        c.metric_unquantized = c.metric
        c.metric_precision = precision
        deployed: torch.nn.Module = pruned  # the model as the plan deploys it
        if c.precisions is not None:  # per block, as the plan deploys them
            plan = plan.with_precisions(*c.precisions)
            deployed = prunable.set_precisions(pruned, plan)
            c.metric_precision = precision_name(*c.precisions)
        elif precision == "int8":  # the QDQ model int8 runtimes consume, run by ONNX Runtime
            deployed = int8_model(pruned, calibration, workload, reduce_range=self.int8.reduce_range)
            c.quantization = self.int8.summary()
        elif precision != "fp32":
            deployed = to_precision(pruned, c.metric_precision)
        if deployed is not pruned or c.metric_precision != "fp32":
            c.metric = self.task.evaluate(deployed)
        validation = self.task.validate(deployed)
        c.metric_validation = float("nan") if validation is None else validation
        return plan

    def _plan_metadata(
        self,
        c: Candidate,
        dense: Candidate,
        cost_model: cost_models.CostModel,
        saliency: str,
        recipe: dict[str, Any] | None,
        quantization: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """What the candidate's plan file records of how it was priced and measured."""
        return {
            "latency_ms": c.latency_ms,
            "dense_latency_ms": dense.latency_ms,
            "latency_source": cost_model.source,
            "workload": asdict(cost_model.workload),
            "proxy_loss": c.proxy_loss,
            "saliency": saliency,
            "label": c.label,
            "task": self.task.description,
            "metric_name": self.task.metric_name,
            "metric": c.metric,
            "metric_validation": None if np.isnan(c.metric_validation) else c.metric_validation,
            "validation": self.task.validation,
            "metric_unrecovered": c.metric_unrecovered,
            "metric_unquantized": c.metric_unquantized,
            "precision": c.metric_precision,
            "quantization": quantization,
            "recovery": recipe,
        }


# A plan removing less than this fraction of the blocks' weights is the dense model in all but name.
ALMOST_NOTHING = 0.01


def degenerate_reason(
    widths: Widths,
    spec: cost_models.BlockSpec,
    precisions: tuple[list[str], list[str]] | None = None,
    reference: str | None = None,
) -> str:
    """Why a pruned configuration is no real choice, or "": it removes almost nothing and leaves
    every block at the `reference` precision, or it leaves no attention (or no MLP) in any layer,
    which no deployed transformer does."""
    units, mlp = np.asarray(widths.units), np.asarray(widths.mlp)
    dense = spec.num_layers * float(spec.params(spec.kv_heads, spec.mlp))  # units are KV groups
    removed = 1 - float(spec.params(*widths).sum()) / dense
    changed = precisions is not None and bool((set(precisions[0]) | set(precisions[1])) - {reference})
    if removed < ALMOST_NOTHING and not changed:
        return f"removes {removed:.1%} of the blocks' weights"
    if not units.any():
        return "no attention left"
    if spec.mlp and not mlp.any():
        return "no MLP left"
    return ""


def mark_dominated(candidates: list[Candidate], *, higher_is_better: bool) -> None:
    """Mark every candidate another one beats on both predicted latency and measured metric.

    Every measured plan counts, uniform baselines too: a search plan that a baseline beats on
    both is no plan to choose. The metric is the one plans are chosen on (the validation split's
    where the task has one), so the front is not picked on the figures it is reported with.
    """
    sign = 1.0 if higher_is_better else -1.0
    mask = pareto_mask(
        np.array([c.latency_ms for c in candidates]), -sign * np.array([c.choice_metric for c in candidates])
    )
    for c, keep in zip(candidates, mask, strict=True):
        c.dominated = not bool(keep)
