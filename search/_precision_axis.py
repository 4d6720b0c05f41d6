"""Precision per block as a search axis, beside the widths.

Each layer's attention and the rest of its block (MLP, norms) choose a precision among those the
target runs and `prunable.set_precisions` can deploy in torch (fp32, bf16, fp16). Both objectives stay
additive over layers, so the exact front stays exact over width x precision:

- latency: `cost_models.MixedPrecisionModel` (one cost model per precision, mixed per block);
- proxy loss: the pruning saliency of the removed units plus, per block, the predicted loss
  increase of its precision over the reference precision (`hessian.precision_sensitivity`, Fisher
  estimate), scaled by the fraction of the block's units it keeps: a block's rounded weights and
  inputs are those of its kept units, and a block that keeps nothing rounds nothing.

int8 is not an axis choice yet: it is measured as a whole model (ONNX Runtime's QDQ model), which
cannot mix with torch precisions per block.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from hwprune import cost_models, hessian, prunable
from hwprune.errors import ConfigError
from hwprune.search._space import Widths

log = logging.getLogger("hwprune.search")

# What the axis can choose per block: the precisions a plan deploys in torch.
AXIS_PRECISIONS = tuple(prunable.PLAN_PRECISIONS)


class Precisions(NamedTuple):
    """Per layer, the precision of its attention and of the rest of its block (arrays (..., layers)
    of indices into the axis's precisions)."""

    attention: np.ndarray
    mlp: np.ndarray


def axis_precisions(
    requested: Sequence[str] | None, profile: cost_models.HardwareProfile, reference: str
) -> tuple[str, ...]:
    """The precisions the axis chooses among on `profile`, the reference first; one: the axis is off.

    Args:
        requested: `search.precisions` (None: every precision the target runs that torch deploys).
        reference: The workload's resolved dtype, the precision the dense model is priced at.

    Raises:
        ValueError: A requested precision the axis cannot choose or the target does not run, naming
            the valid ones.
    """
    runs = [p for p in profile.dtypes if p in AXIS_PRECISIONS]
    if requested is None:
        if reference not in AXIS_PRECISIONS:
            log.info(
                "precision axis off: %s's reference precision %s is measured as a whole model (set "
                "search.precisions to search %s per block)",
                profile.name,
                reference,
                runs,
            )
            return (reference,)
        return tuple(dict.fromkeys([reference, *runs]))
    check_requested(requested, profile)
    if len(requested) > 1 and reference not in AXIS_PRECISIONS:
        raise ConfigError(
            f"search.precisions={list(requested)} mixes blocks of a model priced at {reference} "
            f"({profile.name}'s workload dtype), which is measured as a whole model; valid: set "
            f"workload.dtype to one of {runs}, or search.precisions=[{reference}]"
        )
    return tuple(dict.fromkeys([reference, *requested])) if len(requested) > 1 else (reference,)


def check_requested(requested: Sequence[str], profile: cost_models.HardwareProfile) -> None:
    """Raise ValueError for a `search.precisions` entry the axis cannot choose on `profile`."""
    valid = [p for p in profile.dtypes if p in AXIS_PRECISIONS]
    for p in requested:
        if p not in valid:
            why = "does not run it" if p not in profile.dtypes else "measures it as a whole model only"
            raise ConfigError(
                f"search.precisions: {p!r} cannot be searched per block on {profile.name} ({why}); "
                f"valid choices: {valid}"
            )


@dataclass(frozen=True)
class PrecisionAxis:
    """The axis: its precisions, their latency and the proxy loss each block pays for them.

    Attributes:
        cost: The mixed-precision cost model (its `precisions`, the reference first, index the
            choices).
        attention_loss: (layers, precisions) predicted loss increase of a layer's whole attention
            at each precision, relative to the reference (negative where a precision is finer).
        mlp_loss: The same for the rest of each block.
        units: Attention units of a dense layer (the loss scales with the kept fraction).
        mlp_width: MLP neurons of a dense layer.
    """

    cost: cost_models.MixedPrecisionModel
    attention_loss: np.ndarray
    mlp_loss: np.ndarray
    units: int
    mlp_width: int

    @classmethod
    def build(
        cls,
        cost: cost_models.MixedPrecisionModel,
        sensitivity: hessian.PrecisionSensitivity,
        structure: prunable.Structure,
    ) -> PrecisionAxis:
        """The axis of `cost`'s precisions, priced by `sensitivity` (its estimates are against fp32;
        fp32 itself costs nothing)."""
        layer = structure.layers[0]
        if layer.is_moe:
            raise ConfigError(
                "the precision axis does not cover mixture-of-experts layers yet; valid: search.precisions=null"
            )

        def relative(block: str) -> np.ndarray:
            columns = [
                np.zeros(structure.num_layers) if p == "fp32" else sensitivity.of(block, p)
                for p in cost.precisions
            ]
            loss = np.stack(columns, axis=1)  # (layers, P)
            return loss - loss[:, :1]  # against the reference, which is first

        return cls(cost, relative("attention"), relative("mlp"), layer.attention_units, layer.mlp_width)

    @property
    def precisions(self) -> tuple[str, ...]:
        return self.cost.precisions

    def reference(self, num_layers: int) -> Precisions:
        """Every block at the reference precision."""
        zeros = np.zeros(num_layers, dtype=np.int64)
        return Precisions(zeros, zeros.copy())

    def uniform(self, precision: str, num_layers: int) -> Precisions:
        """Every block at `precision`."""
        k = np.full(num_layers, self.cost.index(precision), dtype=np.int64)
        return Precisions(k, k.copy())

    def block_loss(
        self, layer: int, units: np.ndarray, mlp: np.ndarray, attention: np.ndarray, rest: np.ndarray
    ) -> np.ndarray:
        """Proxy loss of layer `layer`'s precisions at (arrays of) kept widths."""
        att = self.attention_loss[layer][np.asarray(attention)] * np.asarray(units) / max(self.units, 1)
        return att + self.mlp_loss[layer][np.asarray(rest)] * np.asarray(mlp) / max(self.mlp_width, 1)

    def loss(self, widths: Widths, precisions: Precisions) -> np.ndarray:
        """(N, layers) widths and precisions -> (N,) proxy loss of the precisions."""
        units, mlp = np.atleast_2d(widths.units), np.atleast_2d(widths.mlp)
        att, rest = np.atleast_2d(precisions.attention), np.atleast_2d(precisions.mlp)
        per_layer = [
            self.block_loss(i, units[:, i], mlp[:, i], att[:, i], rest[:, i]) for i in range(units.shape[1])
        ]
        return np.sum(per_layer, axis=0)

    def latency(
        self, widths: Widths, precisions: Precisions, dropped: np.ndarray | None = None
    ) -> cost_models.Prediction:
        return self.cost.predict_mixed(
            widths.units,
            widths.mlp,
            attention_precision=precisions.attention,
            mlp_precision=precisions.mlp,
            dropped=dropped,
            experts=widths.experts,
            expert_width=widths.expert_width,
        )

    def canonical(self, widths: Widths, precisions: Precisions) -> Precisions:
        """`precisions` with the attention of a layer that keeps none at its block's precision: it
        computes nothing, so its precision changes neither objective, and a plan should not name one."""
        empty = np.asarray(widths.units) == 0
        return Precisions(np.where(empty, precisions.mlp, precisions.attention), precisions.mlp)

    def names(self, precisions: Precisions) -> tuple[list[str], list[str]]:
        """Per layer, the attention's and the rest's precision names."""
        p = self.precisions
        return [p[int(k)] for k in precisions.attention], [p[int(k)] for k in precisions.mlp]

    def from_names(self, attention: Sequence[str], mlp: Sequence[str]) -> Precisions:
        return Precisions(
            np.array([self.cost.index(a) for a in attention]), np.array([self.cost.index(m) for m in mlp])
        )
