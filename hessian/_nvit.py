"""NViT's Hessian-aware group saliency with exact per-sample Fisher / Gauss-Newton."""

from __future__ import annotations

import torch
from torch import nn

import prunable
from hessian._base import SeededSaliency
from hessian._calibration import Calibration
from hessian._gate_grads import mean_over_samples


class NViTSaliency(SeededSaliency):
    """Second-order Taylor estimate of the loss change when a unit is removed.

    Removing unit S moves its gate from 1 to 0, so dL ~ -dL/dgate + 1/2 d2L/dgate2. At a trained
    model the first term averages out; replacing the Hessian with the Gauss-Newton (squared gradients
    of the objective's curvature probes; the empirical Fisher for objectives without one) gives
    I_S = 1/2 E[(dL/dgate_S)^2] = 1/2 E[(g_S . w_S)^2], where g_S . w_S couples
    all of the unit's tensors (Q/K/V/O of a head; up/gate/down of a neuron). The expectation runs
    over per-sample gradients, not batch means, which NViT's own code averages first.

    Args:
        seed: Seeds the output projections of label-free objectives.
    """

    name = "nvit"

    def _score(
        self, model: nn.Module, structure: prunable.Structure, calibration: Calibration
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        heads, mlp = mean_over_samples(
            model,
            structure,
            calibration,
            method=self.name,
            curvature=True,
            transform=torch.square,
            seed=self.seed,
        )
        return [0.5 * h for h in heads], [0.5 * m for m in mlp]
