"""Fit the analytical roofline's efficiencies to a device's profiled tables, then predict any shape.

A table answers exactly one (block shape, workload); the calibrated model answers every other one on
the same device: the roofline's structure (tiles, waves, bytes, attention that grows with sequence
length) carries the shape and workload, the tables supply how far the device falls short of its
datasheet. Several tables of a device are fitted jointly, so the fit sees how efficiency changes
with the number of tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from scipy.optimize import least_squares

from hwprune.cost_models._analytical import AnalyticalModel, Efficiency
from hwprune.cost_models._hardware import HardwareProfile
from hwprune.cost_models._spec import BlockSpec, Workload
from hwprune.cost_models._table import LatencyTable, TableModel
from hwprune.errors import ConfigError

log = logging.getLogger(__name__)

# Log-space parameters: compute, attention and memory efficiency, overhead scale, half_rows.
_START = np.log([0.7, 0.7, 0.8, 1.0, 32.0])
_LOW = np.log([0.01, 0.01, 0.01, 1e-3, 1e-2])
_HIGH = np.log([1.5, 1.5, 1.5, 1e3, 1e5])
# A weak pull towards the start keeps parameters that a grid barely constrains at sensible values.
_PRIOR_WEIGHT = 0.002


class CalibratedModel(AnalyticalModel):
    """The roofline with efficiencies fitted to profiled tables; predictions labelled "calibrated".

    Attributes:
        fitted_on: What each fitted table measured (shape and workload).
        fit_error: Relative RMS gap between the fitted roofline and each table it was fitted to,
            in `fitted_on` order, at the table's own shape and workload.
    """

    def __init__(
        self,
        *,
        profile: HardwareProfile,
        spec: BlockSpec,
        workload: Workload,
        efficiency: Efficiency,
        fitted_on: tuple[str, ...],
        fit_error: tuple[float, ...],
    ) -> None:
        super().__init__(
            profile=profile, spec=spec, workload=workload, efficiency=efficiency, source="calibrated"
        )
        self.fitted_on, self.fit_error = fitted_on, fit_error


def calibrate(
    profile: HardwareProfile,
    tables: Sequence[LatencyTable],
    *,
    spec: BlockSpec,
    workload: Workload,
) -> CalibratedModel:
    """The roofline of `profile` fitted to `tables`, predicting `spec` at `workload`.

    The fit minimises the squared log-ratio of predicted to measured block latency over every
    table's grid (each table weighted equally; for `table_fit: additive` the noise-averaged fit of
    the grid is the target). `half_rows` is fitted only when the tables span more than one token
    count, since one token count cannot tell it from the compute efficiency. The time outside the
    blocks is the roofline's estimate, scaled to the measured base of the tables of this same model
    (`spec`) where there are any; another model's base is no guide to it.

    Args:
        profile: The device the tables were measured on.
        tables: Its profiled tables (any shapes and workloads), at least one.
        spec: The block shape to predict.
        workload: The workload to predict; predictions report it.

    Raises:
        ValueError: No table, a table of another profile, or one with fewer than 3 grid points.
    """
    if not tables:
        raise ConfigError(f"calibrating {profile.name} needs at least one profiled table, got none")
    for table in tables:
        if table.hardware != profile.name:
            raise ConfigError(f"a table of {table.hardware!r} cannot calibrate {profile.name!r}")
        if len(table.frame) < 3:
            raise ConfigError(f"calibration needs >= 3 measured points per table, one has {len(table.frame)}")
    targets = [_targets(profile, t) for t in tables]
    fit_ramp = len({t.workload.tokens for t in tables}) > 1
    # The fewest rows of any fitted GEMM (attention's are seq_len, the projections' batch x seq_len):
    # the ramp is known only down to there.
    floor = float(min(min(t.workload.tokens, t.workload.seq_len) for t in tables))

    def efficiency(x: np.ndarray) -> Efficiency:
        e = np.exp(x)
        return Efficiency(
            compute=e[0],
            attention=e[1],
            memory=e[2],
            overhead=e[3],
            half_rows=e[4] if fit_ramp else 0.0,
            ramp_floor_rows=floor,
        )

    def log_errors(eff: Efficiency) -> list[np.ndarray]:
        errors = []
        for table, (units, mlp, measured) in zip(tables, targets, strict=True):
            model = AnalyticalModel(profile=profile, spec=table.spec, workload=table.workload, efficiency=eff)
            predicted = model.block_latency_ms(units, mlp)
            errors.append(np.log(np.maximum(predicted, 1e-12) / np.maximum(measured, 1e-12)))
        return errors

    def residuals(x: np.ndarray) -> np.ndarray:
        per_table = [e / np.sqrt(len(e)) for e in log_errors(efficiency(x))]  # each table counts once
        return np.concatenate([*per_table, _PRIOR_WEIGHT * (x - _START)])

    # A few starts (attention far below the projections, a slow or fast ramp in rows): the
    # efficiencies trade off against each other, and one start can stop in a worse optimum.
    fits = [
        least_squares(residuals, start, bounds=(_LOW, _HIGH))
        for start in (
            _START,
            _START + np.log([1.0, 0.3, 1.0, 1.0, 10.0]),
            _START + np.log([0.5, 0.3, 0.7, 3.0, 0.1]),
        )
    ]
    fit = min(fits, key=lambda f: float(f.cost))
    eff = efficiency(fit.x)
    errors = tuple(float(np.sqrt(np.mean(np.expm1(e) ** 2))) for e in log_errors(eff))
    # What runs outside the blocks is the model's own (embeddings, masks, pooler, head), so a scale
    # measured on one model says nothing of another's: only tables of this very model set it.
    own = [t for t in tables if t.spec == spec]
    eff = Efficiency(**{**eff.__dict__, "outside": _outside_scale(profile, own, eff)})

    model = CalibratedModel(
        profile=profile,
        spec=spec,
        workload=workload,
        efficiency=eff,
        fitted_on=tuple(f"{t.spec.num_layers}x{t.spec.hidden} {t.workload.describe()}" for t in tables),
        fit_error=errors,
    )
    log.info(
        "calibrated %s on %d table(s) (%s): compute %.3f, attention %.3f, memory %.3f, overhead x%.2f, "
        "half_rows %.0f, outside x%.2f; fit error %s",
        profile.name,
        len(tables),
        "; ".join(model.fitted_on),
        eff.compute,
        eff.attention,
        eff.memory,
        eff.overhead,
        eff.half_rows,
        eff.outside,
        ", ".join(f"{e:.1%}" for e in errors),
    )
    return model


def _targets(profile: HardwareProfile, table: LatencyTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grid widths and the latencies to fit: the table as its model reads it (noise-averaged)."""
    units = table.frame["units"].to_numpy()
    mlp = table.frame["mlp"].to_numpy()
    try:
        measured = TableModel(table=table, fit=profile.table_fit).block_latency_ms(units, mlp)
    except ValueError:  # an incomplete grid: fit the raw points
        measured = table.frame["latency_ms"].to_numpy()
    return units, mlp, measured


def _outside_scale(profile: HardwareProfile, tables: Sequence[LatencyTable], eff: Efficiency) -> float:
    """Geometric mean of measured / modelled time outside the blocks over the tables that measured it."""
    ratios = []
    for table in tables:
        try:
            measured = TableModel(table=table, fit=profile.table_fit).base_ms
        except ValueError:
            measured = table.base_ms
        modelled = AnalyticalModel(profile=profile, spec=table.spec, workload=table.workload, efficiency=eff)
        if measured > 0 and modelled.base_ms > 0:
            ratios.append(measured / modelled.base_ms)
    return float(np.clip(np.exp(np.mean(np.log(ratios))), 0.01, 100.0)) if ratios else 1.0
