"""The search space: per layer, how many of each kind of unit a configuration keeps.

A configuration is, per layer, how many attention units (KV groups) and MLP neurons to keep and, in
a mixture-of-experts layer, how many routed experts and how many neurons each of them keeps; which
ones follows from saliency (the proxy keeps the top units). Widths move in steps aligned to the
target's tiles, since latency only changes at tile boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from hwprune import prunable
from hwprune.cost_models import width_grid
from hwprune.errors import ConfigError, UnsupportedModelError


class Widths(NamedTuple):
    """Kept widths per layer (arrays (..., layers)); the expert axes are None for dense models."""

    units: np.ndarray
    mlp: np.ndarray
    experts: np.ndarray | None = None
    expert_width: np.ndarray | None = None


@dataclass(frozen=True)
class SearchSpace:
    """Per-layer choices of kept attention units and kept MLP neurons.

    Attributes:
        structure: The dense model's structure.
        unit_choices: Kept attention units a layer may have, ascending (the dense count last).
        mlp_choices: Kept MLP neurons a layer may have, ascending (the dense width last).
        expert_choices: Kept routed experts a mixture-of-experts layer may have (top_k to all);
            empty for dense models.
        expert_width_choices: Kept neurons per routed expert (multiples of 8, the dense width last).
    """

    structure: prunable.Structure
    unit_choices: tuple[int, ...]
    mlp_choices: tuple[int, ...]
    expert_choices: tuple[int, ...] = ()
    expert_width_choices: tuple[int, ...] = ()

    @classmethod
    def build(
        cls,
        structure: prunable.Structure,
        *,
        mlp_step: int,
        unit_step: int = 1,
        min_units: int = 0,
        min_mlp: int = 0,
        expert_width_step: int | None = None,
        expert_axes: bool = True,
    ) -> SearchSpace:
        """The space of a dense, uniform structure.

        Args:
            expert_width_step: Step of the expert widths (rounded up to a multiple of 8); default
                `mlp_step`.
            expert_axes: Whether routed experts' count and width are searched (else every expert
                stays whole: one choice each).
        """
        layer = structure.layers[0]
        if any(la != layer for la in structure.layers):
            raise UnsupportedModelError(f"search needs the dense, uniform model; got {structure.describe()}")
        for name, value in (("mlp_step", mlp_step), ("unit_step", unit_step)):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        units = width_grid(layer.attention_units, unit_step, start=min_units)
        mlp = width_grid(layer.mlp_width, mlp_step, start=min_mlp)
        if not layer.is_moe:
            return cls(structure, units, mlp)
        if not expert_axes:
            return cls(structure, units, mlp, (layer.num_experts,), (layer.expert_width,))
        step = -(-(expert_width_step or mlp_step) // prunable.EXPERT_WIDTH_STEP) * prunable.EXPERT_WIDTH_STEP
        widths = width_grid(layer.expert_width, step, start=step)
        experts = tuple(range(layer.top_k, layer.num_experts + 1))
        return cls(structure, units, mlp, experts, widths)

    @property
    def moe(self) -> bool:
        """Whether the layers have routed experts (two more axes per layer)."""
        return bool(self.expert_choices)

    @property
    def num_layers(self) -> int:
        return self.structure.num_layers

    def widths(
        self,
        unit_idx: np.ndarray,
        mlp_idx: np.ndarray,
        expert_idx: np.ndarray | None = None,
        expert_width_idx: np.ndarray | None = None,
    ) -> Widths:
        """Choice indices (..., layers) to widths (..., layers)."""
        experts = widths = None
        if self.moe:
            assert expert_idx is not None and expert_width_idx is not None
            experts = np.asarray(self.expert_choices)[expert_idx]
            widths = np.asarray(self.expert_width_choices)[expert_width_idx]
        return Widths(
            np.asarray(self.unit_choices)[unit_idx], np.asarray(self.mlp_choices)[mlp_idx], experts, widths
        )

    def dense(self) -> Widths:
        n = self.num_layers
        if not self.moe:
            return Widths(np.full(n, self.unit_choices[-1]), np.full(n, self.mlp_choices[-1]))
        return Widths(
            np.full(n, self.unit_choices[-1]),
            np.full(n, self.mlp_choices[-1]),
            np.full(n, self.expert_choices[-1]),
            np.full(n, self.expert_width_choices[-1]),
        )

    def uniform(self, fraction: float) -> Widths:
        """Every layer keeps about `fraction` of its units and neurons (nearest choice); routed
        experts all stay, each keeping about `fraction` of its neurons."""

        def nearest(choices: tuple[int, ...]) -> int:
            c = np.asarray(choices)
            return int(c[np.abs(c - fraction * c[-1]).argmin()])

        n = self.num_layers
        units, mlp = np.full(n, nearest(self.unit_choices)), np.full(n, nearest(self.mlp_choices))
        if not self.moe:
            return Widths(units, mlp)
        return Widths(
            units, mlp, np.full(n, self.expert_choices[-1]), np.full(n, nearest(self.expert_width_choices))
        )


def plan_widths(plan: prunable.PrunePlan, structure: prunable.Structure) -> tuple[Widths, np.ndarray]:
    """What a plan keeps, as widths per layer, and which layers it drops ((layers,) bool).

    The inverse of `SaliencyProxy.plan` up to which units are kept: what a cost model needs to
    price the plan as it is (edited by hand or not). A dropped layer's expert axes read as dense
    (it costs nothing either way).
    """
    kept = plan.kept_units(structure)
    units = np.array([len(u) for u, _ in kept])
    mlp = np.array([len(m) for _, m in kept])
    dropped = np.array([lp.drop for lp in plan.layers], dtype=bool)
    if not any(la.is_moe for la in structure.layers):
        return Widths(units, mlp), dropped
    pairs = list(zip(plan.layers, structure.layers, strict=True))
    # None in a plan keeps every expert / every neuron of an expert.
    experts = np.array(
        [la.num_experts if lp.drop or lp.experts is None else len(lp.experts) for lp, la in pairs]
    )
    width = np.array(
        [la.expert_width if lp.drop or lp.expert_mlp is None else len(lp.expert_mlp[0]) for lp, la in pairs]
    )
    return Widths(units, mlp, experts, width), dropped
