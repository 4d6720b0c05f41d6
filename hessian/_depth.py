"""Saliency of whole layers for depth pruning: the measured loss of the model without each one.

A unit's score is a second-order estimate around the dense model, which is accurate for small
removals; dropping a whole layer is not small, and in a post-norm block (BERT) it also removes the
norms, which no unit gate reaches. So a layer is scored by measuring: run the calibration data with
the layer skipped (its input passed on untouched, exactly what the pruned model computes) and take
the mean increase of the objective. One forward per layer and calibration part, no backward; the
score is in the objective's units, the same scale the unit saliencies estimate.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from hwprune import prunable
from hwprune._progress import Progress
from hwprune.errors import DataError
from hwprune.hessian._base import ScoringOptions, placed
from hwprune.hessian._calibration import Calibration, check_finite

log = logging.getLogger(__name__)


def layer_scores(
    model: nn.Module, calibration: Calibration, *, options: ScoringOptions | None = None
) -> torch.Tensor:
    """Per layer, the mean loss increase over calibration samples when that layer alone is dropped.

    Args:
        model: The dense model (left as it was).
        calibration: Data and objective, as for the unit saliency methods.
        options: Device, dtype and samples per pass (see `ScoringOptions`).

    Returns:
        (layers,) float64 scores, floored at 0: a layer whose removal lowers the calibration loss
        is scored as free to remove, not as an improvement to seek.
    """
    options = options or ScoringOptions()
    if not calibration.batches:
        raise DataError("layer scores: calibration has no batches")
    structure = prunable.discover(model)
    n_layers = structure.num_layers
    total = torch.zeros(n_layers, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        with placed(model, options) as scored, torch.no_grad(), prunable.gated(scored, structure) as gates:
            device = next(scored.parameters()).device
            parts = [p for b in calibration.batches for p in b.chunks(options.max_samples)]
            progress = Progress("layer scores, layers x calibration parts", n_layers * len(parts), logger=log)
            for index, part in enumerate(parts):
                part = part.to(device)
                gates.skipped = set()
                dense = calibration.objective.losses(scored, part).double()  # (n_samples,)
                for layer in range(n_layers):
                    gates.skipped = {layer}
                    without = calibration.objective.losses(scored, part).double()
                    check_finite(
                        without, what=f"loss without layer {layer}", batch_index=index, method="depth"
                    )
                    total[layer] += float((without - dense).sum())
                    progress.advance()
    finally:
        model.train(was_training)
    return (total / calibration.n_samples).clamp_min(0.0)
