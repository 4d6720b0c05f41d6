"""The search space and the additive saliency proxy of a configuration.

A configuration is, per layer, how many attention units (KV groups) and MLP neurons to keep; which
ones follows from saliency (the layer's top units). MLP widths move in steps aligned to the target's
tiles, since latency only changes at tile boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hwprune import hessian, prunable


@dataclass(frozen=True)
class SearchSpace:
    """Per-layer choices of kept attention units and kept MLP neurons.

    Attributes:
        structure: The dense model's structure.
        unit_choices: Kept attention units a layer may have, ascending (the dense count last).
        mlp_choices: Kept MLP neurons a layer may have, ascending (the dense width last).
    """

    structure: prunable.Structure
    unit_choices: tuple[int, ...]
    mlp_choices: tuple[int, ...]

    @classmethod
    def build(
        cls,
        structure: prunable.Structure,
        *,
        mlp_step: int,
        unit_step: int = 1,
        min_units: int = 0,
        min_mlp: int = 0,
    ) -> SearchSpace:
        layer = structure.layers[0]
        if any(la != layer for la in structure.layers):
            raise ValueError(f"search needs the dense, uniform model; got {structure.describe()}")
        for name, value in (("mlp_step", mlp_step), ("unit_step", unit_step)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        units = sorted({*range(min_units, layer.attention_units + 1, unit_step), layer.attention_units})
        mlp = sorted({*range(min_mlp, layer.mlp_width + 1, mlp_step), layer.mlp_width})
        return cls(structure, tuple(units), tuple(mlp))

    @property
    def num_layers(self) -> int:
        return self.structure.num_layers

    def widths(self, unit_idx: np.ndarray, mlp_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Choice indices (..., layers) to widths (..., layers)."""
        return np.asarray(self.unit_choices)[unit_idx], np.asarray(self.mlp_choices)[mlp_idx]

    def dense(self) -> tuple[np.ndarray, np.ndarray]:
        n = self.num_layers
        return np.full(n, self.unit_choices[-1]), np.full(n, self.mlp_choices[-1])

    def uniform(self, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """Every layer keeps about `fraction` of its units and neurons (nearest choice)."""
        u = np.asarray(self.unit_choices)
        m = np.asarray(self.mlp_choices)
        ui = int(np.abs(u - fraction * u[-1]).argmin())
        mi = int(np.abs(m - fraction * m[-1]).argmin())
        n = self.num_layers
        return np.full(n, u[ui]), np.full(n, m[mi])


class SaliencyProxy:
    """Predicted loss increase of a configuration: the summed saliency of the units it removes.

    Keeping the top-k units of a layer removes its n - k least salient ones, so the proxy is a
    lookup in per-layer prefix sums of ascending scores: vectorised and exact for the additive model.
    With layer scores (depth pruning), a layer left without units is dropped, and costs its layer
    score instead of the sum of its units'.

    Args:
        scores: One saliency per unit of `structure`.
        structure: The dense model's structure.
        layer_scores: (layers,) loss of dropping each layer (`hessian.layer_scores`), or None to
            keep every layer (an empty layer then stays as a block).
    """

    def __init__(
        self,
        scores: hessian.UnitScores,
        structure: prunable.Structure,
        layer_scores: torch.Tensor | None = None,
    ) -> None:
        scores.check(structure)
        if layer_scores is not None and tuple(layer_scores.shape) != (structure.num_layers,):
            raise ValueError(
                f"need one layer score per layer ({structure.num_layers}), got shape {tuple(layer_scores.shape)}"
            )
        self.scores = scores
        self.structure = structure
        self.layer_scores = None if layer_scores is None else layer_scores.double().numpy()
        self._removed: dict[str, list[np.ndarray]] = {}
        self._order: dict[str, list[np.ndarray]] = {}
        for kind in prunable.UNIT_KINDS:
            removed, order = [], []
            for layer_scores in scores.of(kind):
                s = layer_scores.numpy().astype(np.float64)
                ascending = np.sort(s)
                # removed[k] = sum of the (n - k) smallest scores, i.e. the cost of keeping the top k.
                prefix = np.concatenate([[0.0], np.cumsum(ascending)])
                removed.append(prefix[::-1].copy())  # prefix[n - k] for k = 0..n
                order.append(np.argsort(-s, kind="stable"))
            self._removed[kind], self._order[kind] = removed, order

    def layer_loss(self, kind: prunable.UnitKind, layer: int, kept: np.ndarray) -> np.ndarray:
        """Proxy loss of keeping `kept` (array) units of `kind` in `layer`."""
        return self._removed[kind][layer][np.asarray(kept)]

    @property
    def depth(self) -> bool:
        """Whether a layer left without units is dropped."""
        return self.layer_scores is not None

    def dropped(self, units: np.ndarray, mlp: np.ndarray) -> np.ndarray:
        """(..., layers) widths -> whether each layer is dropped (none without layer scores)."""
        units, mlp = np.asarray(units), np.asarray(mlp)
        return (units == 0) & (mlp == 0) & self.depth

    def block_loss(self, layer: int, units: np.ndarray, mlp: np.ndarray) -> np.ndarray:
        """Proxy loss of one layer at (arrays of) kept widths: its removed units, or the whole layer."""
        units, mlp = np.asarray(units), np.asarray(mlp)
        removed = self.layer_loss("heads", layer, units) + self.layer_loss("mlp", layer, mlp)
        if self.layer_scores is None:
            return removed
        return np.where(self.dropped(units, mlp), self.layer_scores[layer], removed)

    def loss(self, units: np.ndarray, mlp: np.ndarray) -> np.ndarray:
        """(N, layers) kept widths -> (N,) summed saliency of everything removed."""
        units, mlp = np.atleast_2d(units), np.atleast_2d(mlp)
        total = np.zeros(units.shape[0])
        for i in range(units.shape[1]):
            total += self.block_loss(i, units[:, i], mlp[:, i])
        return total

    def kept(self, kind: prunable.UnitKind, layer: int, k: int) -> list[int]:
        """The k most salient units of `kind` in `layer`, ascending."""
        return sorted(int(i) for i in self._order[kind][layer][:k])

    def plan(
        self, units: np.ndarray, mlp: np.ndarray, model: prunable.ModelRef, **kwargs: object
    ) -> prunable.PrunePlan:
        """The plan keeping each layer's most salient units at the given widths (dropping the
        layers left without units, with layer scores)."""
        return prunable.PrunePlan.from_units(
            self.structure,
            model,
            heads=[self.kept("heads", i, int(k)) for i, k in enumerate(units)],
            mlp=[self.kept("mlp", i, int(k)) for i, k in enumerate(mlp)],
            drop=self.dropped(units, mlp).tolist(),
            **kwargs,  # type: ignore[arg-type]
        )
