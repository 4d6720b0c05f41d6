"""The cost-model interface: whole-model latency of per-layer widths, vectorised, with its source."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from hwprune.cost_models._spec import BlockSpec, Workload
from hwprune.errors import PlanError

SOURCES = ("table", "calibrated", "analytical")


@dataclass(frozen=True)
class Prediction:
    """Predicted latency of one or many configurations.

    Attributes:
        latency_ms: (N,) whole-model latency, or a 0-d array for one configuration.
        source: "table" (profiled lookup), "calibrated" (analytical fitted to a table) or
            "analytical" (datasheet roofline).
        hardware: Name of the hardware profile the prediction is for.
        workload: The workload it is for (dtype resolved): a label is only worth as much as what it
            labels, so every prediction says which workload its number answers.
    """

    latency_ms: np.ndarray
    source: str
    hardware: str
    workload: Workload

    def __float__(self) -> float:
        return float(self.latency_ms)


class CostModel(ABC):
    """Latency of a stack of blocks whose attention units and MLP widths vary per layer.

    Subclasses implement `block_latency_ms`; `predict` sums it over layers and adds the fixed
    cost outside the blocks (embeddings, task head).
    """

    source: str
    hardware: str  # the hardware profile's name
    spec: BlockSpec
    workload: Workload
    base_ms: float = 0.0

    @abstractmethod
    def block_latency_ms(
        self,
        units: np.ndarray,
        mlp: np.ndarray,
        experts: np.ndarray | None = None,
        expert_width: np.ndarray | None = None,
    ) -> np.ndarray:
        """Latency of one block keeping `units` attention units and `mlp` neurons (broadcast), and
        in a mixture-of-experts block `experts` routed experts of `expert_width` neurons (None: all)."""

    def predict(
        self,
        units: ArrayLike,
        mlp: ArrayLike,
        *,
        dropped: ArrayLike | None = None,
        experts: ArrayLike | None = None,
        expert_width: ArrayLike | None = None,
    ) -> Prediction:
        """Whole-model latency of configurations given as per-layer widths.

        Args:
            units: (..., num_layers) attention units (KV groups) kept per layer.
            mlp: (..., num_layers) MLP neurons kept per layer (a mixture's shared expert's).
            dropped: (..., num_layers) whether each layer is removed from the model (depth
                pruning): it then costs nothing, where a layer keeping no units still pays its
                norms and residual additions. None keeps every layer.
            experts: (..., num_layers) routed experts kept per layer, in [top_k, experts]; None
                keeps them all (mixture-of-experts blocks only).
            expert_width: (..., num_layers) neurons kept per routed expert; None keeps them all.
        """
        u, m, e, w = self.checked_widths(units, mlp, experts, expert_width)
        return self.total(self.block_latency_ms(u, m, e, w), dropped)

    def checked_widths(
        self,
        units: ArrayLike,
        mlp: ArrayLike,
        experts: ArrayLike | None = None,
        expert_width: ArrayLike | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """The widths of `predict` as arrays of one shape, each checked against the dense block."""
        u, m = np.asarray(units), np.asarray(mlp)
        if u.shape != m.shape or u.ndim < 1 or u.shape[-1] != self.spec.num_layers:
            raise PlanError(
                f"need matching (..., {self.spec.num_layers}) widths, got units {u.shape} and mlp {m.shape}"
            )
        e = None if experts is None else np.broadcast_to(np.asarray(experts), u.shape)
        w = None if expert_width is None else np.broadcast_to(np.asarray(expert_width), u.shape)
        s = self.spec
        if (e is not None or w is not None) and not s.experts:
            raise PlanError("experts and expert_width apply to mixture-of-experts blocks; this spec has none")
        checks = [("units", u, 0, s.units), ("mlp", m, 0, s.mlp), ("experts", e, s.top_k, s.experts)]
        for name, values, low, top in [*checks, ("expert_width", w, 1, s.expert_width)]:
            if values is not None and values.size and (values.min() < low or values.max() > top):
                raise PlanError(
                    f"{name} widths must lie in [{low}, {top}], got range [{values.min()}, {values.max()}]"
                )
        return u, m, e, w

    def total(self, blocks: np.ndarray, dropped: ArrayLike | None = None) -> Prediction:
        """(..., layers) block latencies -> the whole model's prediction (dropped layers cost nothing)."""
        if dropped is not None:
            d = np.asarray(dropped, dtype=bool)
            if d.shape[-1:] != blocks.shape[-1:]:
                raise PlanError(f"dropped must be (..., {self.spec.num_layers}), got {d.shape}")
            blocks = np.where(d, 0.0, blocks)
        latency = blocks.sum(-1) + self.base_ms
        return Prediction(
            latency_ms=latency, source=self.source, hardware=self.hardware, workload=self.workload
        )

    def dense_ms(self) -> float:
        """Latency of the unpruned model."""
        n = self.spec.num_layers
        return float(self.predict(np.full(n, self.spec.units), np.full(n, self.spec.mlp)).latency_ms)
