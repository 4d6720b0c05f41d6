"""What `hwprune-apply` reports: the speedup a plan predicts, apply.json's timing part, the closing log line."""

from __future__ import annotations

import logging
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hwprune import cost_models, prunable
from hwprune.cost_models.profilers import allocator_state, nvml_metadata
from hwprune.search._blocks import model_cost_model, model_mixed_cost_model
from hwprune.search._space import plan_widths
from hwprune.search._timing import Timing

if TYPE_CHECKING:
    from hwprune.search._apply import Recovered

log = logging.getLogger("hwprune.apply")


def device_metadata(device: torch.device) -> dict[str, Any]:
    """What the latencies were measured on: the CPU's name, or the GPU's with its NVML details."""
    if device.type == "cuda":
        index = device.index or 0
        return {"type": "cuda", "name": torch.cuda.get_device_name(index), "nvml": nvml_metadata(index)}
    return {"type": "cpu", "name": cost_models.cpu_name()}


def planned_workload(plan: prunable.PrunePlan) -> cost_models.Workload | None:
    """The workload the plan's latency was predicted for, or None for plans that do not say."""
    recorded = plan.metadata.get("workload")
    return cost_models.Workload(**recorded) if isinstance(recorded, dict) else None


def log_result(
    result: dict[str, Any],
    plan: prunable.PrunePlan,
    precision: str,
    done: Recovered,
    metric_name: str,
    out_dir: Path,
) -> None:
    if "measured_speedup_same_precision" in result:
        log.info(
            "at %s: %.2fx over the dense model at %s, which is %.2fx over the dense model as loaded",
            precision,
            result["measured_speedup_same_precision"],
            precision,
            result["measured_speedup"] / result["measured_speedup_same_precision"],
        )
    pred = f"{result['predicted_speedup']:.2f}x" if result["predicted_speedup"] else "n/a"
    report = done.report
    log.info(
        "speedup predicted %s (%s), measured %.2fx here (%.2f -> %.2f ms); %s %.3f -> %.3f%s; wrote %s",
        pred,
        plan.hardware,
        result["measured_speedup"],
        result["latency_ms_dense"],
        result["latency_ms_pruned"],
        metric_name,
        done.metric_dense,
        result["metric_pruned"],
        f" ({report.method}: {done.metric_unrecovered:.3f} before, {report.seconds:.1f} s)" if report else "",
        out_dir,
    )


@dataclass(frozen=True)
class PlanPrediction:
    """The speedup a plan's widths predict on its hardware at its workload.

    Attributes:
        speedup: Priced from the widths the plan keeps (None: the plan names no hardware or workload).
        source: The cost model's latency source ("table", "calibrated", "analytical").
        stored: What the plan file says it predicted when it was made (None: nothing).
    """

    speedup: float | None
    source: str | None
    stored: float | None


def predict_plan(plan: prunable.PrunePlan, model: torch.nn.Module) -> PlanPrediction:
    """Price the plan as it is: a plan edited by hand, or priced with other tables, says so."""
    meta = plan.metadata
    stored = None
    if meta.get("latency_ms") and meta.get("dense_latency_ms"):
        stored = float(meta["dense_latency_ms"]) / float(meta["latency_ms"])
    workload = planned_workload(plan)
    if plan.hardware is None or workload is None:
        return PlanPrediction(stored, meta.get("latency_source"), stored)
    try:
        profile = cost_models.load_profile(plan.hardware)
    except ValueError as err:
        log.warning("the plan's widths cannot be priced again (%s): reporting the plan's own prediction", err)
        return PlanPrediction(stored, meta.get("latency_source"), stored)
    if profile.measure_peaks:
        profile = cost_models.local_profile(profile)
    cost_model: cost_models.CostModel = model_cost_model(profile, model, workload)
    widths, dropped = plan_widths(plan, prunable.discover(model))
    if plan.mixed_precision:  # each block priced at its precision (a dropped layer's costs nothing)
        attention, mlp = plan.layer_precisions(cost_model.workload.dtype)
        mixed = model_mixed_cost_model(profile, model, workload, tuple(dict.fromkeys(attention + mlp)))
        latency = mixed.predict_mixed(
            widths.units,
            widths.mlp,
            attention_precision=[mixed.index(a) for a in attention],
            mlp_precision=[mixed.index(m) for m in mlp],
            dropped=dropped,
            experts=widths.experts,
            expert_width=widths.expert_width,
        )
        speedup, source = cost_model.dense_ms() / float(latency.latency_ms), latency.source
    else:
        latency = cost_model.predict(
            widths.units,
            widths.mlp,
            dropped=dropped,
            experts=widths.experts,
            expert_width=widths.expert_width,
        )
        speedup, source = cost_model.dense_ms() / float(latency.latency_ms), cost_model.source
    if stored is not None and abs(speedup / stored - 1) > 1e-6:  # more than rounding
        log.warning(
            "the plan says it predicted %.2fx, its widths predict %.2fx on %s (%s): the plan was edited, or "
            "the cost model changed (tables, or another machine for cpu_local); reporting %.2fx",
            stored,
            speedup,
            plan.hardware,
            source,
            speedup,
        )
    return PlanPrediction(speedup, source, stored)


def timing_fields(
    plan_path: str | Path,
    plan: prunable.PrunePlan,
    workload: cost_models.Workload,
    device: torch.device,
    timing: Timing,
    metric_name: str,
    prediction: PlanPrediction,
) -> dict[str, Any]:
    """apply.json's timing part: predicted and measured speedup, latencies with their quartiles."""
    meta = plan.metadata
    dense, pruned = timing.dense, timing.pruned
    dense_ms, pruned_ms = statistics.median(dense), statistics.median(pruned)
    result: dict[str, Any] = {
        "plan": str(Path(plan_path).resolve()),
        "hardware": plan.hardware,
        "predicted_speedup": prediction.speedup,
        "predicted_for": {
            "hardware": plan.hardware,
            "workload": meta.get("workload"),
            "source": prediction.source,
        },
        "predicted_speedup_stored": prediction.stored,
        "measured_speedup": timing.speedup,
        "measured_speedup_quartiles": statistics.quantiles(timing.round_speedups, n=4)
        if len(dense) > 1
        else [timing.speedup] * 3,
        "timing_spread": timing.spread,
        "timing_stable": timing.stable,
        "latency_ms_dense": dense_ms,
        "latency_ms_pruned": pruned_ms,
        "latency_ms_dense_quartiles": statistics.quantiles(dense, n=4) if len(dense) > 1 else [dense_ms] * 3,
        "latency_ms_pruned_quartiles": statistics.quantiles(pruned, n=4)
        if len(pruned) > 1
        else [pruned_ms] * 3,
        "metric_name": metric_name,
        "workload": {
            **asdict(workload),
            "device": device_metadata(device),
            "threads": torch.get_num_threads(),
            "allocator": allocator_state(),
            "repeats": len(dense),
            "timing": f"median of {len(dense)} interleaved rounds ({'CUDA events' if device.type == 'cuda' else 'wall clock'})",
        },
    }
    predicted_dense = meta.get("dense_latency_ms")
    if predicted_dense:
        ratio = dense_ms / float(predicted_dense)
        result["dense_measured_over_predicted"] = ratio
        if not 2 / 3 <= ratio <= 1.5:
            log.warning(
                "the dense model measured %.2f ms here, %.2fx the %.2f ms predicted for %s: another device, a "
                "loaded machine or a stale table; the speedup is still measured in interleaved rounds",
                dense_ms,
                ratio,
                float(predicted_dense),
                plan.hardware,
            )
    return result
