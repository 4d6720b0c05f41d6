"""HAWQ-V2 style sensitivity: Hutchinson estimates of each layer's Hessian trace."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from hwprune import prunable
from hwprune.errors import ConfigError
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
            raise ConfigError(
                f"need 1 <= min_probes <= max_probes, got min_probes={min_probes}, max_probes={max_probes}"
            )
        if tol <= 0:
            raise ConfigError(f"tol must be positive, got {tol}")
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
                probes = Probes(params, gen)
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


class Probes:
    """One Rademacher probe v (+-1 per weight) over `params`, regenerated on demand instead of stored.

    The draws are those of `torch.randint(0, 2, p.shape, generator=generator)` for each parameter in
    turn, as an earlier release stored them; the generator's state before each draw is kept (a few KB)
    so that v_i can be drawn again whenever it is needed, which saves holding a weight-sized copy.

    Args:
        params: The parameters probed, in order.
        generator: Advanced past every parameter's draw, as if v were drawn whole.
    """

    def __init__(self, params: list[nn.Parameter], generator: torch.Generator) -> None:
        self.params = params
        self.states = []
        for p in params:
            self.states.append(generator.get_state())
            torch.randint(0, 2, p.shape, generator=generator, dtype=torch.float32)  # advance past its draw

    def __len__(self) -> int:
        return len(self.params)

    def __getitem__(self, i: int) -> torch.Tensor:
        """v_i, shaped, typed and placed like parameter i."""
        generator = torch.Generator().set_state(self.states[i])
        p = self.params[i]
        # Drawn as float32 in place: the same numbers as int64 draws, at half the time.
        v = torch.randint(0, 2, p.shape, generator=generator, dtype=torch.float32).mul_(2).sub_(1)
        return v.to(p)


class _ProbeDot(torch.autograd.Function):
    """g . v for a probe slice v that is drawn again for the backward instead of being saved."""

    @staticmethod
    def forward(ctx: Any, g: torch.Tensor, probe: Callable[[], torch.Tensor]) -> torch.Tensor:
        ctx.probe = probe
        return (g * probe()).sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.probe(), None


def quadratic_forms(
    model: nn.Module,
    params: list[nn.Parameter],
    probes: Sequence[torch.Tensor] | Probes,
    loss: Callable[[], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and, per parameter i, v_i . (H v)_i in float64, H the Hessian of `loss()` in `params`.

    H v is the gradient of g . v (double backward). No weight-sized tensor is held for all parameters
    at once beyond the model: each gradient g_i is turned into its term g_i . v_i (keeping its graph)
    and freed as the first backward makes it; each slice of H v is reduced to v_i . (H v)_i and freed
    as the second backward makes it; and with `Probes`, v_i is drawn again where it is needed. What
    remains is the two passes' graphs, in proportion to the samples per pass. (An earlier release held
    g, v and H v whole: 5.9x the weights at 0.3B in parts of 2 where this holds 4.2x; forward-over-
    reverse, torch.func's jvp of grad, held more than either.)

    Args:
        probes: v_i for parameter i, by index (a list, or `Probes` to draw them on demand).
    """
    forms = torch.zeros(len(params), dtype=torch.float64)
    terms: list[torch.Tensor] = []

    def into_term(i: int) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:  # first backward: p.grad = g_i, with its graph
            assert p.grad is not None
            terms.append(_ProbeDot.apply(p.grad, lambda: probes[i]))
            p.grad = None

        return hook

    def into_form(i: int) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:  # second backward: p.grad = (H v)_i
            assert p.grad is not None
            forms[i] = (probes[i] * p.grad).sum(dtype=torch.float64).cpu()
            p.grad = None

        return hook

    for p in params:
        p.grad = None
        p.requires_grad_(True)
    handles = []
    try:
        value = loss()
        handles = [p.register_post_accumulate_grad_hook(into_term(i)) for i, p in enumerate(params)]
        with warnings.catch_warnings():
            # The reference cycle it warns of (a parameter and its graph-carrying .grad) is cut by the hooks.
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            value.backward(create_graph=True)
        for h in handles:
            h.remove()
        gv = torch.stack(terms).sum() if terms else None
        terms.clear()
        handles = [p.register_post_accumulate_grad_hook(into_form(i)) for i, p in enumerate(params)]
        if gv is not None and gv.requires_grad:
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
