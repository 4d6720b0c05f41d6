"""Weight-only baselines: magnitude and random."""

from __future__ import annotations

import torch
from torch import nn

from hwprune import prunable
from hwprune.hessian._base import Saliency, Scored, ScoringOptions, SeededSaliency, unit_sums
from hwprune.hessian._calibration import Calibration


class MagnitudeSaliency(Saliency):
    """L2 norm of a unit's coupled weights, divided by its layer's mean for that kind.

    Raw norms differ between layers by orders of magnitude (LayerNorm gains, depth), so the per-layer
    normalisation is what makes a global ranking of this baseline mean anything.
    """

    name = "magnitude"
    estimates_loss = False
    scores_experts = True

    def _score(
        self,
        model: nn.Module,
        structure: prunable.Structure,
        calibration: Calibration,
        options: ScoringOptions,
    ) -> Scored:
        out: dict[str, list[torch.Tensor]] = {kind: [] for kind in prunable.GATE_KINDS}
        for layer, lc in zip(structure.layers, prunable.couplings(model), strict=True):
            for kind in prunable.UNIT_KINDS:
                coupled = lc.of(kind)
                squares = {id(p): p.detach().pow(2) for c in coupled for p, _ in c.parameters_and_dims()}
                out[kind].append(_relative(unit_sums(coupled, squares, layer.units(kind)).sqrt()))
            experts = torch.zeros(layer.num_experts), torch.zeros(layer.num_experts, layer.expert_width)
            if lc.experts is not None:
                experts = lc.experts.squared_norms()
            out["experts"].append(_relative(experts[0].double().sqrt().cpu()))
            out["expert_mlp"].append(_relative(experts[1].double().sqrt().cpu()))
        return out


def _relative(norms: torch.Tensor) -> torch.Tensor:
    """Norms over their layer's mean (as they are when empty or all zero)."""
    return norms / norms.mean() if norms.numel() and norms.mean() > 0 else norms


class RandomSaliency(SeededSaliency):
    """Uniform random scores: the floor every method must clear.

    Args:
        seed: Seed of the scores.
    """

    name = "random"
    estimates_loss = False
    scores_experts = True

    def _score(
        self,
        model: nn.Module,
        structure: prunable.Structure,
        calibration: Calibration,
        options: ScoringOptions,
    ) -> Scored:
        gen = torch.Generator().manual_seed(self.seed)
        attention = [
            torch.rand(la.attention_units, generator=gen, dtype=torch.float64) for la in structure.layers
        ]
        mlp = [torch.rand(la.mlp_width, generator=gen, dtype=torch.float64) for la in structure.layers]
        # Drawn after the dense units, so a dense model's scores are what they were before experts.
        experts = [torch.rand(la.num_experts, generator=gen, dtype=torch.float64) for la in structure.layers]
        expert_mlp = [
            torch.rand(la.num_experts, la.expert_width, generator=gen, dtype=torch.float64)
            for la in structure.layers
        ]
        return {"attention": attention, "mlp": mlp, "experts": experts, "expert_mlp": expert_mlp}
