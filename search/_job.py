"""What one search run takes, as plain Python objects: the core's input, whoever builds it.

`hwprune-search` builds a `SearchJob` from its Hydra config (`search.job_from_config`); a notebook
builds one directly:

    job = SearchJob(
        model=prunable.load_model("minilm", "BertModel"), source="minilm", name="minilm",
        task=FidelityTask(...), saliency=hessian.NViTSaliency(),
        hardware=cost_models.load_profile("gpu_h100"), workload=cost_models.Workload(batch_size=8),
        settings=SearchSettings(n_trials=300),
    )
    outcome = run_search(job, run_dir)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from torch import nn

from hwprune import cost_models, hessian
from hwprune.errors import ConfigError
from hwprune.search._int8 import Int8Recipe
from hwprune.search._precision_axis import AXIS_PRECISIONS
from hwprune.search._sampler import ParetoLocalSearchSampler
from hwprune.search._storage import check_storage
from hwprune.search._study import Constraints
from hwprune.search.recovery import NoRecovery, Recovery, check_int8_grid
from hwprune.search.tasks import Task


@dataclass(frozen=True, kw_only=True)
class SearchSettings:
    """How the study searches and which points of its front are pruned, recovered and measured.

    Attributes:
        n_trials: Trials of the study (a resumed study runs only the missing ones).
        seed: The sampler's seed (a worker of a shared study derives its own from it).
        storage: Where the study lives: None for the run directory's journal; a `.journal` file,
            `sqlite:///<file>` or `postgresql://...` (several workers).
        study_name: The study's name in a shared storage (None: derived from the run).
        heartbeat_s: Heartbeat of running trials on PostgreSQL.
        exact_seeds: Points of the proxy's exact front (within a latency budget) enqueued as trials.
        uniform_baselines: Fractions kept in every layer, seeded and re-scored as baselines.
        rescore: Front points re-scored on the task (pruned, recovered, measured).
        rescore_min_speedup: Re-score only front points at least this much faster than dense...
        rescore_max_speedup: ...and at most this much (None: no upper bound).
        unit_step: Step of the attention-unit choices per layer.
        mlp_step: Step of the MLP-width choices (None: the device's tile).
        depth: Drop the layers the search leaves without units (their proxy loss is measured).
        expert_axes: Search the routed experts' count and width of mixture-of-experts layers.
        latency_budget_ms: Latency budget in milliseconds (None: none).
        latency_budget_fraction: Latency budget as a fraction of the dense model's (None: none).
        params_budget_fraction: Budget on the blocks' parameters as a fraction of dense (None: none).
        precisions: The precisions each layer's attention and MLP choose among (None: every one the
            target runs that torch deploys per block; one precision turns the axis off).

    Raises:
        ValueError: A value out of range, naming it and the valid range (`search.<field>=...`).
    """

    n_trials: int = 1000
    seed: int = 0
    storage: str | None = None
    study_name: str | None = None
    heartbeat_s: int = 10
    # 100 points keep the study's front within 0.2 % of the exact one's hypervolume at 24-32 layers,
    # where 10 left it 4 % short (results/benchmarks/search_depth*.md).
    exact_seeds: int = 100
    uniform_baselines: tuple[float, ...] = (0.25, 0.5, 0.75)
    rescore: int = 8
    rescore_min_speedup: float = 1.0
    rescore_max_speedup: float | None = None
    unit_step: int = 1
    mlp_step: int | None = None
    depth: bool = False
    expert_axes: bool = True
    latency_budget_ms: float | None = None
    latency_budget_fraction: float | None = None
    params_budget_fraction: float | None = None
    precisions: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "uniform_baselines", tuple(self.uniform_baselines))
        if self.precisions is not None:
            object.__setattr__(self, "precisions", tuple(self.precisions))
        checks: list[tuple[str, Any, bool, str]] = [
            ("n_trials", self.n_trials, self.n_trials >= 1, ">= 1"),
            ("rescore", self.rescore, self.rescore >= 0, ">= 0"),
            ("heartbeat_s", self.heartbeat_s, self.heartbeat_s >= 1, ">= 1 (seconds)"),
            ("rescore_min_speedup", self.rescore_min_speedup, self.rescore_min_speedup >= 1, ">= 1"),
            (
                "rescore_max_speedup",
                self.rescore_max_speedup,
                self.rescore_max_speedup is None or self.rescore_max_speedup > self.rescore_min_speedup,
                f"> search.rescore_min_speedup={self.rescore_min_speedup} (or null: no upper bound)",
            ),
            ("unit_step", self.unit_step, self.unit_step >= 1, ">= 1"),
            (
                "mlp_step",
                self.mlp_step,
                self.mlp_step is None or self.mlp_step >= 1,
                ">= 1 (or null: the device's tile)",
            ),
            ("exact_seeds", self.exact_seeds, self.exact_seeds >= 0, ">= 0"),
            (
                "uniform_baselines",
                list(self.uniform_baselines),
                all(0 < f < 1 for f in self.uniform_baselines),
                "fractions in (0, 1)",
            ),
            (
                "latency_budget_ms",
                self.latency_budget_ms,
                self.latency_budget_ms is None or self.latency_budget_ms > 0,
                "> 0 (or null)",
            ),
            (
                "latency_budget_fraction",
                self.latency_budget_fraction,
                self.latency_budget_fraction is None or 0 < self.latency_budget_fraction < 1,
                "in (0, 1) of the dense latency (or null)",
            ),
            (
                "params_budget_fraction",
                self.params_budget_fraction,
                self.params_budget_fraction is None or 0 < self.params_budget_fraction < 1,
                "in (0, 1) of the dense parameters (or null)",
            ),
        ]
        if self.precisions is not None:
            checks.append(
                (
                    "precisions",
                    list(self.precisions),
                    bool(self.precisions) and all(p in AXIS_PRECISIONS for p in self.precisions),
                    f"a non-empty list of {list(AXIS_PRECISIONS)} (int8 is measured as a whole model "
                    "only), or null: every one the target runs",
                )
            )
        for key, value, ok, valid in checks:
            if not ok:
                raise ConfigError(f"search.{key}={value!r} is invalid; valid: {valid}")
        check_storage(self.storage)

    def constraints(self) -> Constraints:
        """The budgets, as the study's constraints."""
        return Constraints(
            latency_ms=self.latency_budget_ms,
            latency_fraction=self.latency_budget_fraction,
            params_fraction=self.params_budget_fraction,
        )


def check_depth(settings: SearchSettings, saliency: hessian.Saliency) -> None:
    """Refuse depth pruning with a saliency that does not estimate the loss."""
    if settings.depth and not saliency.estimates_loss:
        raise ConfigError(
            "search.depth=true needs saliency that estimates the loss, to weigh a dropped layer's "
            f"measured loss against slimmer layers; saliency={saliency.name} does not; valid: "
            f"{[m.name for m in hessian.SALIENCY if m.estimates_loss]}"
        )


@dataclass(frozen=True, kw_only=True)
class SearchJob:
    """Everything one search run needs.

    Attributes:
        model: The dense model (it is scored, gated and copied, never changed).
        source: Where `model` was loaded from (a bundled name or a directory): plans record it, and
            `hwprune-apply` loads it from there.
        name: The model's name in reports.
        task: The task whose calibration data scores the units and whose metric re-scores the front.
        saliency: Scores every unit.
        hardware: The target device's profile (`cost_models.load_profile`).
        workload: Batch, sequence and phase the latency is predicted at.
        settings: The study and the re-scoring.
        recovery: Run on every re-scored pruned plan before its metric (prune, then recover).
        recovery_samples: Training samples the task lends to recovery (never its evaluation data).
        recovery_seed: Seed of that draw.
        sampler: Makes the Optuna sampler from a seed (a class, or a `functools.partial` of one).
        scoring: Where and in what pieces the saliency is computed.
        cache_dir: Where saliency scores are cached (None: not cached).
        int8: How re-scored plans priced at int8 are quantised before their metric.

    Raises:
        ValueError: Settings that contradict each other (depth pruning with a saliency that does not
            estimate the loss).
    """

    model: nn.Module
    source: str
    name: str
    task: Task
    saliency: hessian.Saliency
    hardware: cost_models.HardwareProfile
    workload: cost_models.Workload
    settings: SearchSettings = field(default_factory=SearchSettings)
    recovery: Recovery = field(default_factory=NoRecovery)
    recovery_samples: int = 2048
    recovery_seed: int = 0
    sampler: Callable[..., optuna.samplers.BaseSampler] = ParetoLocalSearchSampler
    scoring: hessian.ScoringOptions = field(default_factory=hessian.ScoringOptions)
    cache_dir: Path | str | None = None
    int8: Int8Recipe = field(default_factory=Int8Recipe)

    def __post_init__(self) -> None:
        self.hardware.validate()
        if self.recovery_samples < 1:
            raise ConfigError(f"recovery.samples={self.recovery_samples} is invalid; valid: >= 1")
        check_depth(self.settings, self.saliency)
        check_int8_grid(self.recovery, bool(self.int8.reduce_range))

    def describe_sampler(self) -> str:
        """The sampler's class and fixed settings, for reports."""
        make: Any = self.sampler
        keywords = getattr(make, "keywords", {})
        func = getattr(make, "func", make)
        shown = ", ".join(f"{k}={v!r}" for k, v in keywords.items() if k != "seed")
        return f"{getattr(func, '__name__', repr(func))}({shown})"
