"""Applying a plan: prune the model it names, recover, save, evaluate and time both (the core of
`hwprune-apply`, taking plain objects)."""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from hwprune import cost_models, prunable
from hwprune.cost_models.profilers import TORCH_DTYPES, nvml_metadata, torch_device
from hwprune.errors import ConfigError, PlanError
from hwprune.search._blocks import check_workload, model_cost_model, model_mixed_cost_model
from hwprune.search._int8 import Int8Recipe
from hwprune.search._onnx import check_onnx, export_onnx
from hwprune.search._output import check_out, staged
from hwprune.search._precision import PER_BLOCK, check_precision, precision_name, quantize, quantize_per_block
from hwprune.search._space import plan_widths
from hwprune.search._timing import Timing, measure
from hwprune.search.recovery import NoRecovery, Recovery, RecoveryReport, from_recipe
from hwprune.search.tasks import Task

log = logging.getLogger("hwprune.apply")


def timing_dtype(device: torch.device, dtype: str) -> torch.dtype:
    """The dtype to time in: `dtype`, or for "auto" fp32 on CPU and bf16 (tensor cores) on CUDA."""
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    if dtype not in TORCH_DTYPES:
        raise ConfigError(
            f"workload.dtype={dtype!r} cannot be timed with torch; valid choices: {sorted(TORCH_DTYPES)} or 'auto'"
        )
    return TORCH_DTYPES[dtype]


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


def timed_workload(
    plan: prunable.PrunePlan, overrides: Mapping[str, Any]
) -> tuple[cost_models.Workload, list[str]]:
    """The workload to time (the plan's, with any field the user set), and the fields that differ."""
    planned = planned_workload(plan)
    base = planned or cost_models.Workload(dtype="auto")
    # dtype "auto" is the device's default, which the plan's dtype already is (resolved).
    given = {k: v for k, v in overrides.items() if v is not None and (k, v) != ("dtype", "auto")}
    workload = replace(base, **given)
    changed = [k for k, v in given.items() if planned is not None and getattr(planned, k) != v]
    return workload, changed


def recorded_recovery(plan: prunable.PrunePlan) -> tuple[Recovery, int, int]:
    """The recovery a plan records (method, data samples, data seed), or none."""
    recipe = plan.metadata.get("recovery")
    if not recipe:
        return NoRecovery(), 1, 0
    return from_recipe(recipe), int(recipe.get("data_samples", 2048)), int(recipe.get("data_seed", 0))


def recorded_int8_recipe(plan: prunable.PrunePlan) -> Int8Recipe:
    """The int8 recipe a plan records (its calibration draw), or the default."""
    recipe = plan.metadata.get("quantization") or {}
    default = Int8Recipe()
    return Int8Recipe(
        calibration_samples=int(recipe.get("calibration_samples", default.calibration_samples)),
        calibration_seed=int(recipe.get("calibration_seed", default.calibration_seed)),
    )


def apply_and_measure(
    plan_path: str | Path,
    out: str | Path,
    *,
    task: Task,
    workload: Mapping[str, Any] | None = None,
    recovery: Recovery | None = None,
    recovery_samples: int = 2048,
    recovery_seed: int = 0,
    device: str = "cpu",
    repeats: int = 20,
    onnx: bool = True,
    overwrite: bool = False,
    check_weights: bool = True,
    precision: str | None = None,
) -> dict[str, Any]:
    """Prune, recover, save, evaluate and time a plan; every setting is checked first.

    The result is written into a temporary directory beside `out` and moved into place only when
    everything succeeded, so a failure leaves `out` as it was.

    Args:
        plan_path: The plan file (`plans/*.yaml` of a search run).
        out: Output directory; must not exist or be empty (see `overwrite`).
        task: The task to evaluate and to draw recovery data from.
        workload: `cost_models.Workload` fields to time with instead of the plan's (None: the plan's).
        recovery: The recovery to run (None: the plan's recorded recipe, with its data, or none).
        recovery_samples: Training samples the task lends to `recovery`.
        recovery_seed: Seed of that draw.
        device: "cpu", "cuda" or "cuda:<i>".
        repeats: Interleaved timing rounds.
        onnx: Also export `model.onnx`.
        overwrite: Replace a non-empty `out`.
        check_weights: Refuse a plan made for other weights (False: apply it to a fine-tuned
            checkpoint of the same architecture on purpose).
        precision: The pruned model's deployed precision ("fp32", "bf16", "int8"; None: the plan's,
            which is the precision its search measured the metric at, else fp32): after recovery
            it is converted, evaluated, saved and timed at it; the dense model at that precision
            is timed beside it (`measured_speedup` stays over the dense model as loaded). int8 is
            the QDQ `model.onnx` int8 runtimes consume, quantised by the plan's recorded recipe
            (else the default `Int8Recipe`) and run by ONNX Runtime.

    Returns:
        What `<out>/apply.json` holds: predicted and measured speedup, metrics, recovery, sizes.
    """
    plan = prunable.PrunePlan.load(plan_path)
    if plan.model.source is None:
        raise PlanError(f"{plan_path}: the plan names no model source, so there is nothing to load")
    torch_dev = torch_device(device)
    timed, changed = timed_workload(plan, workload or {})
    if timed.dtype == "int8" and (workload or {}).get("dtype") in (None, "auto"):
        # An int8 plan (an NPU's, say): the dense model as the user has it is timed beside it.
        timed = replace(timed, dtype="auto")
    dtype = timing_dtype(torch_dev, timed.dtype)
    timed = replace(timed, dtype=next(name for name, d in TORCH_DTYPES.items() if d == dtype))
    if repeats < 1:
        raise ConfigError(f"repeats={repeats} is invalid; valid: >= 1")
    if precision is not None and plan.mixed_precision:
        log.warning(
            "precision=%s deploys the whole model at %s: the plan's per-block precisions (%s) are not used",
            precision,
            precision,
            prunable.precision_summary(*plan.layer_precisions("-")),
        )
        plan = plan.without_precisions()
    elif plan.mixed_precision:
        precision = PER_BLOCK  # each block at its plan's precision (apply.json names them)
    precision = precision or str(plan.metadata.get("precision", "fp32"))
    if precision != PER_BLOCK:
        check_precision(precision)
    if precision == "int8" and not onnx:
        raise ConfigError("precision='int8' deploys the int8 QDQ model.onnx; onnx=False contradicts it")
    if precision == "int8" and timed.phase == "decode":
        raise ConfigError(
            f"precision='int8' deploys the prefill ONNX graph, which cannot time {timed.describe()}; "
            "valid: a prefill workload, or precision fp32/bf16"
        )
    assert plan.model.source is not None  # checked above (a plan without precisions keeps it)
    source = prunable.resolve_source(plan.model.source)
    out_dir = check_out(out, model_dir=source, plan=Path(plan_path), overwrite=overwrite)
    if recovery_samples < 1:
        raise ConfigError(f"recovery.samples={recovery_samples} is invalid; valid: >= 1")
    if recovery is None:
        recovery, recovery_samples, recovery_seed = recorded_recovery(plan)
    _log_timed_workload(plan, timed, changed)

    model = prunable.load_model(plan.model.source, plan.model.class_name)
    fingerprint = prunable.weights_fingerprint(model) if check_weights else None
    plan.check(prunable.discover(model), weights_fingerprint=fingerprint)
    check_workload(model, timed)
    prediction = predict_plan(plan, model)
    done = _prune_and_recover(
        model, plan, task, recovery, samples=recovery_samples, seed=recovery_seed, check_weights=check_weights
    )
    marker = {"made_by": "hwprune-apply", "plan": str(Path(plan_path).resolve())}
    with staged(out_dir, marker=marker) as staging:
        if precision == "int8":  # model.onnx is the int8 QDQ model, proved in a fresh process
            quantized = quantize(
                model,
                done.pruned,
                task,
                precision,
                timed,
                done.metric_dense,
                int8_path=staging / "model.onnx",
                recipe=recorded_int8_recipe(plan),
            )
            check = check_onnx(quantized.model, staging / "model.onnx", timed)
            onnx_result: dict[str, Any] | None = {
                "exported": True,
                "path": str(out_dir / "model.onnx"),
                "precision": "int8",
                **check,
            }
        else:
            # The ONNX graph is exported in fp32 (ONNX Runtime's CPU kernels have no bf16 GEMMs).
            onnx_result = (
                _onnx_artifact(done.pruned, timed, staging / "model.onnx", out_dir) if onnx else None
            )
            if precision == PER_BLOCK:
                quantized = quantize_per_block(model, done.pruned, task, done.plan, timed)
            else:
                quantized = quantize(model, done.pruned, task, precision, timed, done.metric_dense)
        plan = replace(
            done.plan,
            metadata={**done.plan.metadata, "precision": precision, "quantization": quantized.recipe},
        )
        prunable.save_pruned(done.pruned, plan, staging)
        timed_models = [(model, timed), (quantized.model, quantized.workload)]
        if quantized.dense is not None:
            timed_models.append((quantized.dense, quantized.workload))
        timing = measure(timed_models, device=torch_dev, repeats=repeats)
        result = _result(plan_path, plan, timed, torch_dev, timing, task.metric_name, prediction)
        result |= quantized.fields(timing, done.metric_pruned) | done.fields()
        result |= {
            "metric_pruned": quantized.metric if quantized.metric is not None else done.metric_pruned,
            "workload_differs_from_plan": changed,
            "params_dense": sum(p.numel() for p in model.parameters()),
            "params_pruned": sum(p.numel() for p in done.pruned.parameters()),
            "onnx": onnx_result,
        }
        if precision == PER_BLOCK:
            # One precision in every block (the dense model at bf16, say) is named; several are mixed.
            kept = [lp.precision for lp in plan.layers if lp.precision is not None]  # dropped layers set none
            result["precision"] = precision_name([a for a, _ in kept], [m for _, m in kept])
            result["precisions"] = prunable.precision_summary(*plan.layer_precisions("-"))
        (staging / "apply.json").write_text(json.dumps(result, indent=2))
    _log_result(result, plan, precision, done, task.metric_name, out_dir)
    return result


def _log_timed_workload(plan: prunable.PrunePlan, timed: cost_models.Workload, changed: list[str]) -> None:
    if changed:
        log.warning(
            "timing %s, but the plan's speedup was predicted for %s (%s differ): the two answer different questions",
            timed.describe(),
            planned_workload(plan).describe(),  # type: ignore[union-attr]
            ", ".join(changed),
        )
    else:
        log.info("timing %s, the workload the plan was searched for", timed.describe())


@dataclass(frozen=True)
class Recovered:
    """The plan applied to the model and recovered, with the metrics along the way.

    Attributes:
        pruned: The pruned, recovered model (fp32).
        plan: The plan, its recovery recipe recorded as run here.
        metric_dense: The dense model's metric.
        metric_unrecovered: The pruned model's metric before recovery.
        metric_pruned: After recovery.
        report: What the recovery did (None: no recovery).
    """

    pruned: torch.nn.Module
    plan: prunable.PrunePlan
    metric_dense: float
    metric_unrecovered: float
    metric_pruned: float
    report: RecoveryReport | None

    def fields(self) -> dict[str, Any]:
        """apply.json's metric and recovery part."""
        return {
            "metric_dense": self.metric_dense,
            "metric_unrecovered": self.metric_unrecovered,
            "recovery": self.report.recipe() if self.report else None,
            "recovery_seconds": self.report.seconds if self.report else 0.0,
        }


def _prune_and_recover(
    model: torch.nn.Module,
    plan: prunable.PrunePlan,
    task: Task,
    recovery: Recovery,
    *,
    samples: int,
    seed: int,
    check_weights: bool,
) -> Recovered:
    """Prune a copy of `model` by `plan`, recover it with `recovery`, measure the task before and after."""
    pruned = prunable.pruned_copy(model, plan, check_weights=check_weights)
    task.prepare(model)
    metric_dense, metric_unrecovered = task.evaluate(model), task.evaluate(pruned)
    if isinstance(recovery, NoRecovery):
        return Recovered(pruned, plan, metric_dense, metric_unrecovered, metric_unrecovered, None)
    data = task.recovery_data(samples=samples, seed=seed)
    report = recovery.recover(pruned, model, data, layers=plan.kept_layers())
    recipe = {**report.recipe(), "data_samples": samples, "data_seed": seed}
    plan = replace(plan, metadata={**plan.metadata, "recovery": recipe})
    return Recovered(pruned, plan, metric_dense, metric_unrecovered, task.evaluate(pruned), report)


def _log_result(
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


def _onnx_artifact(
    pruned: torch.nn.Module, workload: cost_models.Workload, path: Path, out_dir: Path
) -> dict[str, Any]:
    """Export `model.onnx` and prove it in ONNX Runtime; what apply.json says of it.

    An exporter that cannot trace the model leaves the torch artifact as the result, with one
    warning and the reason recorded; a file the runtime runs differently fails the apply.
    """
    try:
        export_onnx(pruned, workload, path)
    except Exception as err:  # the exporter's own errors are many and unrelated
        reason = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
        log.warning("ONNX export skipped: torch.onnx could not export this model (%s)", reason)
        path.unlink(missing_ok=True)
        return {"exported": False, "reason": reason}
    return {"exported": True, "path": str(out_dir / path.name), **check_onnx(pruned, path, workload)}


def _result(
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
