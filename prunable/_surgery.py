"""Physical pruning: slice the weights a plan removes and tell each block its new widths."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hwprune.errors import PlanError
from hwprune.prunable._discover import discover, weights_fingerprint
from hwprune.prunable._families import family_of
from hwprune.prunable._plan import LayerPlan, PrunePlan

log = logging.getLogger(__name__)


def apply_plan(model: nn.Module, plan: PrunePlan, *, check_weights: bool = True) -> nn.Module:
    """Prune `model` in place to the units `plan` keeps, and return it.

    The whole plan is checked first (structure fingerprint, index ranges, duplicates, KV grouping
    and, with `check_weights`, the weights fingerprint), so a bad plan raises `PlanError` before any
    weight changes. Layers the plan drops are removed from the model, and the config's layer count
    with them. Where the family's config can express the result (uniform widths), the config is
    updated too, so `save_pretrained` output reloads with `AutoModel.from_pretrained`.
    """
    family = family_of(model)
    structure = discover(model)
    wanted = plan.model.weights_fingerprint
    plan.check(
        structure,
        weights_fingerprint=weights_fingerprint(model) if check_weights and wanted is not None else None,
    )
    if plan.dropped() and (problem := family.drop_problem(model, plan.dropped())):
        raise PlanError(f"invalid plan: {problem}")
    kept = [i for i, lp in enumerate(plan.layers) if not lp.drop]
    slice_blocks(model, {i: plan.layers[i] for i in kept})
    if len(kept) < structure.num_layers:
        family.drop_blocks(model, kept)
    pruned = discover(model)
    updates = family.config_updates(model.config, pruned)
    for key, value in (updates or {}).items():
        setattr(model.config, key, value)
    log.info("pruned %s -> %s", structure.describe(), pruned.describe())
    return model


def slice_blocks(model: nn.Module, kept: dict[int, LayerPlan]) -> None:
    """Slice block i of `model` to the units `kept[i]` keeps, unchecked."""
    family = family_of(model)
    structure = discover(model)
    blocks = family.blocks(model)
    for i, lp in kept.items():
        block, layer = blocks[i], structure.layers[i]
        units, neurons = lp.kept_units(layer)
        lc = family.couplings(block, model.config)
        for coupling in lc.attention:
            coupling.keep(units)
        for coupling in lc.mlp:
            coupling.keep(neurons)
        if lc.experts is not None:
            lc.experts.keep(*lp.kept_experts())
        family.set_widths(
            block,
            model.config,
            heads=len(units) * layer.heads_per_unit,
            kv_heads=len(units),
            mlp=len(neurons),
        )


def pruned_copy(model: nn.Module, plan: PrunePlan, *, check_weights: bool = True) -> nn.Module:
    """A pruned copy of `model`, which stays as it is; never a second full-size copy in memory.

    `apply_plan(copy.deepcopy(model), plan)` holds two dense models at its peak. Here the copy starts
    by sharing every tensor with `model`, the plan's slices give it tensors of its own, and only what
    the plan leaves whole (embeddings, norms, heads) is then cloned: the peak is the dense model plus
    the pruned one.
    """
    # Parameters over the dense storage (the plan slices them into their own); buffers are small.
    shared = converted_copy(model, params=lambda t: t, buffers=lambda t: t.clone())
    pruned = apply_plan(shared, plan, check_weights=check_weights)
    dense_storage = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for p in pruned.parameters():
        if p.untyped_storage().data_ptr() in dense_storage:
            p.data = p.data.clone()
    return pruned


def converted_copy(
    model: nn.Module,
    *,
    params: Callable[[torch.Tensor], torch.Tensor],
    buffers: Callable[[torch.Tensor], torch.Tensor],
) -> nn.Module:
    """A copy of `model` whose parameters hold `params(p.data)` and whose buffers `buffers(b)`.

    Each tensor is converted on its own (deepcopy takes the memo's entry for any object it has), so
    a copy in another dtype or over shared storage never passes through a full deep copy.
    """
    memo: dict[int, Any] = {id(p): nn.Parameter(params(p.data), p.requires_grad) for p in model.parameters()}
    memo |= {id(b): buffers(b) for b in model.buffers()}
    return copy.deepcopy(model, memo)


def pruned_block(model: nn.Module, layer: int, *, units: int, neurons: int) -> nn.Module:
    """A copy of block `layer` keeping its first `units` attention units and `neurons` MLP neurons.

    Which units are kept does not change a block's latency, only how many; profilers time these
    copies to measure real layers of the model at any width without pruning the model itself.
    """
    import copy

    family = family_of(model)
    block = copy.deepcopy(family.blocks(model)[layer])
    structure = discover(model).layers[layer]
    if not (0 <= units <= structure.attention_units and 0 <= neurons <= structure.mlp_width):
        raise PlanError(
            f"layer {layer} has {structure.attention_units} attention units and {structure.mlp_width} neurons; "
            f"asked to keep {units} and {neurons}"
        )
    import torch

    lc = family.couplings(block, model.config)
    for coupling in lc.attention:
        coupling.keep(torch.arange(units))
    for coupling in lc.mlp:
        coupling.keep(torch.arange(neurons))
    family.set_widths(
        block, model.config, heads=units * structure.heads_per_unit, kv_heads=units, mlp=neurons
    )
    return block


def cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model` with its parameters and persistent floating-point buffers in `dtype`, in place.

    Buffers a model computes for itself (rotary frequencies, not saved) keep their dtype, as
    `from_pretrained(dtype=...)` leaves them: a model cast here and the same model saved and reloaded
    compute the same.
    """
    for module in model.modules():
        for param in module.parameters(recurse=False):
            param.data = param.data.to(dtype)
        persistent = set(module.state_dict(keep_vars=True))
        for name, buffer in module.named_buffers(recurse=False):
            if name in persistent and buffer.is_floating_point():
                setattr(module, name, buffer.to(dtype))
    return model
