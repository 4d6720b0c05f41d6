"""Diagonal-Fisher (OBD) saliency of each unit's weights, from exact per-sample gradients."""

from __future__ import annotations

import logging

import torch
from torch import nn

from hwprune import prunable
from hwprune.hessian._base import ScoringOptions, SeededSaliency, frozen
from hwprune.hessian._calibration import Calibration, check_finite
from hwprune.hessian._layer_progress import layer_progress

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
                id(p): p for lc in layers for c in lc.attention + lc.mlp for p, _ in c.parameters_and_dims()
            }.values()
        )
        position = {id(p): i for i, p in enumerate(params)}
        device = next(model.parameters()).device
        # Per-unit sums of g^2 w^2, accumulated sample by sample where the gradients are: no
        # weight-sized accumulator beside the gradients, no host copy per parameter and sample.
        dtype = torch.float32 if device.type == "mps" else torch.float64  # mps has no float64
        attention = [torch.zeros(la.attention_units, dtype=dtype, device=device) for la in structure.layers]
        mlp = [torch.zeros(la.mlp_width, dtype=dtype, device=device) for la in structure.layers]
        # (unit sums, coupling, parameter, its unit dimension) of every coupled tensor
        terms = [
            (sums, coupling, param, dim)
            for lc, head_sums, mlp_sums in zip(layers, attention, mlp, strict=True)
            for coupled, sums in ((lc.attention, head_sums), (lc.mlp, mlp_sums))
            for coupling in coupled
            for param, dim in coupling.parameters_and_dims()
        ]
        generator = torch.Generator().manual_seed(self.seed)
        objective = calibration.objective
        with (
            frozen(model),
            layer_progress(model, self.name + " saliency", passes=calibration.n_samples, logger=log),
        ):
            for p in params:
                p.requires_grad_(True)
            for b, batch in enumerate(calibration.batches):
                for s in range(batch.n_samples):  # one sample per pass: max_samples has nothing to split
                    sample = batch.select([s]).to(device)
                    loss = objective.curvature_losses(model, sample, generator).sum()
                    check_finite(loss, what="loss", batch_index=b, method=self.name)
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                    for sums, coupling, param, dim in terms:
                        g = grads[position[id(param)]]
                        if g is not None:
                            obd = g.float().pow(2) * param.detach().float().pow(2)
                            sums += coupling.per_unit(obd, dim).sum(1).to(dtype)
        n = calibration.n_samples
        attention = [0.5 * h / n for h in attention]
        mlp = [0.5 * m / n for m in mlp]
        return attention, mlp
