"""Profiled latency tables and the lookup model that interpolates them.

A table is a CSV of measured per-block latency over a grid of (attention units kept, MLP width kept),
with a JSON sidecar holding what it was measured on: hardware profile, backend, device details (NVML
on NVIDIA), block shape, workload and the fixed latency outside the blocks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cost_models._base import CostModel
from cost_models._spec import BlockSpec, Workload

COLUMNS = ["units", "heads", "mlp", "latency_ms", "p10_ms", "p90_ms", "repeats"]


@dataclass
class LatencyTable:
    """Measured block latencies and their provenance.

    Attributes:
        frame: One row per grid point, columns COLUMNS.
        spec: Block shape that was timed.
        workload: Workload it was timed under.
        profile: Hardware profile name.
        base_ms: Measured latency of the model outside its blocks (embeddings, head), or 0.
        meta: Backend, device, driver, clocks, library versions, date, command.
    """

    frame: pd.DataFrame
    spec: BlockSpec
    workload: Workload
    profile: str
    base_ms: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write `path` (CSV) and `path` with suffix .json (metadata)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.frame[COLUMNS].to_csv(path, index=False, float_format="%.6g")
        sidecar = {
            "profile": self.profile,
            "spec": asdict(self.spec),
            "workload": asdict(self.workload),
            "base_ms": self.base_ms,
            "meta": self.meta,
        }
        path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2, default=str))
        return path

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        path = Path(path)
        sidecar_path = path.with_suffix(".json")
        if not path.is_file() or not sidecar_path.is_file():
            raise FileNotFoundError(
                f"latency table {path} needs both the CSV and its {sidecar_path.name} sidecar"
            )
        frame = pd.read_csv(path)
        missing = [c for c in COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"latency table {path} lacks columns {missing}; expected {COLUMNS}")
        side = json.loads(sidecar_path.read_text())
        return cls(
            frame=frame,
            spec=BlockSpec(**side["spec"]),
            workload=Workload(**side["workload"]),
            profile=side["profile"],
            base_ms=float(side.get("base_ms", 0.0)),
            meta=side.get("meta", {}),
        )


class TableModel(CostModel):
    """Bilinear interpolation in a profiled grid; a width outside the grid raises, never extrapolates.

    Args:
        table: The profiled table; its grid must be complete (every units value with every mlp value).
        workload: The workload queries are for; must equal the table's, since latency depends on it.
    """

    source = "table"

    def __init__(self, *, table: LatencyTable, workload: Workload | None = None) -> None:
        if workload is not None and workload != table.workload:
            raise ValueError(
                f"table for {table.profile} was profiled at {table.workload.describe()}, not "
                f"{workload.describe()}; profile that workload or use the analytical model"
            )
        self.table = table
        self.profile = table.profile
        self.spec = table.spec
        self.workload = table.workload
        self.base_ms = table.base_ms
        grid = table.frame.pivot_table(index="units", columns="mlp", values="latency_ms", aggfunc="median")
        if grid.isna().any().any():
            raise ValueError(f"latency table for {table.profile} has an incomplete (units x mlp) grid")
        if min(grid.shape) < 2:
            raise ValueError(
                f"latency table for {table.profile} needs >= 2 grid points per axis, got {grid.shape}"
            )
        self.units_grid = grid.index.to_numpy(dtype=np.float64)
        self.mlp_grid = grid.columns.to_numpy(dtype=np.float64)
        self.values = grid.to_numpy(dtype=np.float64)  # (n_units, n_mlp)

    def block_latency_ms(self, units: np.ndarray, mlp: np.ndarray) -> np.ndarray:
        u, m = np.broadcast_arrays(np.asarray(units, dtype=np.float64), np.asarray(mlp, dtype=np.float64))
        for name, values, grid in (("units", u, self.units_grid), ("mlp", m, self.mlp_grid)):
            if values.size and (values.min() < grid[0] or values.max() > grid[-1]):
                raise ValueError(
                    f"{name} width {values.min() if values.min() < grid[0] else values.max():g} is outside the "
                    f"profiled range [{grid[0]:g}, {grid[-1]:g}] of the {self.profile} table; not extrapolating"
                )
        iu, wu = _bracket(self.units_grid, u)
        im, wm = _bracket(self.mlp_grid, m)
        v = self.values
        low = v[iu, im] * (1 - wm) + v[iu, im + 1] * wm
        high = v[iu + 1, im] * (1 - wm) + v[iu + 1, im + 1] * wm
        return low * (1 - wu) + high * wu


def _bracket(grid: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index i and weight w with x = grid[i] * (1 - w) + grid[i + 1] * w (grid has >= 2 points)."""
    i = np.clip(np.searchsorted(grid, x, side="right") - 1, 0, len(grid) - 2)
    w = (x - grid[i]) / (grid[i + 1] - grid[i])
    return i, w
