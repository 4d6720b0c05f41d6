"""NViT's Hessian-aware group saliency with exact per-sample Fisher / Gauss-Newton."""

from __future__ import annotations

from typing import Any

from torch import nn

from hwprune import prunable
from hwprune.errors import ConfigError
from hwprune.hessian._base import Scored, ScoringOptions, SeededSaliency
from hwprune.hessian._calibration import Calibration
from hwprune.hessian._gate_grads import mean_over_samples, per_sample_gate_grads, zero_scores


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
    scores_experts = True

    def __init__(self, *, seed: int = 0, first_order: bool = False) -> None:
        super().__init__(seed=seed)
        if not isinstance(first_order, bool):
            raise ConfigError(f"first_order must be True or False, got {first_order!r}")
        self.first_order = first_order

    def params(self) -> dict[str, Any]:
        return {**super().params(), "first_order": self.first_order}

    def _score(
        self,
        model: nn.Module,
        structure: prunable.Structure,
        calibration: Calibration,
        options: ScoringOptions,
    ) -> Scored:
        second, first = zero_scores(structure), zero_scores(structure)
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
            for kind, per_layer in grads.grads.items():
                for i, g in enumerate(per_layer):  # g: (n_samples, units[, width]) probe gradients
                    g = g.double()
                    second[kind][i] += 0.5 * g.square().sum(0).cpu()
                    if self.first_order and grads.loss_slope is not None:
                        # dL_i/dgate = dL_i/dprobe_i * dprobe_i/dgate
                        slope = grads.loss_slope.double().to(g.device)
                        first[kind][i] += (slope.view(-1, *[1] * (g.dim() - 1)) * g).sum(0).cpu()
        n = calibration.n_samples
        mean_second = {kind: [t / n for t in per_layer] for kind, per_layer in second.items()}
        if not self.first_order:
            return mean_second
        if chain_rule:
            mean_first = {kind: [t / n for t in per_layer] for kind, per_layer in first.items()}
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
        return {
            kind: [s - f for s, f in zip(mean_second[kind], mean_first[kind], strict=True)]
            for kind in mean_second
        }
