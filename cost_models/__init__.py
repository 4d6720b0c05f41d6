"""Latency of any per-layer width choice on a target device.

Depends on nothing else of hwprune: a model is a `BlockSpec` of plain numbers, a configuration is per
layer the attention units and MLP neurons kept.

    profile = cost_models.load_profile("cpu_local")     # or "gpu_h100", ... (conf/hardware/*.yaml)
    profile = cost_models.local_profile(profile)      # cpu_local: measured peaks (cached)
    tables = cost_models.load_tables(profile)         # this device's profiled tables
    model = cost_models.cost_model_for(profile, spec, workload, tables=tables)  # table > calibrated > analytical
    pred = model.predict(units, mlp)          # (N, layers) arrays -> pred.latency_ms (N,)
    pred.source, pred.hardware, pred.workload  # "table" | "calibrated" | "analytical", "gpu_h100", Workload
    mixed = cost_models.mixed_precision_model(profile, spec, workload, ["bf16"], tables=tables)
    mixed.predict_mixed(units, mlp, attention_precision=a, mlp_precision=m)  # per block: index into mixed.precisions
    refs = cost_models.reference_speedups(spec, workload, units, mlp)  # null and FLOPs predictors
    acc = cost_models.speedup_accuracy(predicted, measured).against(cost_models.speedup_accuracy(refs[cost_models.NULL], measured))
"""

from hwprune.cost_models._analytical import AnalyticalModel, Efficiency
from hwprune.cost_models._base import SOURCES, CostModel, Prediction
from hwprune.cost_models._calibrate import CalibratedModel, calibrate
from hwprune.cost_models._cpu_peaks import (
    cpu_flags,
    cpu_name,
    local_profile,
    machine_key,
    measure_peaks,
    table_dir,
)
from hwprune.cost_models._factory import cost_model_for, find_tables, load_tables, mixed_precision_model
from hwprune.cost_models._hardware import (
    BACKENDS,
    KINDS,
    HardwareProfile,
    load_profile,
    profile_names,
    width_grid,
    width_step,
)
from hwprune.cost_models._mixed import MixedPrecisionModel
from hwprune.cost_models._skill import FLOPS, NULL, Accuracy, reference_speedups, speedup_accuracy
from hwprune.cost_models._spec import DTYPE_BYTES, BlockSpec, Workload
from hwprune.cost_models._table import TABLE_FITS, LatencyTable, TableModel

__all__ = [
    "BACKENDS",
    "DTYPE_BYTES",
    "FLOPS",
    "KINDS",
    "NULL",
    "SOURCES",
    "TABLE_FITS",
    "Accuracy",
    "AnalyticalModel",
    "BlockSpec",
    "CalibratedModel",
    "CostModel",
    "Efficiency",
    "HardwareProfile",
    "LatencyTable",
    "MixedPrecisionModel",
    "Prediction",
    "TableModel",
    "Workload",
    "calibrate",
    "cost_model_for",
    "cpu_flags",
    "cpu_name",
    "find_tables",
    "load_profile",
    "load_tables",
    "local_profile",
    "machine_key",
    "measure_peaks",
    "mixed_precision_model",
    "profile_names",
    "reference_speedups",
    "speedup_accuracy",
    "table_dir",
    "width_grid",
    "width_step",
]
