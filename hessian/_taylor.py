"""First-order Taylor saliency |E[g_S . w_S]| (Molchanov et al.), a baseline."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import prunable
from hessian._base import Saliency
from hessian._calibration import Calibration
from hessian._gate_grads import per_sample_gate_grads


class TaylorSaliency(Saliency):
    """|dL/dgate_S| averaged over the calibration set: the first-order loss change of removing S.

    It needs a loss whose gradient does not vanish at the dense model, i.e. a supervised one; on a
    label-free distance to the dense outputs every first-order score is zero in expectation.
    """

    name = "taylor"

    def params(self) -> dict[str, Any]:
        return {}

    def _score(
        self, model: nn.Module, structure: prunable.Structure, calibration: Calibration
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        heads = [torch.zeros(la.attention_units, dtype=torch.float64) for la in structure.layers]
        mlp = [torch.zeros(la.mlp_width, dtype=torch.float64) for la in structure.layers]
        for head_grads, mlp_grads in per_sample_gate_grads(
            model, structure, calibration, method=self.name, curvature=False
        ):
            for acc, grads in ((heads, head_grads), (mlp, mlp_grads)):
                for i, g in enumerate(grads):
                    acc[i] += g.double().sum(0).cpu()
        n = calibration.n_samples
        return [(h / n).abs() for h in heads], [(m / n).abs() for m in mlp]
