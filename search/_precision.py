"""The precision a pruned model is deployed at: prune, recover, then quantise (the last step of
`hwprune-apply`).

`bf16` is the whole model in bfloat16 (`model.to(torch.bfloat16)`): on CPUs with AVX-512 BF16 it
runs MiniLM 2.7x faster than fp32 at no measurable cost in accuracy (results/benchmarks/
precision_cpu.md), and on GPUs it is the tensor cores' format. `int8` is the int8 QDQ ONNX model
that int8 NPU, TPU and GPU runtimes consume, made and run by ONNX Runtime (`search/_int8.py`),
calibrated on the task's training inputs. The metric, the deployed artifact and the timing of the
pruned model are all at that precision; the dense model it is compared with is the one the user
started from (fp32), and the dense model at the same precision is timed beside both.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from hwprune import cost_models, hessian, prunable
from hwprune.errors import ConfigError
from hwprune.search._int8 import Int8Recipe, quantize_int8
from hwprune.search._timing import Timing
from hwprune.search.tasks import Task

log = logging.getLogger("hwprune.apply")

# The precisions torch runs a model at, and the one ONNX Runtime's int8 QDQ model runs at. fp16 is
# measured where it is priced (T4, L4, Jetson and NPUs run it): its narrow range overflows where
# bf16's does not, which is what a metric at fp16 shows.
PRECISIONS = prunable.PLAN_PRECISIONS
DEPLOY_PRECISIONS = (*PRECISIONS, "int8")
# What a plan whose layers set their own precisions deploys at (`prunable.set_precisions`).
PER_BLOCK = "mixed"


def precision_name(attention: list[str], mlp: list[str]) -> str:
    """What a model with these per-layer precisions is said to run at: its one precision, or
    `PER_BLOCK` where its blocks differ."""
    names = set(attention) | set(mlp)
    return names.pop() if len(names) == 1 else PER_BLOCK


def check_precision(precision: str) -> None:
    """Raise ValueError for a precision hwprune-apply cannot deploy, naming the valid ones."""
    if precision not in DEPLOY_PRECISIONS:
        raise ConfigError(
            f"precision={precision!r} is not supported; valid choices: {list(DEPLOY_PRECISIONS)}"
        )


def to_precision(model: nn.Module, precision: str) -> nn.Module:
    """`model` converted in place to a torch `precision` (`prunable.cast`: as it reloads when saved)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is no torch precision; valid choices: {list(PRECISIONS)}")
    return prunable.cast(model, PRECISIONS[precision])


def copy_at_precision(model: nn.Module, precision: str) -> nn.Module:
    """A copy of `model` at a torch `precision`, made parameter by parameter (never a second fp32 copy)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is no torch precision; valid choices: {list(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    copy = prunable.converted_copy(
        model, params=lambda t: t.detach().to(dtype), buffers=lambda t: t.detach().clone()
    )
    return prunable.cast(copy, dtype)  # the persistent buffers, as `to_precision` converts them


def measured_precision(dtype: str) -> str:
    """The precision a model priced at `dtype` is evaluated at here: `dtype` where torch runs it
    (fp32, bf16, fp16) or ONNX Runtime's int8 QDQ model stands for it (int8), else fp32 (fp8 needs
    its runtime's conversion, tf32 is fp32 storage; the report says so)."""
    return dtype if dtype in DEPLOY_PRECISIONS else "fp32"


def int8_calibration(task: Task, recipe: Int8Recipe) -> list[hessian.Batch]:
    """The training batches an int8 model is calibrated on (never the evaluation data)."""
    data = task.recovery_data(samples=recipe.calibration_samples, seed=recipe.calibration_seed)
    return data.batches


def int8_model(
    model: nn.Module,
    calibration: list[hessian.Batch],
    workload: cost_models.Workload,
    path: Path | None = None,
    *,
    reduce_range: bool | None = None,
) -> nn.Module:
    """`model` as its int8 QDQ ONNX model run by ONNX Runtime (`model` itself is not changed).

    Args:
        path: Where the file is kept (None: a scratch file, gone once the runtime has loaded it).
        reduce_range: Weights in 7 bits (`Int8Recipe.reduce_range`; None: where this CPU needs it).
    """
    if path is not None:
        return quantize_int8(model, calibration, path, workload, reduce_range=reduce_range)
    with tempfile.TemporaryDirectory(prefix="hwprune-int8-") as tmp:
        return quantize_int8(
            model, calibration, Path(tmp) / "model.int8.onnx", workload, reduce_range=reduce_range
        )


@dataclass(frozen=True)
class Quantized:
    """The pruned model at its deployed precision, and what that changed.

    Attributes:
        precision: The deployed precision.
        model: The pruned model as deployed: the torch model converted in place, or for int8 its
            QDQ model in ONNX Runtime (the torch model stays fp32).
        workload: The timed workload at that precision.
        metric: The pruned model's metric at that precision (None: fp32, measured already).
        dense: The dense model at that precision, timed beside the others (None: the dense
            reference is timed at this precision already).
        metric_dense: The dense model's metric at that precision (None where `dense` is).
        recipe: How the model was quantised (int8), else None.
    """

    precision: str
    model: nn.Module
    workload: cost_models.Workload
    metric: float | None = None
    dense: nn.Module | None = None
    metric_dense: float | None = None
    recipe: dict[str, Any] | None = None

    def fields(self, timing: Timing, metric_unquantized: float) -> dict[str, Any]:
        """apply.json's precision part."""
        fields: dict[str, Any] = {
            "precision": self.precision,
            "metric_unquantized": metric_unquantized,
            "quantization": self.recipe,
        }
        if self.dense is not None:
            (same,) = timing.others
            dense_ms, pruned_ms = statistics.median(same), statistics.median(timing.pruned)
            fields |= {
                "metric_dense_same_precision": self.metric_dense,
                "latency_ms_dense_same_precision": dense_ms,
                "measured_speedup_same_precision": dense_ms / pruned_ms,
            }
        return fields


def quantize(
    dense: nn.Module,
    pruned: nn.Module,
    task: Task,
    precision: str,
    timed: cost_models.Workload,
    metric_dense: float,
    *,
    int8_path: Path | None = None,
    recipe: Int8Recipe | None = None,
) -> Quantized:
    """The recovered pruned model at `precision`, evaluated there; where the dense reference is
    timed at another precision, the dense model at `precision` is evaluated and timed beside it.

    A torch precision converts `pruned` in place; int8 leaves it as it is and quantises a QDQ model
    of it (kept at `int8_path`), calibrated by `recipe` on the task's training inputs.
    """
    deployed = replace(timed, dtype=precision)
    if precision == "int8":
        recipe = recipe or Int8Recipe()
        calibration = int8_calibration(task, recipe)
        model = int8_model(pruned, calibration, timed, path=int8_path, reduce_range=recipe.reduce_range)
        metric_int8 = task.evaluate(model)
        log.info("at int8: %s %.3f", task.metric_name, metric_int8)
        dense_int8 = int8_model(dense, calibration, timed, reduce_range=recipe.reduce_range)
        metric_dense = task.evaluate(dense_int8)
        log.info("the dense model at int8: %s %.3f", task.metric_name, metric_dense)
        return Quantized(precision, model, deployed, metric_int8, dense_int8, metric_dense, recipe.describe())
    metric = None
    if precision != "fp32":
        metric = task.evaluate(to_precision(pruned, precision))
        log.info("at %s: %s %.3f", precision, task.metric_name, metric)
    if timed.dtype == precision:  # the dense reference is timed at this precision already
        return Quantized(precision, pruned, deployed, metric)
    dense_copy = copy_at_precision(dense, precision)
    if precision != "fp32":
        metric_dense = task.evaluate(dense_copy)
        log.info("the dense model at %s: %s %.3f", precision, task.metric_name, metric_dense)
    return Quantized(precision, pruned, deployed, metric, dense_copy, metric_dense)


def quantize_per_block(
    dense: nn.Module,
    pruned: nn.Module,
    task: Task,
    plan: prunable.PrunePlan,
    timed: cost_models.Workload,
) -> Quantized:
    """The recovered pruned model with its layers at the precisions `plan` gives them (in place),
    evaluated there, and the dense model with each layer at the same precisions beside it (a layer
    the plan drops stays at the dense model's dtype): what pruning adds on top of the precisions."""
    prunable.set_precisions(pruned, plan)
    metric = task.evaluate(pruned)
    attention, mlp = plan.layer_precisions("fp32")
    log.info(
        "at its blocks' precisions (%s): %s %.3f",
        prunable.precision_summary(attention, mlp),
        task.metric_name,
        metric,
    )
    structure = prunable.discover(dense)
    same = prunable.PrunePlan.dense(structure, plan.model).with_precisions(attention, mlp)
    dense_copy = prunable.set_precisions(copy_at_precision(dense, "fp32"), same)
    metric_dense = task.evaluate(dense_copy)
    log.info("the dense model at the same precisions: %s %.3f", task.metric_name, metric_dense)
    deployed = replace(timed, dtype="fp32")  # the stream between blocks; each block at its own
    return Quantized(PER_BLOCK, pruned, deployed, metric, dense_copy, metric_dense)
