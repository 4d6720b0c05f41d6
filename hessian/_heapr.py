"""HEAPr (Li et al., 2025): second-order scores of atomic experts in each expert's output space.

An atomic expert is one neuron n of a routed expert: its gate and up rows and its down column w_n.
Removing it changes the expert's (routing-weighted) output for token t by r_t a_tn w_n, so with the
output-space curvature H_e = mean over the expert's tokens of g_t g_t^T (g_t: the gradient of the
curvature probe at that output) the Optimal-Brain-Surgeon loss increase factorises as

    score_n = 1/2 (w_n^T H_e w_n) * sum_t (r_t a_tn)^2 = 1/2 mean_t (g_t . w_n)^2 * sum_t (r_t a_tn)^2,

one forward and one backward over the calibration data, and a d x d matrix per expert at most (here
only its projections on the w_n). An expert's score is the sum of its atomic experts'. Attention
units and dense MLP neurons, which HEAPr does not cover, get NViT's scores from the same passes.
"""

from __future__ import annotations

import torch
from torch import nn

from hwprune import prunable
from hwprune.errors import UnsupportedModelError
from hwprune.hessian._base import Scored, ScoringOptions, SeededSaliency
from hwprune.hessian._calibration import Calibration
from hwprune.hessian._gate_grads import per_sample_gate_grads, zero_scores


class HEAPrSaliency(SeededSaliency):
    """HEAPr's output-space second-order scores for routed experts and their neurons.

    Args:
        seed: Seeds the random output projections of label-free objectives.
    """

    name = "heapr"
    scores_experts = True

    def check_structure(self, structure: prunable.Structure) -> None:
        if not any(layer.is_moe for layer in structure.layers):
            raise UnsupportedModelError(
                f"saliency heapr scores routed experts and {structure.model_class} has none; use nvit (the "
                "scores heapr gives attention and dense MLP units)"
            )

    def _score(
        self,
        model: nn.Module,
        structure: prunable.Structure,
        calibration: Calibration,
        options: ScoringOptions,
    ) -> Scored:
        couplings = prunable.couplings(model)
        shapes = [(la.num_experts, la.expert_width) for la in structure.layers]
        activations = [torch.zeros(shape, dtype=torch.float64) for shape in shapes]  # sum_t (r a)^2
        projections = [torch.zeros(shape, dtype=torch.float64) for shape in shapes]  # sum_t (g . w_n)^2
        tokens = [torch.zeros(e, dtype=torch.float64) for e, _ in shapes]

        def observe(
            layer: int, expert: int, act: torch.Tensor, weights: torch.Tensor, output: torch.Tensor
        ) -> None:
            scaled = (weights[:, None] * act).detach().double()  # (n, width)
            activations[layer][expert] += scaled.pow(2).sum(0).cpu()
            coupling = couplings[layer].experts
            assert coupling is not None
            down = coupling.experts.down_proj[expert].detach()  # (hidden, width)

            def on_grad(grad: torch.Tensor) -> None:  # grad: (n, hidden) at the weighted output
                projected = (grad.detach() @ down).double()  # (n, width): g_t . w_n
                projections[layer][expert] += projected.pow(2).sum(0).cpu()
                tokens[layer][expert] += grad.shape[0]

            output.register_hook(on_grad)

        scores = zero_scores(structure)
        for grads in per_sample_gate_grads(
            model,
            structure,
            calibration,
            method=self.name,
            curvature=True,
            seed=self.seed,
            max_samples=options.max_samples,
            expert_observer=observe,
        ):
            for kind in prunable.UNIT_KINDS:  # NViT's scores for the units HEAPr does not cover
                for i, g in enumerate(grads.grads[kind]):
                    scores[kind][i] += 0.5 * g.double().square().sum(0).cpu()
        n = calibration.n_samples
        out: dict[str, list[torch.Tensor]] = {
            kind: [t / n for t in scores[kind]] for kind in prunable.UNIT_KINDS
        }
        curvature = [p / t.clamp_min(1.0)[:, None] for p, t in zip(projections, tokens, strict=True)]
        out["expert_mlp"] = [0.5 * a * c / n for a, c in zip(activations, curvature, strict=True)]
        out["experts"] = [s.sum(-1) for s in out["expert_mlp"]]
        return out
