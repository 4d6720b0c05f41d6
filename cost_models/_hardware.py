"""Hardware profiles: the numbers an analytical latency model needs about a device.

Each profile is one YAML file in the Hydra group `conf/hardware/`, validated against the
`HardwareProfile` dataclass (registered in Hydra's ConfigStore by `hwprune.search.config`), so a wrong
type, a missing field or an unknown profile name fails when the config is composed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from omegaconf import MISSING

from hwprune.cost_models._spec import DTYPE_BYTES, Workload
from hwprune.cost_models._table import TABLE_FITS
from hwprune.errors import ConfigError

KINDS = ("gpu", "tpu", "npu", "cpu")
BACKENDS = ("torch", "jax", "onnxruntime")


@dataclass
class HardwareProfile:
    """A target device.

    Attributes:
        name: Profile name (the YAML file's stem).
        kind: "gpu", "tpu", "npu" or "cpu".
        peak_tflops: Dense peak per dtype, TFLOP/s (TOPS for int8).
        memory_bandwidth_gbs: Off-chip memory bandwidth, GB/s.
        compute_units: Units work is spread over in waves (GPU SMs, TPU cores, NPU engines, CPU cores).
        tile_m: Rows of one unit of matrix work (GPU CTA tile, TPU sublanes, CPU register block).
        tile_n: Columns of one unit of matrix work (GPU CTA tile, TPU MXU width, SIMD lanes).
        tile_k: Reduction depth the matrix unit pads to.
        min_tile_m: Rows a GEMM with fewer rows than `tile_m` is padded to (the small-M and GEMV
            kernels a library picks for decode); None pads every GEMM to `tile_m`.
        pad_memory: Tensors are stored padded to the tiles (TPU's (8, 128) layout), so padding costs
            bandwidth as well as compute.
        on_chip_memory_mib: Memory weights can stay resident in (NPU SRAM, TPU VMEM); weights that
            do not fit are streamed from off-chip memory. None where not public or not modelled.
        launch_overhead_us: Fixed cost per operator (kernel launch, dispatch).
        dtypes: Dtypes the device runs; the first is the default for workload dtype "auto".
        backend: Profiler backend for measured tables: "torch", "jax" or "onnxruntime".
        device: Device string for the backend ("cuda", "cpu", "tpu").
        execution_provider: ONNX Runtime execution provider (backend "onnxruntime").
        tables: Profiled latency tables (CSV files with JSON sidecars): absolute, relative to the
            working directory, or relative to the tables shipped with hwprune (results/tables in
            the checkout); empty where the device was not measured.
        table_fit: How a table is read: "additive" (attention + MLP sub-layer latencies fitted to
            the whole grid, averaging out timing noise) or "grid" (raw measurements interpolated).
        measure_peaks: Replace the peaks by a micro-benchmark of this machine (cpu_local).
    """

    name: str = MISSING
    kind: str = MISSING
    peak_tflops: dict[str, float] = MISSING
    memory_bandwidth_gbs: float = MISSING
    compute_units: int = MISSING
    tile_m: int = MISSING
    tile_n: int = MISSING
    tile_k: int = MISSING
    min_tile_m: int | None = None
    launch_overhead_us: float = MISSING
    dtypes: list[str] = MISSING
    pad_memory: bool = False
    on_chip_memory_mib: float | None = None
    backend: str = "torch"
    device: str = "cpu"
    execution_provider: str | None = None
    tables: list[str] = field(default_factory=list)
    table_fit: str = "additive"
    measure_peaks: bool = False
    sources: list[str] = field(default_factory=list)

    def validate(self) -> HardwareProfile:
        """Raise ValueError naming the bad value and the valid choices; return self."""
        if self.kind not in KINDS:
            raise ConfigError(
                f"hardware {self.name}: unknown kind {self.kind!r}; valid choices: {list(KINDS)}"
            )
        if self.backend not in BACKENDS:
            raise ConfigError(
                f"hardware {self.name}: unknown backend {self.backend!r}; valid choices: {list(BACKENDS)}"
            )
        if self.table_fit not in TABLE_FITS:
            raise ConfigError(
                f"hardware {self.name}: unknown table_fit {self.table_fit!r}; valid choices: {list(TABLE_FITS)}"
            )
        unknown = sorted(set(self.dtypes) - set(DTYPE_BYTES))
        if unknown or not self.dtypes:
            raise ConfigError(
                f"hardware {self.name}: dtypes {unknown or '[]'} invalid; valid choices: {sorted(DTYPE_BYTES)}"
            )
        missing = [d for d in self.dtypes if d not in self.peak_tflops]
        if missing:
            raise ConfigError(f"hardware {self.name}: no peak_tflops for dtypes {missing}")
        for key, value in [("memory_bandwidth_gbs", self.memory_bandwidth_gbs), *self.peak_tflops.items()]:
            if not value > 0:
                raise ConfigError(f"hardware {self.name}: {key} must be positive, got {value}")
        for key in ("compute_units", "tile_m", "tile_n", "tile_k"):
            if getattr(self, key) < 1:
                raise ConfigError(f"hardware {self.name}: {key} must be >= 1, got {getattr(self, key)}")
        if self.min_tile_m is not None and not 1 <= self.min_tile_m <= self.tile_m:
            raise ConfigError(
                f"hardware {self.name}: min_tile_m must be in [1, tile_m={self.tile_m}], got {self.min_tile_m}"
            )
        if self.launch_overhead_us < 0:
            raise ConfigError(
                f"hardware {self.name}: launch_overhead_us must be >= 0, got {self.launch_overhead_us}"
            )
        return self

    def resolve_workload(self, workload: Workload) -> Workload:
        """`workload` with its dtype resolved for this device ("auto" = the first dtype)."""
        return replace(workload, dtype=self.resolve_dtype(workload.dtype))

    def resolve_dtype(self, dtype: str) -> str:
        """The dtype a workload runs in on this device ("auto" = the device's first dtype)."""
        if dtype == "auto":
            return self.dtypes[0]
        if dtype not in self.dtypes:
            raise ConfigError(
                f"hardware {self.name} does not run {dtype!r}; its dtypes: {self.dtypes} (or 'auto')"
            )
        return dtype


def profile_names() -> list[str]:
    """The hardware profiles shipped with hwprune (its conf/hardware/*.yaml)."""
    folder = resources.files("hwprune.conf") / "hardware"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_profile(name: str) -> HardwareProfile:
    """A validated hardware profile: a shipped one by name, or a YAML file of the same fields.

    The same files the Hydra apps compose, read as plain data (Hydra's `defaults` list aside), so
    cost models need nothing but this package to know their devices.

    Raises:
        ValueError: An unknown name (listing the shipped ones), an unknown or missing field, or a
            value the profile's checks refuse.
    """
    import yaml

    path = Path(name).expanduser()
    if path.suffix not in (".yaml", ".yml"):
        shipped = resources.files("hwprune.conf") / "hardware" / f"{name}.yaml"
        if not shipped.is_file():
            raise ConfigError(f"unknown hardware profile {name!r}; valid choices: {profile_names()}")
        text = shipped.read_text()
    elif path.is_file():
        text = path.read_text()
    else:
        raise ConfigError(f"hardware profile file {path} does not exist")
    data = yaml.safe_load(text) or {}
    data.pop("defaults", None)
    declared = {f.name: f for f in dataclasses.fields(HardwareProfile)}
    unknown = sorted(set(data) - set(declared))
    if unknown:
        raise ConfigError(
            f"hardware profile {name!r}: unknown key {unknown[0]!r}; valid keys: {sorted(declared)}"
        )
    missing = sorted(k for k, f in declared.items() if f.default is MISSING and k not in data)
    if missing:
        raise ConfigError(f"hardware profile {name!r}: missing required {missing}")
    return HardwareProfile(**data).validate()


def width_step(profile: HardwareProfile, width: int, *, target_steps: int = 12) -> int:
    """A grid/search step for MLP widths: a multiple of the device's tile, about width/target_steps.

    Steps aligned to tiles are where latency actually changes, so neither the profiled grid nor the
    search wastes points inside a flat stair.
    """
    tile = profile.tile_n
    step = max(tile, -(-width // target_steps))
    return -(-step // tile) * tile


def width_grid(dense: int, step: int, *, start: int = 0) -> tuple[int, ...]:
    """Widths from `start` to `dense` in steps of `step`, the dense width always last.

    Raises:
        ValueError: `step` < 1.
    """
    if step < 1:
        raise ConfigError(f"width step must be >= 1, got {step}")
    return tuple(sorted({*range(start, dense + 1, step), dense}))
