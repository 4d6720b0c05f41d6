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

from hwprune.cost_models._base import CostModel
from hwprune.cost_models._spec import BlockSpec, Workload
from hwprune.errors import ConfigError, DataError, PlanError

COLUMNS = ["units", "heads", "mlp", "latency_ms", "p10_ms", "p90_ms", "repeats"]


@dataclass
class LatencyTable:
    """Measured block latencies and their provenance.

    Attributes:
        frame: One row per grid point, columns COLUMNS.
        spec: Block shape that was timed.
        workload: Workload it was timed under.
        hardware: Hardware profile name.
        base_ms: Measured latency of the model outside its blocks (embeddings, head), or 0.
        meta: Backend, device, driver, clocks, library versions, date, command.
    """

    frame: pd.DataFrame
    spec: BlockSpec
    workload: Workload
    hardware: str
    base_ms: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write `path` (CSV) and `path` with suffix .json (metadata)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.frame[COLUMNS].to_csv(path, index=False, float_format="%.6g")
        sidecar = {
            "hardware": self.hardware,
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
            raise DataError(f"latency table {path} lacks columns {missing}; expected {COLUMNS}")
        side = json.loads(sidecar_path.read_text())
        return cls(
            frame=frame,
            spec=BlockSpec(**side["spec"]),
            workload=Workload(**side["workload"]),
            hardware=side["hardware"]
            if "hardware" in side
            else side["profile"],  # "profile" before 2026-11-26
            base_ms=float(side.get("base_ms", 0.0)),
            meta=side.get("meta", {}),
        )


TABLE_FITS = ("additive", "grid")


class TableModel(CostModel):
    """Bilinear interpolation in a profiled grid; a width outside the grid raises, never extrapolates.

    A block runs its attention sub-layer and then its MLP sub-layer, so its latency is close to
    attention(units) + mlp(width) with no interaction term. The default `fit="additive"` fits that
    sum to the whole grid by least squares (in relative error), which averages each grid point's
    timing noise over a full row and column of measurements while keeping every step of the
    staircase in each width; `fit="grid"` interpolates the raw measurements (for backends that fuse
    the two sub-layers). `fit_error` is the relative RMS gap between the fit and the measurements:
    near the timing noise when the block is additive.

    Args:
        table: The profiled table; its grid must be complete (every units value with every mlp value).
        workload: The workload queries are for; must equal the table's, since latency depends on it.
        fit: "additive" or "grid".
    """

    source = "table"

    def __init__(
        self, *, table: LatencyTable, workload: Workload | None = None, fit: str = "additive"
    ) -> None:
        if fit not in TABLE_FITS:
            raise ConfigError(f"unknown table fit {fit!r}; valid choices: {list(TABLE_FITS)}")
        if workload is not None and workload != table.workload:
            raise ConfigError(
                f"table for {table.hardware} was profiled at {table.workload.describe()}, not "
                f"{workload.describe()}; profile that workload or use the analytical model"
            )
        self.table, self.fit = table, fit
        self.hardware = table.hardware
        self.spec = table.spec
        self.workload = table.workload
        grid = table.frame.pivot_table(index="units", columns="mlp", values="latency_ms", aggfunc="median")
        if grid.isna().any().any():
            raise DataError(f"latency table for {table.hardware} has an incomplete (units x mlp) grid")
        if min(grid.shape) < 2:
            raise DataError(
                f"latency table for {table.hardware} needs >= 2 grid points per axis, got {grid.shape}"
            )
        self.units_grid = grid.index.to_numpy(dtype=np.float64)
        self.mlp_grid = grid.columns.to_numpy(dtype=np.float64)
        measured = grid.to_numpy(dtype=np.float64)  # (n_units, n_mlp)
        self.values = _additive_fit(measured) if fit == "additive" else measured
        self.fit_error = float(np.sqrt(np.mean(((self.values - measured) / measured) ** 2)))
        self.base_ms = self._base_ms()

    def _base_ms(self) -> float:
        """The time outside the blocks, consistent with this fit.

        Where the model was timed beside the grid with every block emptied (`empty_model_ms`), the
        base is that minus one fitted empty block per layer: a difference of small numbers. Tables
        with only the dense model (`dense_model_ms`) subtract fitted dense blocks instead, where a
        few percent of timing noise in the blocks is as large as the whole base.
        """
        meta, layers = self.table.meta, self.spec.num_layers
        for key, units, mlp in (("empty_model_ms", 0, 0), ("dense_model_ms", self.spec.units, self.spec.mlp)):
            if key in meta and units in self.units_grid and mlp in self.mlp_grid:
                block = float(self.block_latency_ms(np.array(units), np.array(mlp)))
                return max(float(meta[key]) - layers * block, 0.0)
        return self.table.base_ms

    def block_latency_ms(
        self,
        units: np.ndarray,
        mlp: np.ndarray,
        experts: np.ndarray | None = None,
        expert_width: np.ndarray | None = None,
    ) -> np.ndarray:
        # Tables are profiled for dense blocks: a mixture-of-experts spec never matches one.
        u, m = np.broadcast_arrays(np.asarray(units, dtype=np.float64), np.asarray(mlp, dtype=np.float64))
        for name, values, grid in (("units", u, self.units_grid), ("mlp", m, self.mlp_grid)):
            if values.size and (values.min() < grid[0] or values.max() > grid[-1]):
                raise PlanError(
                    f"{name} width {values.min() if values.min() < grid[0] else values.max():g} is outside the "
                    f"profiled range [{grid[0]:g}, {grid[-1]:g}] of the {self.hardware} table; not extrapolating"
                )
        iu, wu = _bracket(self.units_grid, u)
        im, wm = _bracket(self.mlp_grid, m)
        v = self.values
        low = v[iu, im] * (1 - wm) + v[iu, im + 1] * wm
        high = v[iu + 1, im] * (1 - wm) + v[iu + 1, im + 1] * wm
        return low * (1 - wu) + high * wu


def _additive_fit(measured: np.ndarray) -> np.ndarray:
    """Least-squares a[i] + b[j] to an (n_units, n_mlp) grid, weighting each point by 1/latency.

    Weighting by the inverse latency minimises relative error, so the small latencies of heavily
    pruned blocks are fitted as closely as the large ones.
    """
    nu, nm = measured.shape
    rows = np.arange(nu * nm)
    design = np.zeros((nu * nm, nu + nm))  # (points, row effects + column effects)
    design[rows, rows // nm] = 1.0
    design[rows, nu + rows % nm] = 1.0
    weight = 1.0 / np.maximum(measured.ravel(), 1e-12)
    coef = np.linalg.lstsq(design * weight[:, None], measured.ravel() * weight, rcond=None)[0]
    return (design @ coef).reshape(nu, nm)


def _bracket(grid: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index i and weight w with x = grid[i] * (1 - w) + grid[i + 1] * w (grid has >= 2 points)."""
    i = np.clip(np.searchsorted(grid, x, side="right") - 1, 0, len(grid) - 2)
    w = (x - grid[i]) / (grid[i + 1] - grid[i])
    return i, w
