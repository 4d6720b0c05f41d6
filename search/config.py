"""The apps' structured-config schemas, registered in the ConfigStore with every option's.

Each YAML file in `conf/<group>/` starts with `defaults: [schema, _self_]`, so it is validated against
its dataclass (here, in `_options` for the options inside a group, or `cost_models.HardwareProfile`
for `hardware`) when the config is composed: a misspelt key, a wrong type or a missing required
field fails before any work starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from hwprune import cost_models
from hwprune.errors import ConfigError
from hwprune.search._int8 import Int8Recipe
from hwprune.search._job import SearchSettings
from hwprune.search._options import (
    TOKENIZER_FILES,
    RecoveryConfig,
    SaliencyConfig,
    TaskConfig,
    option_schemas,
)
from hwprune.search._precision import check_precision
from hwprune.search._precision_axis import axis_precisions


@dataclass
class ModelConfig:
    """The model to prune: a local directory or a bundled name, loaded offline."""

    name: str = MISSING
    source: str = MISSING
    class_name: str = "AutoModel"


@dataclass
class ApplyWorkload:
    """The workload `hwprune-apply` times; every field left unset is the one the plan was searched for."""

    batch_size: int | None = None
    seq_len: int | None = None
    dtype: str | None = None
    phase: str | None = None
    kv_len: int | None = None


# The int8 recipe's defaults live in `Int8Recipe`; the config reads them from there.
_INT8: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Int8Recipe)}


@dataclass
class ApplyInt8:
    """The int8 recipe `hwprune-apply` quantises with; every field left unset is the plan's recorded one
    (e.g. `int8.reduce_range=true` re-quantises a plan made on a CPU with VNNI for one without)."""

    calibration_samples: int | None = None
    calibration_seed: int | None = None
    reduce_range: bool | None = None


@dataclass
class Int8Config(ApplyInt8):
    """How `hwprune-search` quantises re-scored plans priced at int8 (`search.Int8Recipe`, whose
    defaults these are): calibration draw, and weights in 7 bits (`reduce_range`; null: where this
    CPU's int8 kernels saturate)."""

    calibration_samples: int = _INT8["calibration_samples"]
    calibration_seed: int = _INT8["calibration_seed"]
    reduce_range: bool | None = _INT8["reduce_range"]

    def __post_init__(self) -> None:
        self.build()  # the recipe's own checks, at compose time

    def build(self) -> Int8Recipe:
        return Int8Recipe(
            calibration_samples=self.calibration_samples,
            calibration_seed=self.calibration_seed,
            reduce_range=self.reduce_range,
        )


@dataclass
class WorkloadConfig(ApplyWorkload):
    """Mirror of `cost_models.Workload` (which is frozen) for overriding from the command line.

    A workload with every field set: it subclasses `ApplyWorkload` so that a `workload=<option>` file
    also sets all of `hwprune-apply`'s fields.
    """

    batch_size: int = 1
    seq_len: int = 0  # 0: 128 for prefill, 1 (one new token) for decode
    dtype: str = "auto"
    phase: str = "prefill"
    kv_len: int = 0

    def __post_init__(self) -> None:
        try:
            self.build()  # the one home of the workload's checks
        except ValueError as err:
            raise ConfigError(f"workload: {err}") from None

    def build(self) -> cost_models.Workload:
        return cost_models.Workload(**self.__dict__)


@dataclass
class SearchConfig:
    """The Optuna study and the re-scoring of its front: `SearchSettings` (which says what each field
    does and checks it) and the sampler (`_target_` an Optuna sampler, typed per option)."""

    n_trials: int = 1000
    seed: int = 0
    sampler: Any = MISSING
    storage: str | None = None
    heartbeat_s: int = 10
    rescore: int = 8
    rescore_min_speedup: float = 1.0
    rescore_max_speedup: float | None = None
    mlp_step: int | None = None
    unit_step: int = 1
    uniform_baselines: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    # Points of the exact front of the additive proxy (those within a latency budget; none under a
    # parameter budget) enqueued as trials: what keeps the study's front within 0.2 % of the exact
    # one's hypervolume at 24-32 layers, where 10 points left it 4 % short and none under a latency
    # budget 57-65 % short (results/benchmarks/search_depth*.md).
    exact_seeds: int = 100
    latency_budget_ms: float | None = None
    latency_budget_fraction: float | None = None
    params_budget_fraction: float | None = None
    study_name: str | None = None
    # Depth pruning: a layer the search leaves without units is dropped from the model (it costs
    # nothing, and its proxy loss is its measured layer score) instead of kept as an empty block.
    depth: bool = False
    # Mixture-of-experts models: search the routed experts' count and width per layer too (false
    # keeps every expert whole and prunes attention and shared experts only).
    expert_axes: bool = True
    # The precisions each layer's attention and MLP choose among (null: every one the target runs
    # that torch deploys per block, fp32 / bf16 / fp16; [fp32] or any single one turns the axis off).
    precisions: list[str] | None = None

    def __post_init__(self) -> None:
        self.settings()  # the one home of the range checks: they fail in `to_object`, before anything loads

    def settings(self) -> SearchSettings:
        """These settings as the core takes them (everything but the sampler)."""
        return SearchSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SearchSettings)})


@dataclass
class AppConfig:
    model: ModelConfig = MISSING
    task: TaskConfig = MISSING
    hardware: cost_models.HardwareProfile = MISSING
    saliency: SaliencyConfig = MISSING
    search: SearchConfig = MISSING
    recovery: RecoveryConfig = MISSING
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    int8: Int8Config = field(default_factory=Int8Config)

    def __post_init__(self) -> None:
        # Precisions the target lacks fail here, at compose time, naming the ones it runs.
        if self.search.precisions is not None:
            reference = self.hardware.validate().resolve_dtype(self.workload.dtype)
            axis_precisions(self.search.precisions, self.hardware, reference)


@dataclass
class ApplyConfig:
    """Settings of `hwprune-apply`: `search.apply_and_measure`'s arguments (see there), with the task
    and the recovery as config options (`task`: a task option; `recovery`: a recovery option run
    instead of the plan's recorded recipe, None: the plan's) and `workload` as its unset-able fields.
    """

    plan: str = MISSING
    out: str = MISSING
    task: TaskConfig = MISSING
    workload: ApplyWorkload = field(default_factory=ApplyWorkload)
    int8: ApplyInt8 = field(default_factory=ApplyInt8)
    recovery: RecoveryConfig | None = None
    device: str = "cpu"
    repeats: int = 20
    onnx: bool = True
    overwrite: bool = False
    check_weights: bool = True
    precision: str | None = None  # None: the plan's (the precision its metric was measured at)

    def __post_init__(self) -> None:
        if self.precision is not None:
            check_precision(self.precision)  # at compose time, before a model loads


@dataclass
class ProfilerConfig:
    """Settings of `hwprune-profile`."""

    warmup: int = 5
    repeats: int = 30
    mlp_step: int | None = None  # grid step of MLP widths; None = the device's tile_n
    unit_step: int = 1
    threads: int | None = None
    real_blocks: bool = True  # time the model's own pruned layers (torch) rather than ReferenceBlock
    stack: int | None = None  # torch: blocks timed back to back per call; None = the model's depth
    rounds: int = 1  # passes over the grid in shuffled order, the repeats split between them


@dataclass
class ProfileAppConfig:
    hardware: cost_models.HardwareProfile = MISSING
    model: ModelConfig = MISSING
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    profiler: ProfilerConfig = field(default_factory=ProfilerConfig)
    out: str = MISSING
    overwrite: bool = False  # replace a table already at `out` (else profiling refuses to start)


def register_configs() -> None:
    """Register every group's schema (idempotent)."""
    if not OmegaConf.has_resolver("hwprune.table_dir"):  # conf/profile.yaml's default `out`
        OmegaConf.register_new_resolver("hwprune.table_dir", cost_models.table_dir)
    if not OmegaConf.has_resolver("hwprune.workload_tag"):  # and its file name

        def workload_tag(batch_size: int, seq_len: int, phase: str, kv_len: int, dtype: str = "auto") -> str:
            return cost_models.Workload(
                batch_size=batch_size, seq_len=seq_len, phase=phase, kv_len=kv_len, dtype=dtype
            ).tag()

        OmegaConf.register_new_resolver("hwprune.workload_tag", workload_tag)
    cs = ConfigStore.instance()
    cs.store(group="hardware", name="schema", node=cost_models.HardwareProfile)
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="workload", name="schema", node=WorkloadConfig)
    cs.store(group="task", name="schema", node=TaskConfig)
    schemas = option_schemas()
    for name, build in schemas["task/build"].items():
        cs.store(group="task/build", name=name, node=build)
    for name, method in schemas["saliency"].items():
        cs.store(group="saliency", name=f"schema_{name}", node=SaliencyConfig(name=name, method=method()))
    for name, sampler in schemas["search"].items():
        cs.store(group="search", name=f"schema_{name}", node=SearchConfig(sampler=sampler()))
    for name, method in schemas["recovery"].items():
        cs.store(group="recovery", name=f"schema_{name}", node=RecoveryConfig(name=name, method=method()))
    cs.store(name="profile_schema", node=ProfileAppConfig)
    cs.store(name="app_schema", node=AppConfig)
    cs.store(name="apply_schema", node=ApplyConfig)


def unknown_key(key: str, schema: type) -> str:
    """The one-line error for `key`, which the dataclass `schema` does not declare: its valid keys."""
    valid = sorted(f.name for f in dataclasses.fields(schema))
    return f"unknown key {key!r} ({schema.__name__}); valid keys: {valid}"


def check_keys(cfg: DictConfig, path: str = "") -> None:
    """Fail on any key that a node's schema does not declare, naming it and the valid keys.

    Hydra's `+key=value` appends to a config even where a dataclass schema types the node, and
    `OmegaConf.to_object` then drops the key without a word: `+saliency.method.frist_order=true`
    would silently do nothing. This walk makes such a typo an error.
    """
    schema = OmegaConf.get_type(cfg)
    if schema is not None and dataclasses.is_dataclass(schema):
        declared = {f.name for f in dataclasses.fields(schema)}
        unknown = sorted(str(k) for k in cfg if str(k) not in declared)
        if unknown:
            assert isinstance(schema, type)
            raise ConfigError(unknown_key(path + unknown[0], schema))
    for key in cfg:
        child = cfg._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            check_keys(child, f"{path}{key!s}.")


def to_object(cfg: DictConfig) -> object:
    """Check every key against its schema, then instantiate the dataclasses of a composed config.

    Raises:
        ValueError: A key no schema declares.
        omegaconf.errors.MissingMandatoryValue: A required field left unset.
    """
    check_keys(cfg)
    return OmegaConf.to_object(cfg)


def compose(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose a config of the `conf` tree (as the apps do), for use from Python."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    register_configs()
    with initialize_config_module("hwprune.conf", version_base=None):
        return hydra_compose(config_name=config_name, overrides=overrides or [])


def load_hardware(name: str) -> cost_models.HardwareProfile:
    """The validated hardware profile `conf/hardware/<name>.yaml` (`cost_models.load_profile`)."""
    return cost_models.load_profile(name)


def build_task(task: TaskConfig, model_source: str) -> Any:
    """Instantiate a task, handing it the model's tokenizer as its config says."""
    from hydra.utils import instantiate

    kwargs: dict[str, Any] = {}
    if task.tokenizer != "none":
        from transformers import AutoTokenizer

        from hwprune import prunable

        source_dir = prunable.resolve_source(model_source)
        try:
            # transformers builds an empty tokenizer for a directory without tokenizer files (Qwen2,
            # GPT-2): that is no tokenizer, not one that turns every text into nothing.
            if not any((source_dir / name).is_file() for name in TOKENIZER_FILES):
                raise OSError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {source_dir}")
            kwargs["tokenizer"] = AutoTokenizer.from_pretrained(str(source_dir))
        except (OSError, ValueError, TypeError) as err:
            if task.tokenizer == "required":
                raise ConfigError(
                    f"task {task.name!r} needs a tokenizer, and {model_source} has none: {err}"
                ) from err
            kwargs["tokenizer"] = None
    return instantiate(task.build, **kwargs)
