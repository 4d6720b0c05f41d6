"""NViT's Hessian-aware group saliency with exact per-sample Fisher / Gauss-Newton."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hwprune import prunable
from hwprune.hessian._base import ScoringOptions, SeededSaliency
from hwprune.hessian._calibration import Calibration
from hwprune.hessian._gate_grads import mean_over_samples, per_sample_gate_grads


class NViTSaliency(SeededSaliency):
    """Second-order Taylor estimate of the loss change when a unit is removed.

    Removing unit S moves its gate from 1 to 0, so dL ~ -dL/dgate + 1/2 d2L/dgate2. Replacing the
    Hessian with the Gauss-Newton (squared gradients of the objective's curvature probes; the
    empirical Fisher for objectives without one) gives I_S = 1/2 E[(dL/dgate_S)^2] =
    1/2 E[(g_S . w_S)^2], where g_S . w_S couples all of the unit's tensors (Q/K/V/O of a head;
    up/gate/down of a neuron). The expectation runs over per-sample gradients, not batch means,
    which NViT's own code averages first.

    NViT drops the first-order term, which vanishes at a model trained on the objective. A model
    tuned on another objective (MiniLM on contrastive pairs, scored on STS regression) has large
    first-order terms; `first_order=True` keeps them and then predicts the loss change of removing
    one unit alone far better. They are not additive, though: units whose removal alone lowers the
    calibration loss do not stay harmless when many go together, so for pruning many units at once
    (what the search does) the default second-order score ranks better. See
    results/benchmarks/saliency_minilm.md.

    Args:
        seed: Seeds the output projections of label-free objectives.
        first_order: Add the mean first-order term -E[dL/dgate_S] (signed scores).
    """

    name = "nvit"

    def __init__(self, *, seed: int = 0, first_order: bool = False) -> None:
        super().__init__(seed=seed)
        if not isinstance(first_order, bool):
            raise ValueError(f"first_order must be True or False, got {first_order!r}")
        self.first_order = first_order

    def params(self) -> dict[str, Any]:
        return {**super().params(), "first_order": self.first_order}

    def _score(
        self,
        model: nn.Module,
        structure: prunable.Structure,
        calibration: Calibration,
        options: ScoringOptions,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        second = (
            [torch.zeros(la.attention_units, dtype=torch.float64) for la in structure.layers],
            [torch.zeros(la.mlp_width, dtype=torch.float64) for la in structure.layers],
        )
        first = ([torch.zeros_like(h) for h in second[0]], [torch.zeros_like(m) for m in second[1]])
        chain_rule = True
        for grads in per_sample_gate_grads(
            model,
            structure,
            calibration,
            method=self.name,
            curvature=True,
            seed=self.seed,
            max_samples=options.max_samples,
        ):
            chain_rule = chain_rule and grads.loss_slope is not None
            for k, per_layer in enumerate((grads.heads, grads.mlp)):
                for i, g in enumerate(per_layer):  # g: (n_samples, units) probe gradients
                    g = g.double()
                    second[k][i] += 0.5 * g.square().sum(0).cpu()
                    if self.first_order and grads.loss_slope is not None:
                        # dL_i/dgate = dL_i/dprobe_i * dprobe_i/dgate
                        slope = grads.loss_slope.double().to(g.device)[:, None]  # (n_samples, 1)
                        first[k][i] += (slope * g).sum(0).cpu()
        n = calibration.n_samples
        heads, mlp = [h / n for h in second[0]], [m / n for m in second[1]]
        if not self.first_order:
            return heads, mlp
        if chain_rule:
            mean_first = ([h / n for h in first[0]], [m / n for m in first[1]])
        else:
            # The probes do not determine the loss gradient: one more backward pass, of the losses.
            mean_first = mean_over_samples(
                model,
                structure,
                calibration,
                method=self.name,
                curvature=False,
                transform=lambda g: g,
                max_samples=options.max_samples,
            )
        return (
            [h - f for h, f in zip(heads, mean_first[0], strict=True)],
            [m - f for m, f in zip(mlp, mean_first[1], strict=True)],
        )
