"""Per-sample gradients of the loss with respect to per-unit gates, from one backward per batch.

Gates carry a batch dimension (one gate per row and unit), so after a single backward of the summed
per-sample losses, row r's gate gradient is exactly the gradient of its own sample's loss: samples
do not interact in a transformer's forward. Rows of one sample (a sentence pair) are summed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import nn

from hwprune import prunable
from hwprune.hessian._base import frozen
from hwprune.hessian._calibration import Calibration, check_finite
from hwprune.hessian._layer_progress import layer_progress

log = logging.getLogger(__name__)


class GateGrads(NamedTuple):
    """One batch's per-sample gate gradients, per kind of unit (`prunable.GATE_KINDS`) and layer
    (n_samples, units) ((n_samples, experts, width) for expert neurons), and the loss slopes."""

    grads: dict[str, list[torch.Tensor]]
    loss_slope: torch.Tensor | None  # (n_samples,) dL_i/dprobe_i of curvature probes, if known


def per_sample_gate_grads(
    model: nn.Module,
    structure: prunable.Structure,
    calibration: Calibration,
    *,
    method: str,
    curvature: bool,
    seed: int = 0,
    max_samples: int | None = None,
    expert_observer: Callable[..., None] | None = None,
) -> Iterator[GateGrads]:
    """Yield, per calibration batch, the per-sample gate gradients of the losses or of the probes.

    Args:
        curvature: Differentiate the objective's curvature probes (Fisher / Gauss-Newton) rather
            than its losses (first-order Taylor).
        seed: Seeds the random output projections of label-free objectives.
        max_samples: Samples per forward and backward pass (None: each batch whole). Activation
            memory is in proportion to it; the gradients are the same, part by part.
        expert_observer: Set as the gates' `expert_observer` for the passes (see `prunable.Gates`).
    """
    generator = torch.Generator().manual_seed(seed)
    objective = calibration.objective
    device = next(model.parameters()).device
    parts = [batch.chunks(max_samples) for batch in calibration.batches]
    passes = [(b, part) for b, batch_parts in enumerate(parts) for part in batch_parts]
    with (
        frozen(model),
        prunable.gated(model, structure) as gates,
        layer_progress(model, f"{method} saliency", passes=len(passes), logger=log),
    ):
        gates.expert_observer = expert_observer
        pending: list[GateGrads] = []  # the parts of calibration batch `b` done so far
        for b, part in passes:
            part = part.to(device)
            gates.reset(batch_size=part.rows, requires_grad=True)
            slope = None
            if curvature:
                losses = objective.curvature_losses(model, part, generator)
                slope = objective.loss_slope(losses.detach(), part)
            else:
                losses = objective.losses(model, part)
            check_finite(losses, what="loss", batch_index=b, method=method)
            losses.sum().backward()
            out: dict[str, list[torch.Tensor]] = {kind: [] for kind in prunable.GATE_KINDS}
            for kind, sink in out.items():
                for gate in gates.of(kind):
                    grad = gate.grad if gate.grad is not None else torch.zeros_like(gate)
                    check_finite(grad, what=f"{kind} gate gradient", batch_index=b, method=method)
                    sink.append(part.per_sample(grad.detach()))  # (part samples, units[, width])
            pending.append(GateGrads(out, loss_slope=slope))
            if len(pending) == len(parts[b]):  # the batch's last part: its samples, in order
                yield _joined(pending)
                pending = []


def _joined(parts: list[GateGrads]) -> GateGrads:
    """One batch's gate gradients from those of its parts, samples in order."""
    if len(parts) == 1:
        return parts[0]
    slopes = [p.loss_slope for p in parts]
    return GateGrads(
        {
            kind: [torch.cat(layer) for layer in zip(*(p.grads[kind] for p in parts), strict=True)]
            for kind in prunable.GATE_KINDS
        },
        loss_slope=None if any(s is None for s in slopes) else torch.cat(slopes),  # type: ignore[arg-type]
    )


def mean_over_samples(
    model: nn.Module,
    structure: prunable.Structure,
    calibration: Calibration,
    *,
    method: str,
    curvature: bool,
    transform: Callable[[torch.Tensor], torch.Tensor],
    seed: int = 0,
    max_samples: int | None = None,
) -> dict[str, list[torch.Tensor]]:
    """Per kind of unit and layer, the mean over calibration samples of `transform(per-sample gate
    gradient)`."""
    total = zero_scores(structure)
    for grads, _ in per_sample_gate_grads(
        model, structure, calibration, method=method, curvature=curvature, seed=seed, max_samples=max_samples
    ):
        for kind, acc in total.items():
            for i, g in enumerate(grads[kind]):
                acc[i] += transform(g.double()).sum(0).cpu()
    n = calibration.n_samples
    return {kind: [t / n for t in acc] for kind, acc in total.items()}


def zero_scores(structure: prunable.Structure) -> dict[str, list[torch.Tensor]]:
    """Float64 zeros shaped like the scores of every kind of unit of `structure`."""
    return {
        "attention": [torch.zeros(la.attention_units, dtype=torch.float64) for la in structure.layers],
        "mlp": [torch.zeros(la.mlp_width, dtype=torch.float64) for la in structure.layers],
        "experts": [torch.zeros(la.num_experts, dtype=torch.float64) for la in structure.layers],
        "expert_mlp": [
            torch.zeros(la.num_experts, la.expert_width, dtype=torch.float64) for la in structure.layers
        ],
    }
