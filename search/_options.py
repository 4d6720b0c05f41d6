"""Schemas of the options inside the groups: task builds, saliency methods, samplers, recovery.

One dataclass per option (`task/build: sts`, `saliency: nvit`, `search: pls`, `recovery: distill`),
so a misspelt setting of one option fails at compose time; `search.config` registers them and holds
the apps' top-level schemas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

from hwprune import hessian


@dataclass
class STSBuild:
    _target_: str = "hwprune.search.tasks.STSTask"
    train_path: str = MISSING
    eval_path: str = MISSING
    calibration_samples: int = 512
    batch_size: int = 32
    max_length: int = 128
    seed: int = 0


@dataclass
class FidelityBuild:
    _target_: str = "hwprune.search.tasks.FidelityTask"
    text_path: str | None = None
    calibration_samples: int = 256
    eval_samples: int = 256
    batch_size: int = 32
    max_length: int = 128
    seed: int = 0


@dataclass
class ClassificationBuild:
    _target_: str = "hwprune.search.tasks.ClassificationTask"
    calibration_samples: int = 256
    batch_size: int = 64
    seed: int = 0


@dataclass
class LMBuild:
    _target_: str = "hwprune.search.tasks.LMTask"
    text_path: str | None = None
    block_size: int = 128
    calibration_blocks: int = 64
    eval_blocks: int = 64
    batch_size: int = 8


TOKENIZER_MODES = ("required", "optional", "none")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")


@dataclass
class TaskConfig:
    """A task: its name, whether it takes the model's tokenizer, and how to build it.

    `tokenizer` is "required" (text tasks), "optional" (used when the model ships one; the LM task
    falls back to bytes) or "none" (images).
    """

    name: str = MISSING
    tokenizer: str = "required"
    build: Any = MISSING

    def __post_init__(self) -> None:
        if self.tokenizer not in TOKENIZER_MODES:
            raise ValueError(
                f"task.tokenizer {self.tokenizer!r} invalid; valid choices: {list(TOKENIZER_MODES)}"
            )


@dataclass
class NViTMethod:
    _target_: str = "hwprune.hessian.NViTSaliency"
    seed: int = 0
    first_order: bool = False


@dataclass
class HEAPrMethod:
    _target_: str = "hwprune.hessian.HEAPrSaliency"
    seed: int = 0


@dataclass
class FisherMethod:
    _target_: str = "hwprune.hessian.FisherSaliency"
    seed: int = 0


@dataclass
class HutchinsonMethod:
    _target_: str = "hwprune.hessian.HutchinsonSaliency"
    max_probes: int = 64
    min_probes: int = 8
    tol: float = 0.02
    patience: int = 3
    seed: int = 0


@dataclass
class TaylorMethod:
    _target_: str = "hwprune.hessian.TaylorSaliency"


@dataclass
class MagnitudeMethod:
    _target_: str = "hwprune.hessian.MagnitudeSaliency"


@dataclass
class RandomMethod:
    _target_: str = "hwprune.hessian.RandomSaliency"
    seed: int = 0


SALIENCY_METHODS = {
    "nvit": NViTMethod,
    "heapr": HEAPrMethod,
    "fisher": FisherMethod,
    "hutchinson": HutchinsonMethod,
    "taylor": TaylorMethod,
    "magnitude": MagnitudeMethod,
    "random": RandomMethod,
}


@dataclass
class SaliencyConfig:
    """A saliency method (`_target_` a `hessian.Saliency`, typed per option) and its score cache."""

    name: str = MISSING
    method: Any = MISSING
    cache_dir: str | None = "~/.cache/hwprune/saliency"
    # Where and in what pieces to score (hessian.ScoringOptions): a GPU, bf16 (None: where the model
    # is, in its dtype), and calibration samples per forward-backward pass (None: whole batches).
    # 8 bounds the activations held whatever the batch size, at no cost in speed (results/benchmarks/
    # saliency_scale.md) and the same scores.
    device: str | None = None
    dtype: str | None = None
    max_samples: int | None = 8

    def __post_init__(self) -> None:
        try:
            self.options()  # the one home of the checks
        except ValueError as err:
            raise ValueError(f"saliency: {err}") from None

    def options(self) -> hessian.ScoringOptions:
        return hessian.ScoringOptions(device=self.device, dtype=self.dtype, max_samples=self.max_samples)


@dataclass
class PLSSamplerConfig:
    _target_: str = "hwprune.search.ParetoLocalSearchSampler"
    seed: int | None = None
    n_startup_trials: int = 10
    move_p: float = 0.8
    max_retries: int = 50


@dataclass
class NSGA2SamplerConfig:
    _target_: str = "optuna.samplers.NSGAIISampler"
    seed: int | None = None
    population_size: int = 50


@dataclass
class TPESamplerConfig:
    _target_: str = "optuna.samplers.TPESampler"
    seed: int | None = None
    multivariate: bool = True


@dataclass
class RandomSamplerConfig:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: int | None = None


@dataclass
class GPSamplerConfig:
    _target_: str = "optuna.samplers.GPSampler"
    seed: int | None = None


SAMPLERS = {
    "pls": PLSSamplerConfig,
    "nsga2": NSGA2SamplerConfig,
    "tpe": TPESamplerConfig,
    "random": RandomSamplerConfig,
    "gp": GPSamplerConfig,
}


@dataclass
class NoRecoveryMethod:
    _target_: str = "hwprune.search.recovery.NoRecovery"


@dataclass
class ReconstructMethod:
    """`hwprune.search.recovery.Reconstruct`: per-unit scales and bias compensation, seconds."""

    _target_: str = "hwprune.search.recovery.Reconstruct"
    samples: int = 128
    ridge: float = 1.0
    bias: bool = True


@dataclass
class DistillMethod:
    """`hwprune.search.recovery.Distill`: distillation to the dense model, minutes."""

    _target_: str = "hwprune.search.recovery.Distill"
    steps: int = 400
    lr: float = 3e-4
    hidden_weight: float = 1.0
    output_weight: float = 1.0
    label_weight: float = 0.0
    temperature: float = 2.0
    weight_decay: float = 0.0
    held_out: int = 4
    seed: int = 0


@dataclass
class RecoveryConfig:
    """Recovery after pruning: every re-scored candidate gets it before its metric is measured.

    Attributes:
        name: The option's name ("none", "reconstruct", "distill").
        method: The recovery (`_target_` a `hwprune.search.recovery.Recovery`) and its settings.
        samples: Training samples the task lends to recovery (never its evaluation data).
        seed: Seed of that draw.
    """

    name: str = MISSING
    method: Any = MISSING
    samples: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"recovery.samples={self.samples} is invalid; valid: >= 1")


RECOVERY_METHODS = {"none": NoRecoveryMethod, "reconstruct": ReconstructMethod, "distill": DistillMethod}
