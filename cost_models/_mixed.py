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

import logging
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
from numpy.typing import ArrayLike

from hwprune.cost_models._base import SOURCES, CostModel, Prediction
from hwprune.cost_models._table import TableModel
from hwprune.errors import ConfigError

log = logging.getLogger(__name__)

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
        session_scales: Per precision, a factor on its block latencies that puts them on the
            reference model's time base (tables profiled in other sessions of a machine whose speed
            drifts between them: see `session_scales`); 1 where not given.
        edge_ms: Per precision, what a block at it costs beyond its table's latency when it runs
            between layers at the reference precision (the casts at its edges: see `edge_costs`),
            added to each layer whose block runs at it; 0 where not given.
    """

    def __init__(
        self,
        models: Mapping[str, CostModel],
        *,
        reference: str,
        session_scales: Mapping[str, float] | None = None,
        edge_ms: Mapping[str, float] | None = None,
    ) -> None:
        if reference not in models:
            raise ConfigError(f"reference precision {reference!r} has no cost model; given: {sorted(models)}")
        ref = models[reference]
        for name, model in models.items():
            if model.workload.dtype != name:
                raise ConfigError(f"the {name} cost model predicts {model.workload.dtype!r}")
            if (model.spec, model.hardware, _shape(model)) != (ref.spec, ref.hardware, _shape(ref)):
                raise ConfigError(
                    f"the {name} cost model is for {model.hardware} {model.workload.describe()}, not "
                    f"{ref.hardware} {ref.workload.describe()} like the {reference} one"
                )
        self.models = dict(models)
        self.precisions = tuple(models)
        self.session_scales = {name: float((session_scales or {}).get(name, 1.0)) for name in models}
        if not all(v > 0 for v in self.session_scales.values()):
            raise ConfigError(f"session scales must be positive, got {self.session_scales}")
        self.edge_ms = {name: float((edge_ms or {}).get(name, 0.0)) for name in models}
        if self.edge_ms[reference] != 0 or min(self.edge_ms.values()) < 0:
            raise ConfigError(f"edge costs must be >= 0 and 0 at the reference precision, got {self.edge_ms}")
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
            raise ConfigError(
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
        scale = np.array(list(self.session_scales.values())).reshape(-1, *([1] * len(shape)))  # (P, 1...)
        whole = scale * np.stack(
            [m.block_latency_ms(units, mlp, e, w) for m in self.models.values()]
        )  # (P, ...)
        rest = scale * np.stack([m.block_latency_ms(no_attention, mlp, e, w) for m in self.models.values()])
        attention = whole - rest  # (P, ...) what attention adds to the block at each precision
        a = np.broadcast_to(np.asarray(attention_precision), shape)[None]  # (1, ...)
        m = np.broadcast_to(np.asarray(mlp_precision), shape)[None]
        edges = np.array(list(self.edge_ms.values()))[m[0]]  # (...) a block away from the stream's precision
        return (np.take_along_axis(attention, a, 0) + np.take_along_axis(rest, m, 0))[0] + edges

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
                raise ConfigError(
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


def session_scales(models: Mapping[str, CostModel], reference: str) -> dict[str, float]:
    """Per precision, the factor that puts its table's latencies on the reference table's time base.

    Two tables profiled in different sessions differ by how fast the machine was then (this
    project's 2-core CPUs drift 10-15 % between days), and a mixed prediction divides one by the
    other. A table profiled at a non-reference dtype times the dense model at the reference dtype
    beside its grid too (`dense_model_<reference>_ms`); the reference table timed it as
    `dense_model_ms`: their ratio is the drift. Where either is missing (a calibrated model, an
    older table) the factor is 1 and a warning says the ratio carries the drift.
    """
    ref = models[reference]
    ref_dense = ref.table.meta.get("dense_model_ms") if isinstance(ref, TableModel) else None
    scales = {}
    for name, model in models.items():
        if name == reference or not isinstance(model, TableModel) or not isinstance(ref, TableModel):
            continue
        same_time = model.table.meta.get(f"dense_model_{reference}_ms")
        if ref_dense and same_time:
            scales[name] = float(ref_dense) / float(same_time)
            log.info(
                "%s table put on the %s table's time base: x%.3f (dense %s model %.2f ms then, %.2f ms beside "
                "the %s grid)",
                name,
                reference,
                scales[name],
                reference,
                float(ref_dense),
                float(same_time),
                name,
            )
        elif model.table.meta.get("date") != ref.table.meta.get("date"):
            log.warning(
                "the %s and %s tables were profiled in different sessions (%s, %s) without a common "
                "reference: mixed-precision speedups carry the machine's drift between them; re-profile "
                "the %s table with this hwprune-profile to record one",
                name,
                reference,
                model.table.meta.get("date"),
                ref.table.meta.get("date"),
                name,
            )
    return scales


def edge_costs(
    models: Mapping[str, CostModel], reference: str, scales: Mapping[str, float]
) -> dict[str, float]:
    """Per precision, the cost per layer of running a block at it between layers at `reference`.

    A table times whole blocks at its dtype; a plan runs such a block between casts from and back
    to the reference dtype's stream (`prunable.set_precisions`). A table profiled at a non-reference
    dtype also times the dense model so deployed (`dense_model_blocks_ms`, every block at the table's
    dtype, embeddings and stream at the reference dtype) beside the model at its dtype
    (`dense_model_ms`): their difference, less the outside's own difference between the two dtypes
    (the tables' `base_ms`), spread over the layers, on the reference table's time base (`scales`).
    Tables without that reference give none (0), which under-prices such blocks.
    """
    ref = models[reference]
    edges = {}
    for name, model in models.items():
        if name == reference or not isinstance(model, TableModel) or not isinstance(ref, TableModel):
            continue
        meta, scale = model.table.meta, scales.get(name, 1.0)
        if "dense_model_blocks_ms" not in meta or "dense_model_ms" not in meta:
            continue
        outside = ref.base_ms / scale - model.base_ms  # the reference dtype's outside, in this session
        extra = float(meta["dense_model_blocks_ms"]) - float(meta["dense_model_ms"]) - outside
        edges[name] = max(extra, 0.0) / model.spec.num_layers * scale
        log.info(
            "a %s block between %s layers costs %.3f ms more per layer (its edges)",
            name,
            reference,
            edges[name],
        )
    return edges


def _shape(model: CostModel) -> tuple[int, int, str, int]:
    """A model's workload but its dtype: what the precisions' models share."""
    wl = model.workload
    return (wl.batch_size, wl.seq_len, wl.phase, wl.kv_len)
