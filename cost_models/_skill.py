"""How good a latency predictor is, said beside what predictors that know nothing get.

A share "within ±10 %" means little alone: where pruning barely changes latency (a dispatch-bound
GPU, a model whose blocks are a small part of its time), "pruning changes nothing" is within ±10 %
of most configurations too. So every accuracy figure comes with two reference predictors computed
on the same rows: the null predictor (every configuration as fast as the dense model: speedup 1)
and the FLOPs proxy (speedup = dense FLOPs / configuration FLOPs). A model has *skill* where its
error is below the null predictor's: skill = 1 - MAPE / MAPE of the null predictor (0: no better
than saying nothing changes; 1: perfect; negative: worse than that).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import kendalltau

from hwprune.cost_models._spec import BlockSpec, Workload

__all__ = ["FLOPS", "NULL", "Accuracy", "reference_speedups", "speedup_accuracy"]

NULL = "null (pruning changes nothing)"
FLOPS = "FLOPs proxy"


@dataclass(frozen=True)
class Accuracy:
    """A predictor's speedups against measured ones, over the same configurations.

    Attributes:
        mape: Mean |predicted / measured - 1| of the speedups, in %.
        within10: Share of configurations predicted within ±10 % of the measured speedup, in %.
        within5: The same within ±5 %.
        tau: Kendall's tau of predicted against measured speedups (NaN for a constant predictor,
            which ranks nothing).
        skill: 1 - mape / the null predictor's mape (NaN until compared, see `against`).
    """

    mape: float
    within10: float
    within5: float
    tau: float
    skill: float = float("nan")

    def against(self, null: Accuracy) -> Accuracy:
        """This accuracy with its skill over the null predictor's filled in."""
        skill = 1.0 - self.mape / null.mape if null.mape > 0 else float("nan")
        return Accuracy(self.mape, self.within10, self.within5, self.tau, skill)

    @property
    def beats_null(self) -> bool:
        return bool(self.skill > 0)


def speedup_accuracy(predicted: ArrayLike, measured: ArrayLike) -> Accuracy:
    """How close `predicted` speedups are to `measured` ones (same configurations, same order).

    Raises:
        ValueError: The arrays differ in length, are empty, or a speedup is not positive (an
            infinite predicted speedup, the FLOPs proxy's for a configuration without block FLOPs,
            counts as infinitely wrong).
    """
    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    if p.shape != m.shape or p.size == 0:
        raise ValueError(f"predicted {p.shape} and measured {m.shape} speedups: need equal, non-empty arrays")
    if not (np.all(p > 0) and np.all(m > 0) and np.isfinite(m).all()):
        raise ValueError("speedups must be positive (a latency of 0 or less is no measurement)")
    err = np.abs(p / m - 1.0)
    constant = bool(np.all(p == p[0]))
    return Accuracy(
        mape=float(err.mean() * 100),
        within10=float(np.mean(err <= 0.10 + 1e-12) * 100),
        within5=float(np.mean(err <= 0.05 + 1e-12) * 100),
        tau=float("nan") if constant else float(kendalltau(p, m).statistic),
    )


def reference_speedups(
    spec: BlockSpec, workload: Workload, units: ArrayLike, mlp: ArrayLike
) -> dict[str, np.ndarray]:
    """The speedups of the two predictors every accuracy figure is shown beside.

    Args:
        units: (configurations, layers) kept attention units.
        mlp: (configurations, layers) kept MLP widths.

    Returns:
        `NULL`: 1 for every configuration; `FLOPS`: the dense model's FLOPs over each configuration's.
    """
    u, w = np.atleast_2d(np.asarray(units)), np.atleast_2d(np.asarray(mlp))
    n = spec.num_layers
    dense = float(spec.flops(workload, np.full(n, spec.units), np.full(n, spec.mlp)))
    flops = np.asarray(spec.flops(workload, u, w), dtype=float)
    with np.errstate(divide="ignore"):  # a configuration keeping nothing has no block FLOPs: inf
        return {NULL: np.ones(len(u)), FLOPS: dense / flops}
