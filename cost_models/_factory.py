"""Pick the best cost model for a target: a profiled table, else a calibrated roofline, else analytical."""

from __future__ import annotations

import logging
from pathlib import Path

from cost_models._analytical import AnalyticalModel
from cost_models._base import CostModel
from cost_models._calibrate import calibrate
from cost_models._cpu_peaks import cpu_name, local_profile
from cost_models._hardware import HardwareProfile
from cost_models._spec import BlockSpec, Workload
from cost_models._table import LatencyTable, TableModel

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_table(path: str) -> Path | None:
    """`path` as given, or relative to the repository root; None if neither exists."""
    for candidate in (Path(path).expanduser(), REPO_ROOT / path):
        if candidate.is_file():
            return candidate
    return None


def cost_model_for(profile: HardwareProfile, spec: BlockSpec, workload: Workload) -> CostModel:
    """The most faithful cost model the profile's data allows.

    1. A profiled table of exactly this block shape and workload: table lookup ("table").
    2. A profiled table of this device at another shape or workload: the roofline with efficiencies
       fitted to it ("calibrated").
    3. Otherwise the datasheet roofline ("analytical"); for cpu_local with measured peaks.

    A CPU table counts only on the CPU model it was measured on.
    """
    profile.validate()
    if profile.measure_peaks:
        profile = local_profile(profile)
    workload_resolved = profile.resolve_workload(workload)
    usable = []
    for entry in profile.tables:
        path = find_table(entry)
        if path is None:
            log.warning("hardware %s lists table %s, which does not exist; skipping it", profile.name, entry)
            continue
        table = LatencyTable.load(path)
        measured_on = table.meta.get("host_cpu")
        if profile.kind == "cpu" and measured_on != cpu_name():
            log.info(
                "table %s was measured on %r, this CPU is %r; not using it", path, measured_on, cpu_name()
            )
            continue
        usable.append(table)
    for table in usable:
        if table.spec == spec and table.workload == workload_resolved:
            return TableModel(table=table, fit=profile.table_fit)
    if usable:
        return calibrate(profile, usable[0])
    return AnalyticalModel(profile=profile, spec=spec, workload=workload_resolved)
