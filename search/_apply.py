"""Applying a plan: prune the model it names, recover, save, evaluate and time both (the core of
`hwprune-apply`, taking plain objects)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from hwprune import cost_models, prunable
from hwprune.cost_models.profilers import TORCH_DTYPES, torch_device
from hwprune.errors import ConfigError, PlanError
from hwprune.search._apply_result import log_result, planned_workload, predict_plan, timing_fields
from hwprune.search._blocks import check_workload
from hwprune.search._int8 import Int8Recipe, int8_saturates
from hwprune.search._onnx import check_onnx, export_onnx
from hwprune.search._output import check_out, staged
from hwprune.search._precision import (
    PER_BLOCK,
    Quantized,
    check_precision,
    precision_name,
    quantize,
    quantize_per_block,
)
from hwprune.search._timing import measure
from hwprune.search.recovery import NoRecovery, Recovery, RecoveryReport, check_int8_grid, from_recipe
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


def recorded_int8_recipe(plan: prunable.PrunePlan, overrides: Mapping[str, Any] | None = None) -> Int8Recipe:
    """The int8 recipe a plan records (its calibration draw, its weights' range), or the default, with
    the fields `overrides` sets (not None) in place of the plan's."""
    recipe = plan.metadata.get("quantization") or {}
    default = Int8Recipe()
    # A plan made before reduce_range was recorded gets this CPU's choice.
    recorded = {
        "calibration_samples": int(recipe.get("calibration_samples", default.calibration_samples)),
        "calibration_seed": int(recipe.get("calibration_seed", default.calibration_seed)),
        "reduce_range": bool(recipe.get("reduce_range", default.reduce_range)),
    }
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if unknown := sorted(set(given) - set(recorded)):
        raise ConfigError(f"int8.{unknown[0]} is not a setting of the int8 recipe; valid: {sorted(recorded)}")
    chosen = Int8Recipe(**(recorded | given))
    if changed := {k: v for k, v in given.items() if recorded[k] != v}:
        log.info(
            "int8 recipe: the plan's, with %s (the plan has %s)", changed, {k: recorded[k] for k in changed}
        )
    if not chosen.reduce_range and int8_saturates():
        log.warning(
            "the int8 recipe keeps 8-bit weights, but this CPU's int8 kernels saturate with them (x86 without "
            "VNNI): ONNX Runtime's outputs here will differ from the recipe's arithmetic (the metric measured "
            "here says by how much); int8.reduce_range=true quantises the weights in 7 bits instead"
        )
    return chosen


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
    int8: Mapping[str, Any] | None = None,
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
        int8: `Int8Recipe` fields to quantise with instead of the plan's (None or unset: the plan's).

    Returns:
        What `<out>/apply.json` holds: predicted and measured speedup, metrics, recovery, sizes.
    """
    if repeats < 1:
        raise ConfigError(f"repeats={repeats} is invalid; valid: >= 1")
    if recovery_samples < 1:
        raise ConfigError(f"recovery.samples={recovery_samples} is invalid; valid: >= 1")
    run = _checked_run(
        plan_path,
        out,
        workload=workload,
        device=device,
        onnx=onnx,
        overwrite=overwrite,
        precision=precision,
        int8=int8,
    )
    if recovery is None:
        recovery, recovery_samples, recovery_seed = recorded_recovery(run.plan)
    if run.int8 is not None:  # before the model loads
        check_int8_grid(recovery, bool(run.int8.reduce_range))
    _log_timed_workload(run.plan, run.timed, run.changed)

    model = prunable.load_model(run.source, run.plan.model.class_name)
    fingerprint = prunable.weights_fingerprint(model) if check_weights else None
    run.plan.check(prunable.discover(model), weights_fingerprint=fingerprint)
    check_workload(model, run.timed)
    prediction = predict_plan(run.plan, model)
    done = _prune_and_recover(
        model,
        run.plan,
        task,
        recovery,
        samples=recovery_samples,
        seed=recovery_seed,
        check_weights=check_weights,
    )
    marker = {"made_by": "hwprune-apply", "plan": str(Path(plan_path).resolve())}
    with staged(run.out_dir, marker=marker) as staging:
        deployed, onnx_result = _deploy(model, done, task, run, staging, onnx=onnx)
        plan = replace(
            done.plan,
            metadata={**done.plan.metadata, "precision": run.precision, "quantization": deployed.recipe},
        )
        prunable.save_pruned(done.pruned, plan, staging)
        timed_models = [(model, run.timed), (deployed.model, deployed.workload)]
        if deployed.dense is not None:
            timed_models.append((deployed.dense, deployed.workload))
        timing = measure(timed_models, device=run.device, repeats=repeats)
        result = timing_fields(plan_path, plan, run.timed, run.device, timing, task.metric_name, prediction)
        result |= deployed.fields(timing, done.metric_pruned) | done.fields()
        result |= {
            "metric_pruned": deployed.metric if deployed.metric is not None else done.metric_pruned,
            "workload_differs_from_plan": run.changed,
            "params_dense": sum(p.numel() for p in model.parameters()),
            "params_pruned": sum(p.numel() for p in done.pruned.parameters()),
            "onnx": onnx_result,
        }
        if run.precision == PER_BLOCK:
            # One precision in every block (the dense model at bf16, say) is named; several are mixed.
            kept = [lp.precision for lp in plan.layers if lp.precision is not None]  # dropped layers set none
            result["precision"] = precision_name([a for a, _ in kept], [m for _, m in kept])
            result["precisions"] = prunable.precision_summary(*plan.layer_precisions("-"))
        (staging / "apply.json").write_text(json.dumps(result, indent=2))
    log_result(result, plan, run.precision, done, task.metric_name, run.out_dir)
    return result


@dataclass(frozen=True)
class _Run:
    """What an apply runs, checked before the model is loaded.

    Attributes:
        plan: The plan (without its per-block precisions where `precision` overrides them).
        source: Where its model is (the plan's model source).
        device: Where to time.
        timed: The workload to time, its dtype resolved for `device`.
        changed: The workload fields that differ from the plan's.
        precision: The deployed precision ("fp32", "bf16", "int8", or `PER_BLOCK`).
        out_dir: The output directory, checked.
        int8: The int8 recipe (with precision int8; None otherwise).
    """

    plan: prunable.PrunePlan
    source: str
    device: torch.device
    timed: cost_models.Workload
    changed: list[str]
    precision: str
    out_dir: Path
    int8: Int8Recipe | None


def _checked_run(
    plan_path: str | Path,
    out: str | Path,
    *,
    workload: Mapping[str, Any] | None,
    device: str,
    onnx: bool,
    overwrite: bool,
    precision: str | None,
    int8: Mapping[str, Any] | None,
) -> _Run:
    """Load the plan and check every setting against it, before anything expensive."""
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
    source = plan.model.source
    assert source is not None  # checked above (a plan without precisions keeps it)
    out_dir = check_out(
        out, model_dir=prunable.resolve_source(source), plan=Path(plan_path), overwrite=overwrite
    )
    recipe = recorded_int8_recipe(plan, int8) if precision == "int8" else None
    return _Run(plan, source, torch_dev, timed, changed, precision, out_dir, recipe)


def _deploy(
    model: torch.nn.Module, done: Recovered, task: Task, run: _Run, staging: Path, *, onnx: bool
) -> tuple[Quantized, dict[str, Any] | None]:
    """The recovered model at its deployed precision, and its `model.onnx` (what apply.json says of it)."""
    out_dir = run.out_dir
    if run.precision == "int8":  # model.onnx is the int8 QDQ model, proved in a fresh process
        quantized = quantize(
            model,
            done.pruned,
            task,
            run.precision,
            run.timed,
            done.metric_dense,
            int8_path=staging / "model.onnx",
            recipe=run.int8,
        )
        check = check_onnx(quantized.model, staging / "model.onnx", run.timed)
        return quantized, {
            "exported": True,
            "path": str(out_dir / "model.onnx"),
            "precision": "int8",
            **check,
        }
    # The ONNX graph is exported in fp32 (ONNX Runtime's CPU kernels have no bf16 GEMMs).
    onnx_result = _onnx_artifact(done.pruned, run.timed, staging / "model.onnx", out_dir) if onnx else None
    if run.precision == PER_BLOCK:
        return quantize_per_block(model, done.pruned, task, done.plan, run.timed), onnx_result
    return quantize(model, done.pruned, task, run.precision, run.timed, done.metric_dense), onnx_result


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
