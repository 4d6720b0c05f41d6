"""Pick the best cost model for a target: a profiled table, else a calibrated roofline, else analytical."""

from __future__ import annotations

import glob
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from hwprune.cost_models._analytical import AnalyticalModel
from hwprune.cost_models._base import CostModel
from hwprune.cost_models._calibrate import calibrate
from hwprune.cost_models._cpu_peaks import cpu_name
from hwprune.cost_models._hardware import HardwareProfile
from hwprune.cost_models._mixed import MixedPrecisionModel, edge_costs, session_scales
from hwprune.cost_models._spec import BlockSpec, Workload
from hwprune.cost_models._table import LatencyTable, TableModel
from hwprune.errors import ConfigError

log = logging.getLogger(__name__)

# The tables shipped with hwprune (results/tables in a source checkout, package data when installed).
SHIPPED_TABLES = Path(__file__).parent / "tables"


def find_tables(entry: str) -> list[Path]:
    """The table files `entry` names: a path or a glob pattern (`cpu_local/*/minilm_*.csv`), as given
    (absolute or from the working directory), else among the shipped tables. Sorted; may be empty."""
    for root in (Path(), SHIPPED_TABLES):  # an absolute entry ignores the root
        found = sorted(Path(p) for p in glob.glob(str(root / Path(entry).expanduser())))
        if files := [p for p in found if p.is_file()]:
            return files
    return []


def load_tables(profile: HardwareProfile) -> list[LatencyTable]:
    """The profile's tables that exist and were measured on this very device.

    A CPU table counts only on the CPU model and thread count it was measured with; the tables used
    are logged in one line, and those of other machines in one more, counted per machine.
    """
    tables = []
    paths = []
    used: list[str] = []
    elsewhere: dict[str, int] = {}  # tables of other CPUs (or thread counts), per machine
    for entry in profile.tables:
        if not (found := find_tables(entry)):
            log.warning("hardware %s lists table %s, which does not exist; skipping it", profile.name, entry)
        paths += found
    for path in paths:
        table = LatencyTable.load(path)
        if table.hardware != profile.name:
            log.warning(
                "table %s was measured for %r, not %r; skipping it", path, table.hardware, profile.name
            )
            continue
        if profile.kind == "cpu":
            here = (cpu_name(), torch.get_num_threads())
            there = (table.meta.get("host_cpu"), table.meta.get("threads"))
            if there != here:
                machine = f"{there[0]} x {there[1]} threads"
                elsewhere[machine] = elsewhere.get(machine, 0) + 1
                continue
        tables.append(table)
        used.append(path.name)
    if elsewhere:
        log.info(
            "%s: %d table(s) of other machines not used (%s); this is %s x %s threads",
            profile.name,
            sum(elsewhere.values()),
            "; ".join(f"{n} of {machine}" for machine, n in elsewhere.items()),
            *(cpu_name(), torch.get_num_threads()),
        )
    if tables:
        log.info(
            "%s: %d table(s) of this device: %s",
            profile.name,
            len(tables),
            ", ".join(used),
        )
    return tables


def cost_model_for(
    profile: HardwareProfile,
    spec: BlockSpec,
    workload: Workload,
    *,
    tables: Sequence[LatencyTable] = (),
) -> CostModel:
    """The most faithful cost model of `spec` at `workload` that the device's tables allow.

    1. A table of exactly this block shape and workload: table lookup ("table").
    2. Tables of this device at other shapes or workloads: the roofline with efficiencies fitted to
       those of the same phase (prefill or decode; all of them where that phase has none) and,
       among those, of the same dtype where there are any,
       predicting this shape and workload ("calibrated").
    3. No table: the datasheet roofline ("analytical").

    Whatever the source, the model answers for `spec` and `workload` (dtype resolved): its
    predictions report that workload. The function has no side effects; measuring a CPU's peaks
    (`local_profile`) and reading tables (`load_tables`) are the caller's visible steps.

    Args:
        profile: The target device.
        spec: The dense block shape of the model.
        workload: What the model runs.
        tables: Profiled tables of this device (`load_tables`).
    """
    profile.validate()
    resolved = profile.resolve_workload(workload)
    for table in tables:
        if table.hardware != profile.name:
            raise ConfigError(f"a table of {table.hardware!r} was passed for hardware {profile.name!r}")
    for table in tables:
        if table.spec == spec and table.workload == resolved:
            return TableModel(table=table, workload=resolved, fit=profile.table_fit)
    if tables:
        # Prefill and decode run different kernels (large GEMMs against few-row GEMV and a cache),
        # and so do dtypes (AMX bf16 tiles against AVX-512 fp32): one's efficiencies do not transfer
        # to the other where the other was measured. Phase first, then dtype.
        same_phase = [t for t in tables if t.workload.phase == resolved.phase] or list(tables)
        same_dtype = [t for t in same_phase if t.workload.dtype == resolved.dtype]
        return calibrate(profile, same_dtype or same_phase, spec=spec, workload=resolved)
    return AnalyticalModel(profile=profile, spec=spec, workload=resolved)


def mixed_precision_model(
    profile: HardwareProfile,
    spec: BlockSpec,
    workload: Workload,
    precisions: Sequence[str],
    *,
    tables: Sequence[LatencyTable] = (),
) -> MixedPrecisionModel:
    """Per-block precisions priced on `profile`: one `cost_model_for` per precision (each from that
    dtype's tables where the device was measured at it), the workload's resolved dtype the reference.

    Raises:
        ValueError: A precision the device does not run, naming the ones it does.
    """
    resolved = profile.resolve_workload(workload)
    wanted = list(dict.fromkeys([resolved.dtype, *precisions]))
    for p in wanted:
        profile.resolve_dtype(p)  # the device's error, naming its dtypes
    models = {p: cost_model_for(profile, spec, replace(resolved, dtype=p), tables=tables) for p in wanted}
    scales = session_scales(models, resolved.dtype)
    return MixedPrecisionModel(
        models,
        reference=resolved.dtype,
        session_scales=scales,
        edge_ms=edge_costs(models, resolved.dtype, scales),
    )
