"""What a search run produces: the candidates it re-scored and everything the report needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from hwprune import cost_models, hessian, prunable
from hwprune.search._job import SearchJob
from hwprune.search._pareto import ExactFront
from hwprune.search._space import SearchSpace, Widths
from hwprune.search.tasks import Task


@dataclass
class Candidate:
    """A configuration evaluated on the real task."""

    kind: str  # "dense", "search" or "uniform"
    widths: Widths
    latency_ms: float
    proxy_loss: float
    metric: float = float("nan")  # after recovery, at `metric_precision`: what a user of the plan gets
    # The same model's metric on the task's validation split, which plans are chosen on (NaN: none).
    metric_validation: float = float("nan")
    metric_unrecovered: float = float("nan")
    metric_unquantized: float = float("nan")  # after recovery, in fp32
    metric_precision: str = "fp32"  # the precision `metric` was measured at
    quantization: str = ""  # how the model was quantised for `metric` ("" where it was not: fp32, bf16)
    recovery: str = "none"
    recovery_seconds: float = 0.0
    params: int = 0
    flops: float = 0.0
    layers: int = 0  # blocks left in the pruned model
    plan_path: str = ""
    label: str = ""
    dominated: bool = False
    degenerate: str = ""  # why the plan is no real choice ("" for most): see `degenerate_reason`
    # Per layer, the (attention names, MLP names) precisions it deploys at; None: no precision axis.
    precisions: tuple[list[str], list[str]] | None = None

    @property
    def choice_metric(self) -> float:
        """The metric plans are chosen on: the validation split's where the task has one."""
        return self.metric if np.isnan(self.metric_validation) else self.metric_validation

    @property
    def units(self) -> np.ndarray:
        return self.widths.units

    @property
    def mlp(self) -> np.ndarray:
        return self.widths.mlp


@dataclass
class RunOutcome:
    """Everything the report writer needs."""

    job: SearchJob
    run_dir: Path
    structure: prunable.Structure
    cost_model: cost_models.CostModel
    task: Task
    scores: hessian.UnitScores
    space: SearchSpace
    study: optuna.Study
    exact: ExactFront | None
    candidates: list[Candidate]
    hv_ratio: float | None
    extras: dict[str, Any] = field(default_factory=dict)
