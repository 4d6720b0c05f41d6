"""First-order Taylor saliency |E[g_S . w_S]| (Molchanov et al.), a baseline."""

from __future__ import annotations

from torch import nn

from hwprune import prunable
from hwprune.hessian._base import Saliency, Scored, ScoringOptions
from hwprune.hessian._calibration import Calibration
from hwprune.hessian._gate_grads import mean_over_samples


class TaylorSaliency(Saliency):
    """|dL/dgate_S| averaged over the calibration set: the first-order loss change of removing S.

    It needs a loss whose gradient does not vanish at the dense model, i.e. a supervised one; on a
    label-free distance to the dense outputs every first-order score is zero in expectation.
    """

    name = "taylor"
    scores_experts = True
    gradient_only = True

    def _score(
        self,
        model: nn.Module,
        structure: prunable.Structure,
        calibration: Calibration,
        options: ScoringOptions,
    ) -> Scored:
        # The mean signed gradient, then its magnitude: per-sample signs may cancel, as in Molchanov et al.
        means = mean_over_samples(
            model,
            structure,
            calibration,
            method=self.name,
            curvature=False,
            transform=lambda g: g,
            max_samples=options.max_samples,
        )
        return {kind: [t.abs() for t in per_layer] for kind, per_layer in means.items()}
