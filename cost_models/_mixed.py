"""Latency of blocks whose attention and MLP each run at a precision of their own.

A device's cost models come one per precision (each from that dtype's tables, else calibrated, else
the datasheet roofline at that dtype's peak). A block whose attention runs at precision `a` and the
rest of it (MLP, norms, residual additions) at precision `m` costs

    T_m(0, mlp) + [T_a(units, mlp) - T_a(0, mlp)]

the block at `m` without attention, plus what attention adds to the block at `a`. Where `a == m`
this is the block's own latency at that precision, exactly (a table stays a lookup); where they
differ it assumes the attention's share of a block does not depend on the precision of the rest,
which holds for a roofline whose terms add, and the prediction is a model fitted to the tables, no
lookup: labelled "calibrated" at best. (`prunable.set_precisions` runs such a layer at m with the
attention's projections at a, so its attention core, softmax and the products around it, runs at
m: `hwprune-apply` measures what that costs.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
from numpy.typing import ArrayLike

from hwprune.cost_models._base import SOURCES, CostModel, Prediction

# The least faithful source among the precisions' models labels a mixed prediction: a label promises
# at least what it names.
_FAITHFUL = {source: rank for rank, source in enumerate(SOURCES)}


class MixedPrecisionModel(CostModel):
    """Per-layer widths and per-block precisions -> whole-model latency.

    Without precisions it answers as the reference precision's model does, so it stands wherever a
    cost model does. The model outside the blocks (embeddings, task head) runs at the reference
    precision.

    Args:
        models: One cost model per precision, of the same device, block shape and workload shape
            (each at its own dtype).
        reference: The precision of the model the user starts from (the workload's resolved dtype).
    """

    def __init__(self, models: Mapping[str, CostModel], *, reference: str) -> None:
        if reference not in models:
            raise ValueError(f"reference precision {reference!r} has no cost model; given: {sorted(models)}")
        ref = models[reference]
        for name, model in models.items():
            if model.workload.dtype != name:
                raise ValueError(f"the {name} cost model predicts {model.workload.dtype!r}")
            if (model.spec, model.hardware, _shape(model)) != (ref.spec, ref.hardware, _shape(ref)):
                raise ValueError(
                    f"the {name} cost model is for {model.hardware} {model.workload.describe()}, not "
                    f"{ref.hardware} {ref.workload.describe()} like the {reference} one"
                )
        self.models = dict(models)
        self.precisions = tuple(models)
        self.reference = reference
        self.spec, self.hardware, self.workload = ref.spec, ref.hardware, ref.workload
        self.base_ms = ref.base_ms
        self.source = max((m.source for m in models.values()), key=_FAITHFUL.__getitem__)

    @property
    def sources(self) -> dict[str, str]:
        """Each precision's own source, for the report."""
        return {name: model.source for name, model in self.models.items()}

    def index(self, precision: str) -> int:
        """Position of `precision` among `precisions` (what the precision arrays hold)."""
        if precision not in self.precisions:
            raise ValueError(
                f"precision {precision!r} is not priced here; valid choices: {list(self.precisions)}"
            )
        return self.precisions.index(precision)

    def block_latency_ms(
        self,
        units: np.ndarray,
        mlp: np.ndarray,
        experts: np.ndarray | None = None,
        expert_width: np.ndarray | None = None,
    ) -> np.ndarray:
        """Latency of one block at the reference precision."""
        return self.models[self.reference].block_latency_ms(units, mlp, experts, expert_width)

    def mixed_block_latency_ms(
        self,
        units: np.ndarray,
        mlp: np.ndarray,
        experts: np.ndarray | None,
        expert_width: np.ndarray | None,
        attention_precision: np.ndarray,
        mlp_precision: np.ndarray,
    ) -> np.ndarray:
        """Latency of blocks whose attention runs at `attention_precision` and the rest at
        `mlp_precision` (indices into `precisions`, broadcast with the widths)."""
        shape = np.broadcast_shapes(
            np.shape(units), np.shape(mlp), np.shape(attention_precision), np.shape(mlp_precision)
        )
        units, mlp = np.broadcast_to(units, shape), np.broadcast_to(mlp, shape)
        e = None if experts is None else np.broadcast_to(experts, shape)
        w = None if expert_width is None else np.broadcast_to(expert_width, shape)
        no_attention = np.zeros(shape, dtype=np.int64)
        whole = np.stack([m.block_latency_ms(units, mlp, e, w) for m in self.models.values()])  # (P, ...)
        rest = np.stack([m.block_latency_ms(no_attention, mlp, e, w) for m in self.models.values()])
        attention = whole - rest  # (P, ...) what attention adds to the block at each precision
        a = np.broadcast_to(np.asarray(attention_precision), shape)[None]  # (1, ...)
        m = np.broadcast_to(np.asarray(mlp_precision), shape)[None]
        return (np.take_along_axis(attention, a, 0) + np.take_along_axis(rest, m, 0))[0]

    def predict_mixed(
        self,
        units: ArrayLike,
        mlp: ArrayLike,
        *,
        attention_precision: ArrayLike,
        mlp_precision: ArrayLike,
        dropped: ArrayLike | None = None,
        experts: ArrayLike | None = None,
        expert_width: ArrayLike | None = None,
    ) -> Prediction:
        """`predict` with each layer's attention and MLP at a precision of its own.

        Args:
            attention_precision: (..., num_layers) index into `precisions` of each layer's attention.
            mlp_precision: (..., num_layers) the same for the rest of each block.
        """
        u, m, e, w = self.checked_widths(units, mlp, experts, expert_width)
        picks = [np.asarray(attention_precision), np.asarray(mlp_precision)]
        for name, p in zip(("attention_precision", "mlp_precision"), picks, strict=True):
            if p.size and (p.min() < 0 or p.max() >= len(self.precisions) or p.dtype.kind not in "iu"):
                raise ValueError(
                    f"{name} must index the precisions {list(self.precisions)} (0..{len(self.precisions) - 1}), "
                    f"got {p.tolist()}"
                )
        prediction = self.total(self.mixed_block_latency_ms(u, m, e, w, *picks), dropped)
        if (
            prediction.source == "table"
            and (np.broadcast_to(picks[0], u.shape) != np.broadcast_to(picks[1], u.shape)).any()
        ):
            return replace(prediction, source="calibrated")  # composed from tables, looked up in none
        return prediction


def _shape(model: CostModel) -> tuple[int, int, str, int]:
    """A model's workload but its dtype: what the precisions' models share."""
    wl = model.workload
    return (wl.batch_size, wl.seq_len, wl.phase, wl.kv_len)
