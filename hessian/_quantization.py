"""How much loss each block would gain at a lower precision: Hessian-aware (HAWQ-V2 style) estimates.

Rounding a block's weights by dW and its projections' inputs by dX raises the loss, to second order
and at a minimum, by 1/2 dW^T H dW plus the same for the inputs. With H replaced by its diagonal
Fisher / Gauss-Newton estimate (the per-sample squared gradients the pruning saliencies use), the
estimate of a block is a sum of per-element terms, 1/2 E[g_w^2] dW^2 + 1/2 E[g_x^2 dX^2]: additive
over blocks, as the pruning proxy is additive over units, and on its scale (the loss increase of
the same objective), so the two can be summed per layer.

Three estimates come out, so a benchmark can say which ranks the blocks as measurement does:
`fisher` (the above), `trace` (HAWQ-V2: the block's mean Fisher diagonal times its summed squared
weight error, plus the activation term) and `weight_error` (the squared weight error alone: no
Hessian, the plain baseline).

Quantisers, as deployed: `int8` weights symmetric per output channel and inputs per tensor over
their calibration range (ONNX Runtime's QDQ recipe, hwprune.search's int8); `bf16` and `fp16` round
weights and inputs to nearest.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hwprune import prunable
from hwprune.errors import ConfigError, UnsupportedModelError
from hwprune.hessian._base import frozen
from hwprune.hessian._calibration import Batch, Calibration, check_finite

log = logging.getLogger(__name__)

QUANT_PRECISIONS = ("bf16", "fp16", "int8")
BLOCKS = ("attention", "mlp")
ESTIMATES = ("fisher", "trace", "weight_error")


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _out_dim(module: nn.Module) -> int:
    # Couplings hold nn.Linear (out, in) or GPT-2's Conv1D, which stores (in, out).
    return 0 if isinstance(module, nn.Linear) else 1


def quantize_weight(
    w: torch.Tensor, precision: str, out_dim: int = 0, *, reduce_range: bool = False
) -> torch.Tensor:
    """`w` rounded as deployed at `precision` (int8: symmetric per output channel, `out_dim` the
    output axis, on ONNX Runtime's grid: +-127, or +-64 with `reduce_range`, the 7-bit weights of CPUs
    whose int8 kernels saturate; bf16, fp16: to nearest), in `w`'s dtype; differentiable nowhere."""
    if precision == "bf16":
        return w.to(torch.bfloat16).to(w.dtype)
    if precision == "fp16":
        return w.to(torch.float16).to(w.dtype)
    if precision == "int8":
        levels = 64 if reduce_range else 127
        absmax = w.abs().amax(dim=1 - out_dim, keepdim=True).clamp_min(1e-12)  # one scale per output channel
        scale = absmax / levels
        return (w / scale).round().clamp(-levels, levels) * scale
    raise ConfigError(
        f"precision={precision!r} is not quantised here; valid choices: {list(QUANT_PRECISIONS)}"
    )


def weight_error(module: nn.Module, precision: str) -> torch.Tensor:
    """Q(W) - W of a projection's weight at `precision` (fp32)."""
    w = _weight(module).detach().float()
    return quantize_weight(w, precision, _out_dim(module)) - w


def weight_out_dim(module: nn.Module) -> int:
    """The output axis of a projection's weight (0 for nn.Linear, 1 for GPT-2's Conv1D)."""
    return _out_dim(module)


def input_quantizer(precision: str, low: float, high: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The rounding of a projection's input at `precision` (int8: per tensor over [low, high], with
    the zero point of an asymmetric int8 range, as ONNX Runtime's MinMax calibration sets it)."""
    if precision == "bf16":
        return lambda x: x.to(torch.bfloat16).to(x.dtype)
    if precision == "fp16":
        return lambda x: x.to(torch.float16).to(x.dtype)
    if precision != "int8":
        raise ConfigError(
            f"precision={precision!r} is not quantised here; valid choices: {list(QUANT_PRECISIONS)}"
        )
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max(high - low, 1e-12) / 255
    zero = round(-128 - low / scale)
    return lambda x: ((x / scale).round() + zero).clamp(-128, 127).sub(zero).mul(scale)


@dataclass(frozen=True)
class PrecisionSensitivity:
    """Predicted loss increase of each layer's blocks at each precision.

    Attributes:
        precisions: The precisions, in the order of the last axis.
        estimates: Per estimate name (`ESTIMATES`) and block (`BLOCKS`), a (layers, precisions)
            array of predicted loss increases.
        input_ranges: Per layer and block, each projection's calibration input range (min, max).
    """

    precisions: tuple[str, ...]
    estimates: dict[str, dict[str, np.ndarray]]
    input_ranges: list[dict[str, list[tuple[float, float]]]]

    def of(self, block: str, precision: str, estimate: str = "fisher") -> np.ndarray:
        """(layers,) predicted loss increase of putting `block` of each layer at `precision`."""
        return self.estimates[estimate][block][:, self.precisions.index(precision)]


def block_projections(model: nn.Module) -> list[dict[str, list[nn.Module]]]:
    """Per layer, the projections (Linear or Conv1D) of its attention and of its MLP."""
    out = []
    for lc in prunable.couplings(model):
        if lc.experts is not None:
            raise UnsupportedModelError(
                "precision sensitivity of mixture-of-experts layers is not supported yet"
            )
        blocks = {}
        for block, coupled in (("attention", lc.attention), ("mlp", lc.mlp)):
            blocks[block] = list({id(c.module): c.module for c in coupled}.values())
        out.append(blocks)
    return out


def input_ranges(
    model: nn.Module, calibration: Calibration | Sequence[Batch]
) -> dict[int, tuple[float, float]]:
    """Per projection (by id), the min and max of its input over the calibration batches (a
    `Calibration`'s, or the batches given)."""
    batches = calibration.batches if isinstance(calibration, Calibration) else list(calibration)
    ranges: dict[int, tuple[float, float]] = {}
    hooks = []

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach()
        low, high = ranges.get(id(module), (float("inf"), float("-inf")))
        ranges[id(module)] = (min(low, float(x.min())), max(high, float(x.max())))

    for blocks in block_projections(model):
        for modules in blocks.values():
            hooks += [m.register_forward_pre_hook(record) for m in modules]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch.to(device).inputs)
    finally:
        for h in hooks:
            h.remove()
    return ranges


def precision_sensitivity(
    model: nn.Module,
    calibration: Calibration,
    precisions: tuple[str, ...] = ("bf16", "int8"),
    *,
    seed: int = 0,
) -> PrecisionSensitivity:
    """Predicted loss increase of every layer's attention and MLP at each precision.

    Args:
        model: The model as it will be quantised (dense or pruned), fp32.
        calibration: Batches and the objective; one backward pass per sample.
        precisions: Among `QUANT_PRECISIONS`.
        seed: Seeds the output projections of label-free objectives.
    """
    for p in precisions:
        if p not in QUANT_PRECISIONS:
            raise ConfigError(
                f"precision={p!r} is not quantised here; valid choices: {list(QUANT_PRECISIONS)}"
            )
    layers = block_projections(model)
    modules = [m for blocks in layers for ms in blocks.values() for m in ms]
    ranges = input_ranges(model, calibration)
    w_err = {id(m): {p: weight_error(m, p) for p in precisions} for m in modules}
    x_quant = {id(m): {p: input_quantizer(p, *ranges[id(m)]) for p in precisions} for m in modules}
    # Per projection and precision: sum of g_w^2 dW^2, of g_w^2 (for the trace) and of g_x^2 dX^2.
    fisher_w = {id(m): torch.zeros(len(precisions), dtype=torch.float64) for m in modules}
    grad_sq = {id(m): torch.zeros((), dtype=torch.float64) for m in modules}
    act = {id(m): torch.zeros(len(precisions), dtype=torch.float64) for m in modules}
    inputs: dict[int, torch.Tensor] = {}

    def keep_input(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        # A view of its own: its gradient is the one through this projection alone, where the
        # input tensor's gradient would add its other readers' (Q, K and V share an input; in a
        # post-norm block the residual stream reads it too).
        own = args[0].view_as(args[0])
        inputs[id(module)] = own
        return (own, *args[1:])

    def track(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        # The embeddings are frozen: their output starts the graph, so that every projection's
        # input (the first layer's too) has a gradient.
        if isinstance(out, torch.Tensor) and out.is_floating_point() and not out.requires_grad:
            out.requires_grad_(True)

    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    objective, weights = calibration.objective, [_weight(m) for m in modules]
    hooks = [m.register_forward_pre_hook(keep_input) for m in modules]
    embeddings = getattr(model, "get_input_embeddings")()  # noqa: B009 - a transformers model's method
    assert isinstance(embeddings, nn.Module)
    hooks.append(embeddings.register_forward_hook(track))
    try:
        with frozen(model):
            for w in weights:
                w.requires_grad_(True)
            for b, batch in enumerate(calibration.batches):
                for s in range(batch.n_samples):  # per-sample gradients: the Fisher is E[g^2], not E[g]^2
                    sample = batch.select([s]).to(device)
                    with torch.enable_grad():
                        loss = objective.curvature_losses(model, sample, generator).sum()
                        check_finite(loss, what="loss", batch_index=b, method="precision sensitivity")
                        # The inputs need their gradients too: they are leaves of no graph of their
                        # own, so they are asked for by name.
                        xs = [inputs[id(m)] for m in modules]
                        grads = torch.autograd.grad(loss, [*weights, *xs], allow_unused=True)
                    for m, g_w, g_x in zip(
                        modules, grads[: len(modules)], grads[len(modules) :], strict=True
                    ):
                        key = id(m)
                        if g_w is not None:
                            g2 = g_w.detach().double().pow(2)
                            grad_sq[key] += g2.sum()
                            for k, p in enumerate(precisions):
                                fisher_w[key][k] += (g2 * w_err[key][p].double().pow(2)).sum()
                        if g_x is not None:
                            x = inputs[key].detach().float()
                            gx2 = g_x.detach().double().pow(2)
                            for k, p in enumerate(precisions):
                                dx = x_quant[key][p](x) - x
                                act[key][k] += (gx2 * dx.double().pow(2)).sum()
                    inputs.clear()
    finally:
        for h in hooks:
            h.remove()
    n = calibration.n_samples
    estimates: dict[str, dict[str, np.ndarray]] = {e: {} for e in ESTIMATES}
    for block in BLOCKS:
        per_layer = {e: np.zeros((len(layers), len(precisions))) for e in ESTIMATES}
        for i, blocks in enumerate(layers):
            for m in blocks[block]:
                key = id(m)
                activation = 0.5 * act[key].numpy() / n
                sq_err = np.array([float(w_err[key][p].double().pow(2).sum()) for p in precisions])
                mean_diag = float(grad_sq[key]) / n / _weight(m).numel()
                per_layer["fisher"][i] += 0.5 * fisher_w[key].numpy() / n + activation
                per_layer["trace"][i] += 0.5 * mean_diag * sq_err + activation
                per_layer["weight_error"][i] += sq_err
        for e in ESTIMATES:
            estimates[e][block] = per_layer[e]
    ranges_out = [{blk: [ranges[id(m)] for m in ms] for blk, ms in blocks.items()} for blocks in layers]
    return PrecisionSensitivity(tuple(precisions), estimates, ranges_out)


@contextlib.contextmanager
def fake_quantized(
    model: nn.Module, modules: list[nn.Module], precision: str, ranges: dict[int, tuple[float, float]]
) -> Iterator[nn.Module]:
    """`model` with `modules` computing at `precision` (weights rounded, inputs rounded on the way in),
    restored on exit: what quantising those projections alone does to the model's outputs."""
    saved = [_weight(m).detach().clone() for m in modules]
    hooks = []
    try:
        for m in modules:
            with torch.no_grad():
                _weight(m).add_(weight_error(m, precision).to(_weight(m).dtype))
            quant = input_quantizer(precision, *ranges[id(m)])
            hooks.append(m.register_forward_pre_hook(lambda _m, args, q=quant: (q(args[0]), *args[1:])))
        yield model
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for m, w in zip(modules, saved, strict=True):
                _weight(m).copy_(w)
