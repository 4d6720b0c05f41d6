"""The additive saliency proxy: predicted loss increase of a configuration, and its plan."""

from __future__ import annotations

import numpy as np
import torch

from hwprune import hessian, prunable
from hwprune.search._space import Widths


class SaliencyProxy:
    """Predicted loss increase of a configuration: the summed saliency of the units it removes.

    Keeping the top-k units of a layer removes its n - k least salient ones, so the proxy is a
    lookup in per-layer prefix sums of ascending scores: vectorised and exact for the additive model.
    With layer scores (depth pruning), a layer left without units is dropped, and costs its layer
    score instead of the sum of its units'. A mixture-of-experts layer keeping k experts of width w
    keeps its k most salient experts and each one's w most salient neurons: it costs the removed
    experts' scores plus, per kept expert, its removed neurons' scores.

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
        # Per MoE layer: experts by descending score, and expert_loss[k, w] for all k and w.
        self._expert_order: list[np.ndarray] = []
        self._expert_loss: list[np.ndarray] = []
        for i, layer in enumerate(structure.layers):
            if not layer.is_moe:
                self._expert_order.append(np.zeros(0, dtype=np.int64))
                self._expert_loss.append(np.zeros((1, 1)))
                continue
            e = scores.experts[i].numpy().astype(np.float64)
            by_score = np.argsort(-e, kind="stable")
            removed_experts = np.concatenate([[0.0], np.cumsum(np.sort(e))])[::-1]  # (E + 1,) for k = 0..E
            # removed_neurons[j, w]: expert by_score[j] keeping its top w neurons, for w = 0..W.
            neurons = scores.expert_mlp[i].numpy().astype(np.float64)
            per_expert = np.sort(neurons[by_score], axis=1)  # (E, W) ascending
            prefix = np.concatenate([np.zeros((len(e), 1)), np.cumsum(per_expert, axis=1)], axis=1)
            removed_neurons = prefix[:, ::-1]  # (E, W + 1)
            kept_neurons = np.concatenate(
                [np.zeros((1, prefix.shape[1])), np.cumsum(removed_neurons, axis=0)]
            )
            self._expert_order.append(by_score)
            self._expert_loss.append(removed_experts[:, None] + kept_neurons)  # (E + 1, W + 1)

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

    def block_loss(
        self,
        layer: int,
        units: np.ndarray,
        mlp: np.ndarray,
        experts: np.ndarray | None = None,
        expert_width: np.ndarray | None = None,
    ) -> np.ndarray:
        """Proxy loss of one layer at (arrays of) kept widths: its removed units, or the whole layer."""
        units, mlp = np.asarray(units), np.asarray(mlp)
        removed = self.layer_loss("attention", layer, units) + self.layer_loss("mlp", layer, mlp)
        if experts is not None and expert_width is not None:
            removed = removed + self._expert_loss[layer][np.asarray(experts), np.asarray(expert_width)]
        if self.layer_scores is None:
            return removed
        return np.where(self.dropped(units, mlp), self.layer_scores[layer], removed)

    def loss(
        self,
        units: np.ndarray,
        mlp: np.ndarray,
        experts: np.ndarray | None = None,
        expert_width: np.ndarray | None = None,
    ) -> np.ndarray:
        """(N, layers) kept widths -> (N,) summed saliency of everything removed."""
        units, mlp = np.atleast_2d(units), np.atleast_2d(mlp)
        e = None if experts is None else np.atleast_2d(experts)
        w = None if expert_width is None else np.atleast_2d(expert_width)
        total = np.zeros(units.shape[0])
        for i in range(units.shape[1]):
            total += self.block_loss(
                i, units[:, i], mlp[:, i], None if e is None else e[:, i], None if w is None else w[:, i]
            )
        return total

    def kept(self, kind: prunable.UnitKind, layer: int, k: int) -> list[int]:
        """The k most salient units of `kind` in `layer`, ascending."""
        return sorted(int(i) for i in self._order[kind][layer][:k])

    def kept_experts(self, layer: int, k: int, width: int) -> tuple[list[int], list[list[int]]]:
        """The k most salient experts of `layer` (ascending) and each one's `width` most salient neurons."""
        experts = sorted(int(e) for e in self._expert_order[layer][:k])
        scores = self.scores.expert_mlp[layer].numpy()
        return experts, [sorted(np.argsort(-scores[e], kind="stable")[:width].tolist()) for e in experts]

    def plan(self, widths: Widths, model: prunable.ModelRef, **kwargs: object) -> prunable.PrunePlan:
        """The plan keeping each layer's most salient units at the given widths (dropping the
        layers left without units, with layer scores)."""
        units, mlp, experts, expert_width = widths
        chosen: list[tuple[list[int], list[list[int]]] | None] = [None] * len(units)
        if experts is not None and expert_width is not None:
            chosen = [
                self.kept_experts(i, int(k), int(w))
                for i, (k, w) in enumerate(zip(experts, expert_width, strict=True))
            ]
        return prunable.PrunePlan.from_units(
            self.structure,
            model,
            attention=[self.kept("attention", i, int(k)) for i, k in enumerate(units)],
            mlp=[self.kept("mlp", i, int(k)) for i, k in enumerate(mlp)],
            drop=self.dropped(units, mlp).tolist(),
            experts=[c[0] if c else None for c in chosen],
            expert_mlp=[c[1] if c else None for c in chosen],
            **kwargs,  # type: ignore[arg-type]
        )
