"""Diagonal-Fisher (OBD) saliency of each unit's weights, from exact per-sample gradients."""

from __future__ import annotations

import logging

import torch
from torch import nn

from hwprune import prunable
from hwprune._progress import progress
from hwprune.hessian._base import ScoringOptions, SeededSaliency, frozen, unit_sums
from hwprune.hessian._calibration import Calibration, check_finite

log = logging.getLogger(__name__)


class FisherSaliency(SeededSaliency):
    """Optimal Brain Damage with the Fisher diagonal: 1/2 sum over S's weights of E[g_i^2] w_i^2.

    Unlike NViT it ignores the correlations between a unit's weights (it sums per-weight terms
    instead of squaring the coupled sum g_S . w_S). The expectation is over per-sample gradients,
    taken one sample at a time, which costs a backward pass per sample.

    Args:
        seed: Seeds the output projections of label-free objectives.
    """

    name = "fisher"

    def _score(
        self,
        model: nn.Module,
        structure: prunable.Structure,
        calibration: Calibration,
        options: ScoringOptions,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        layers = prunable.couplings(model)
        params = list(
            {
                id(p): p for lc in layers for c in lc.heads + lc.mlp for p, _ in c.parameters_and_dims()
            }.values()
        )
        sq_grads = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in params}
        generator = torch.Generator().manual_seed(self.seed)
        objective = calibration.objective
        device = next(model.parameters()).device
        with frozen(model):
            for p in params:
                p.requires_grad_(True)
            for b, batch in enumerate(progress(calibration.batches, "fisher saliency, batches", logger=log)):
                for s in range(batch.n_samples):  # one sample per pass: max_samples has nothing to split
                    sample = batch.select([s]).to(device)
                    loss = objective.curvature_losses(model, sample, generator).sum()
                    check_finite(loss, what="loss", batch_index=b, method=self.name)
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                    for p, g in zip(params, grads, strict=True):
                        if g is not None:
                            sq_grads[id(p)] += g.float().pow(2)
        n = calibration.n_samples
        obd = {id(p): 0.5 * sq_grads[id(p)] / n * p.detach().float().pow(2) for p in params}
        heads = [
            unit_sums(lc.heads, obd, la.attention_units)
            for lc, la in zip(layers, structure.layers, strict=True)
        ]
        mlp = [unit_sums(lc.mlp, obd, la.mlp_width) for lc, la in zip(layers, structure.layers, strict=True)]
        return heads, mlp
