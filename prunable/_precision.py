"""Blocks at a precision of their own: what a plan's per-layer `precision` does to a model.

A layer whose plan says (attention a, MLP m) runs as a block at precision m: its weights, norms
and residual additions in m's dtype, its inputs (hidden states, attention mask, rotary tables) cast
to m on the way in and its output back to the model's dtype on the way out, so the residual stream
between layers, the embeddings and the head stay in the model's own dtype. Where a differs from m,
the attention's projections (Q, K, V, O) hold their weights in a and compute there (input cast in,
output back to m). That is what the cost models price (`cost_models.MixedPrecisionModel`: the block
at m, the attention's share at a) and what the profiler timed (whole blocks in one dtype).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hwprune.errors import PlanError
from hwprune.prunable._gates import blocks, couplings
from hwprune.prunable._plan import PLAN_PRECISIONS, PrunePlan
from hwprune.prunable._surgery import cast

log = logging.getLogger(__name__)

# Set on every module `set_precisions` changed (a layer, an attention projection): its precision's
# name. Its hooks are generic (to the module's dtype and back), so a copy of the model (deepcopy
# copies hooks) computes the same, and setting another precision later only converts the weights.
_MARK = "_hwprune_precision"
# Where a module's hooks keep the dtype its input came in (its output goes back to it).
_CAME_IN = "_hwprune_input_dtype"


def _to(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in `value` (nested in tuples and lists too) in `dtype`; the rest as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple | list):
        return type(value)(_to(v, dtype) for v in value)
    return value


def _first_float(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.dtype | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.dtype
    return None


def _cast_in(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    # The module's precision, not its first parameter's dtype: a layer's attention may differ.
    dtype = PLAN_PRECISIONS[module.__dict__[_MARK]]
    module.__dict__[_CAME_IN] = _first_float(args, kwargs)
    return _to(args, dtype), {k: _to(v, dtype) for k, v in kwargs.items()}


def _cast_out(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    came_in = module.__dict__.get(_CAME_IN)
    return out if came_in is None else _to(out, came_in)


def block_precisions(model: nn.Module) -> list[tuple[str | None, str | None]]:
    """Per layer of `model`, the (attention, MLP) precision `set_precisions` gave it (None: the
    model's own dtype)."""
    out = []
    for block, lc in zip(blocks(model), couplings(model), strict=True):
        rest = getattr(block, _MARK, None)
        names = {getattr(c.module, _MARK, rest) for c in lc.attention}
        out.append((names.pop() if len(names) == 1 else rest, rest))
    return out


def set_precisions(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Run each kept layer at the precisions `plan` gives its attention and the rest of it, in
    place; layers without one (and a plan without any) stay as they are.

    Call it on the model the plan pruned (`apply_plan`, `pruned_copy`), after any recovery training:
    recovery trains in the model's own dtype, the deployed blocks run at theirs. Setting the same
    plan twice changes nothing more.

    Raises:
        PlanError: A precision a plan cannot set, or a mixture-of-experts layer (not supported yet).
    """
    kept = [lp for lp in plan.layers if not lp.drop]
    layers = list(zip(blocks(model), couplings(model), strict=True))
    if len(kept) != len(layers):
        raise PlanError(f"the plan keeps {len(kept)} layers, the model has {len(layers)}")
    changed = 0
    for i, (lp, (block, lc)) in enumerate(zip(kept, layers, strict=True)):
        if lp.precision is None:
            continue
        if lc.experts is not None:
            raise PlanError(
                f"layer {i}: per-block precision of mixture-of-experts layers is not supported yet"
            )
        for name in lp.precision:
            if name not in PLAN_PRECISIONS:
                raise PlanError(
                    f"layer {i}: precision {name!r} is not supported; valid choices: {list(PLAN_PRECISIONS)}"
                )
        attention, rest = lp.precision
        changed += _set(block, rest)
        for module in {id(c.module): c.module for c in lc.attention}.values():
            changed += _set(module, attention)
    if changed:
        set_layers = [lp.precision for lp in kept if lp.precision is not None]
        log.info(
            "blocks at their plan's precision: %s",
            precision_summary([a for a, _ in set_layers], [m for _, m in set_layers]),
        )
    return model


def _set(module: nn.Module, name: str) -> int:
    """`module` (its parameters and persistent buffers) at precision `name`; 1 where it changed."""
    previous = getattr(module, _MARK, None)
    if previous == name:
        return 0
    cast(module, PLAN_PRECISIONS[name])
    if previous is None:
        module.register_forward_pre_hook(_cast_in, with_kwargs=True)
        module.register_forward_hook(_cast_out, with_kwargs=True)
    setattr(module, _MARK, name)
    return 1


def precision_summary(attention: Sequence[str], mlp: Sequence[str]) -> str:
    """ "attention bf16 x4 fp32 x2; mlp bf16 x6": per-layer precisions in one short line."""
    parts = []
    for block, names in (("attention", attention), ("mlp", mlp)):
        counts: dict[str, int] = {}
        for n in names:
            counts[n] = counts.get(n, 0) + 1
        parts.append(f"{block} " + " ".join(f"{p} x{c}" for p, c in counts.items()))
    return "; ".join(parts)
