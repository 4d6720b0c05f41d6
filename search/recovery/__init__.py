"""Recovery after pruning: the pruned model is brought back towards its dense teacher.

    recovery = Distill(steps=300)                  # or Reconstruct(), NoRecovery()
    report = recovery.recover(pruned, dense, task.recovery_data(samples=2048))
    report.recipe(), report.seconds, report.held_out_before, report.held_out_after

`reconstruct` is retraining-free (seconds: per-unit scales and bias compensation by least squares);
`distill` trains the pruned model against the dense one (minutes). Both leave the teacher untouched.
"""

from collections.abc import Mapping
from typing import Any

from hwprune.errors import PlanError
from hwprune.search.recovery._base import RECOVERY, NoRecovery, Recovery, RecoveryData, RecoveryReport
from hwprune.search.recovery._distill import Distill, check_int8_grid
from hwprune.search.recovery._reconstruct import Reconstruct


def from_recipe(recipe: Mapping[str, Any]) -> Recovery:
    """The recovery a plan's recorded recipe describes (`RecoveryReport.recipe()`).

    Raises:
        ValueError: An unknown method, naming the valid ones.
    """
    name = recipe.get("method")
    if name not in RECOVERY:
        raise PlanError(f"unknown recovery method {name!r} in the recipe; valid methods: {RECOVERY.names()}")
    settings = {k: v for k, v in recipe.items() if k not in ("method", "data_samples", "data_seed")}
    return RECOVERY[str(name)](**settings)


__all__ = [
    "RECOVERY",
    "Distill",
    "NoRecovery",
    "Reconstruct",
    "Recovery",
    "RecoveryData",
    "RecoveryReport",
    "check_int8_grid",
    "from_recipe",
]
