"""Weight-only baselines: magnitude and random."""

from __future__ import annotations

import torch
from torch import nn

from hwprune import prunable
from hwprune.hessian._base import Saliency, ScoringOptions, SeededSaliency, unit_sums
from hwprune.hessian._calibration import Calibration


class MagnitudeSaliency(Saliency):
    """L2 norm of a unit's coupled weights, divided by its layer's mean for that kind.

    Raw norms differ between layers by orders of magnitude (LayerNorm gains, depth), so the per-layer
    normalisation is what makes a global ranking of this baseline mean anything.
    """

    name = "magnitude"
    estimates_loss = False

    def _score(
        self,
        model: nn.Module,
        structure: prunable.Structure,
        calibration: Calibration,
        options: ScoringOptions,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        out: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for layer, lc in zip(structure.layers, prunable.couplings(model), strict=True):
            for kind, sink in zip(prunable.UNIT_KINDS, out, strict=True):
                coupled = lc.of(kind)
                squares = {id(p): p.detach().pow(2) for c in coupled for p, _ in c.parameters_and_dims()}
                norms = unit_sums(coupled, squares, layer.units(kind)).sqrt()
                sink.append(norms / norms.mean() if norms.numel() and norms.mean() > 0 else norms)
        return out


class RandomSaliency(SeededSaliency):
    """Uniform random scores: the floor every method must clear.

    Args:
        seed: Seed of the scores.
    """

    name = "random"
    estimates_loss = False

    def _score(
        self,
        model: nn.Module,
        structure: prunable.Structure,
        calibration: Calibration,
        options: ScoringOptions,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed)
        heads = [
            torch.rand(la.attention_units, generator=gen, dtype=torch.float64) for la in structure.layers
        ]
        mlp = [torch.rand(la.mlp_width, generator=gen, dtype=torch.float64) for la in structure.layers]
        return heads, mlp
