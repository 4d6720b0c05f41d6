"""Fit an analytical model's efficiency factors to a profiled table."""

from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import least_squares

from cost_models._analytical import AnalyticalModel, Efficiency
from cost_models._hardware import HardwareProfile
from cost_models._table import LatencyTable

log = logging.getLogger(__name__)


def calibrate(profile: HardwareProfile, table: LatencyTable) -> AnalyticalModel:
    """An analytical model whose compute/memory efficiencies and overhead scale best fit `table`.

    The fit minimises the squared log-ratio of predicted to measured block latency, so a few
    measurements of a device (even a handful of grid points) turn the datasheet roofline into a
    calibrated one. Predictions of the result are labelled "calibrated".
    """
    frame = table.frame
    units = frame["units"].to_numpy()
    mlp = frame["mlp"].to_numpy()
    measured = frame["latency_ms"].to_numpy()
    if len(measured) < 3:
        raise ValueError(f"calibration needs >= 3 measured points, the table has {len(measured)}")

    def model(x: np.ndarray) -> AnalyticalModel:
        eff = Efficiency(
            compute=float(np.exp(x[0])), memory=float(np.exp(x[1])), overhead=float(np.exp(x[2]))
        )
        return AnalyticalModel(profile=profile, spec=table.spec, workload=table.workload, efficiency=eff)

    def residuals(x: np.ndarray) -> np.ndarray:
        predicted = model(x).block_latency_ms(units, mlp)
        return np.log(np.maximum(predicted, 1e-9) / np.maximum(measured, 1e-9))

    start = np.log([0.7, 0.8, 1.0])
    bounds = (np.log([0.01, 0.01, 1e-3]), np.log([1.5, 1.5, 1e3]))
    fit = least_squares(residuals, start, bounds=bounds)
    result = model(fit.x)
    result.source = "calibrated"
    result.base_ms = table.base_ms
    log.info(
        "calibrated %s: compute %.3f, memory %.3f, overhead x%.2f (rms log error %.3f)",
        profile.name,
        *np.exp(fit.x),
        float(np.sqrt(np.mean(fit.fun**2))),
    )
    return result
