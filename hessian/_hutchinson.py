"""HAWQ-V2 style sensitivity: Hutchinson estimates of each layer's Hessian trace."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from hwprune import prunable
from hwprune.hessian._base import Saliency, ScoringOptions, frozen, unit_sums
from hwprune.hessian._calibration import Calibration, check_finite
from hwprune.hessian._layer_progress import layer_progress

log = logging.getLogger(__name__)


class HutchinsonSaliency(Saliency):
    """Per-layer Hessian trace by Hutchinson's estimator, spread over units by their weight norm.

    Tr(H) of the weights behind each (layer, kind) is estimated as the mean of v^T H v over
    Rademacher probes v (one Hessian-vector product per probe, all blocks at once: cross-block terms
    vanish in expectation). Probing stops when every block's running mean moves by less than `tol`
    (relative) for `patience` probes in a row, or after `max_probes`. A unit's score is the
    isotropic second-order loss change of zeroing it, 1/2 * Tr(H)/n_params * ||w_S||^2, as HAWQ-V2
    weighs a layer's perturbation by its average curvature. Away from a minimum a supervised loss's
    trace can be negative; its magnitude is used, as the sensitivity it measures.

    Double backward needs the eager attention kernels; the model's attention implementation is
    switched for the estimate and restored after. Peak memory: the weights, the probes, the
    gradients and one pass's graphs (in proportion to `saliency.max_samples`).

    Args:
        max_probes: Upper bound on probes.
        min_probes: Probes before the stopping rule applies.
        tol: Relative change of the running means that counts as settled.
        patience: Consecutive settled probes needed to stop.
        seed: Seeds the probes.
    """

    name = "hutchinson"

    def __init__(
        self,
        *,
        max_probes: int = 64,
        min_probes: int = 8,
        tol: float = 0.02,
        patience: int = 3,
        seed: int = 0,
    ) -> None:
        if not 1 <= min_probes <= max_probes:
            raise ValueError(
                f"need 1 <= min_probes <= max_probes, got min_probes={min_probes}, max_probes={max_probes}"
            )
        if tol <= 0:
            raise ValueError(f"tol must be positive, got {tol}")
        self.max_probes, self.min_probes, self.tol, self.patience, self.seed = (
            max_probes,
            min_probes,
            tol,
            patience,
            seed,
        )
        self.probes_used = 0

    def params(self) -> dict[str, Any]:
        return {
            "max_probes": self.max_probes,
            "min_probes": self.min_probes,
            "tol": self.tol,
            "seed": self.seed,
        }

    def _score(
        self,
        model: nn.Module,
        structure: prunable.Structure,
        calibration: Calibration,
        options: ScoringOptions,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        layers = prunable.couplings(model)
        # Block = (layer, kind): the distinct parameters its units are coupled to.
        blocks = [
            list({id(p): p for c in lc.of(kind) for p, _ in c.parameters_and_dims()}.values())
            for lc in layers
            for kind in prunable.UNIT_KINDS
        ]
        params = list({id(p): p for block in blocks for p in block}.values())
        index = {id(p): i for i, p in enumerate(params)}
        members = [torch.tensor([index[id(p)] for p in block], dtype=torch.long) for block in blocks]
        gen = torch.Generator().manual_seed(self.seed)
        device = next(model.parameters()).device
        sums = torch.zeros(len(blocks), dtype=torch.float64)
        previous: torch.Tensor | None = None
        settled = 0
        passes = self.max_probes * max(len(b.chunks(options.max_samples)) for b in calibration.batches)
        with (
            frozen(model),
            eager_attention(model),
            layer_progress(model, f"{self.name} saliency (at most)", passes=passes, logger=log),
        ):
            for k in range(self.max_probes):
                b = k % len(calibration.batches)
                batch = calibration.batches[b]
                probes = [torch.randint(0, 2, p.shape, generator=gen).to(p) * 2 - 1 for p in params]
                # v.Hv of the batch's mean loss, a sum over its parts (the HVP is linear in the loss).
                for part in batch.chunks(options.max_samples):
                    share = part.n_samples / batch.n_samples
                    on_device = part.to(device)
                    loss, vhv = quadratic_forms(
                        model,
                        params,
                        probes,
                        lambda: calibration.objective.losses(model, on_device).mean() * share,  # noqa: B023
                    )
                    check_finite(loss, what="loss", batch_index=b, method=self.name)
                    check_finite(vhv, what="v.Hv", batch_index=b, method=self.name)
                    sums += torch.stack([vhv[m].sum() for m in members])
                means = sums / (k + 1)
                if previous is not None:
                    change = ((means - previous).abs() / previous.abs().clamp_min(1e-12)).max().item()
                    settled = settled + 1 if change < self.tol else 0
                previous = means
                self.probes_used = k + 1
                log.info("hutchinson: probe %d of at most %d", k + 1, self.max_probes)
                if k + 1 >= self.min_probes and settled >= self.patience:
                    break
        log.info("hutchinson: %d probes", self.probes_used)
        traces = iter(previous.tolist() if previous is not None else [])
        out: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for lc, layer in zip(layers, structure.layers, strict=True):
            for kind, sink in zip(prunable.UNIT_KINDS, out, strict=True):
                coupled = lc.of(kind)
                trace = next(traces)
                n_params = sum(p.numel() for c in coupled for p, _ in c.parameters_and_dims())
                squares = {id(p): p.detach().pow(2) for c in coupled for p, _ in c.parameters_and_dims()}
                per_weight = abs(trace) / n_params if n_params else 0.0
                sink.append(0.5 * per_weight * unit_sums(coupled, squares, layer.units(kind)))
        return out


def quadratic_forms(
    model: nn.Module,
    params: list[nn.Parameter],
    probes: list[torch.Tensor],
    loss: Callable[[], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and, per parameter i, v_i . (H v)_i in float64, H the Hessian of `loss()` in `params`.

    H v is the gradient of g . v (double backward). Two things keep its memory to the weights, the
    probes, the gradients and the passes' graphs: the gradients are dropped before the second pass
    (its graph needs only the probes), and each slice of H v is reduced to v_i . (H v)_i and freed as
    soon as autograd has it, so H v is never held whole. (Forward-over-reverse, torch.func's jvp of
    grad, gives the same numbers but peaked 1.3-1.4x higher here: results/benchmarks/
    saliency_scale_hutchinson.md.)
    """
    forms = torch.zeros(len(params), dtype=torch.float64)

    def reduce_into(i: int, v: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            assert p.grad is not None
            forms[i] = (v * p.grad).sum(dtype=torch.float64).cpu()
            p.grad = None

        return hook

    for p in params:
        p.grad = None
        p.requires_grad_(True)
    handles = []
    try:
        value = loss()
        grads = torch.autograd.grad(value, params, create_graph=True, allow_unused=True)
        gv = sum(
            ((g * v).sum() for g, v in zip(grads, probes, strict=True) if g is not None), value.new_zeros(())
        )
        del grads  # the second pass needs the probes, not the gradients
        handles = [
            p.register_post_accumulate_grad_hook(reduce_into(i, v))
            for i, (p, v) in enumerate(zip(params, probes, strict=True))
        ]
        if gv.requires_grad:
            gv.backward()
    finally:
        for h in handles:
            h.remove()
        for p in params:
            p.grad = None
            p.requires_grad_(False)
    return value.detach(), forms


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch a transformers model to eager attention for the block (SDPA's CPU kernel has no
    forward-mode derivative).

    Models that cannot switch through `set_attn_implementation` (Falcon) read the config's setting
    at every forward, so the setting itself is switched for them.
    """
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    switch = previous not in (None, "eager")
    if switch:
        model.set_attn_implementation("eager")  # type: ignore[operator]
        if config._attn_implementation != "eager":  # type: ignore[union-attr]
            config._attn_implementation = "eager"  # type: ignore[union-attr]
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(previous)  # type: ignore[operator]
            config._attn_implementation = previous  # type: ignore[union-attr]
