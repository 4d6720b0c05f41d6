"""Projections at a precision of their own: what a plan's per-layer `precision` does to a model.

A block's projections (Q, K, V, O of its attention; the MLP's up, gate and down) hold their weights
in the block's precision and compute there: each casts its input to that dtype on the way in and its
output back to the dtype it came in, so the rest of the model (embeddings, norms, softmax, residual
stream) stays in the model's own dtype. That is the mixed precision `torch.autocast` runs, per block,
and what the precision sensitivity of `hessian.precision_sensitivity` estimates: projections'
weights and inputs rounded, everything between them exact.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from hwprune.prunable._gates import couplings
from hwprune.prunable._plan import PLAN_PRECISIONS, PlanError, PrunePlan

log = logging.getLogger(__name__)

# Set on every projection `set_precisions` changed: its precision's name. Its two hooks are generic
# (to the weight's dtype and back), so a copy of the model (deepcopy copies hooks) computes the same.
_MARK = "_hwprune_precision"


def _cast_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    x = args[0]
    module._hwprune_input_dtype = x.dtype  # the output goes back to it
    return (x.to(module.weight.dtype), *args[1:])


def _cast_output(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
    dtype: torch.dtype = module.__dict__["_hwprune_input_dtype"]
    return out.to(dtype)


def block_precisions(model: nn.Module) -> list[tuple[str | None, str | None]]:
    """Per layer of `model`, the precision `set_precisions` gave its attention and MLP projections
    (None: the model's own dtype)."""
    out = []
    for lc in couplings(model):
        found = []
        for coupled in (lc.attention, lc.mlp):
            names = {getattr(c.module, _MARK, None) for c in coupled}
            found.append(names.pop() if len(names) == 1 else None)
        out.append((found[0], found[1]))
    return out


def set_precisions(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Put each kept layer's attention and MLP projections at the precision `plan` gives them, in
    place; layers without one (and a plan without any) leave the model as it is.

    Call it on the model the plan pruned (`apply_plan`, `pruned_copy`), after any recovery training:
    recovery trains in the model's own dtype, the deployed projections run at theirs. Setting the
    same plan twice changes nothing more.

    Raises:
        PlanError: A precision a plan cannot set, or a mixture-of-experts layer (not supported yet).
    """
    kept = [lp for lp in plan.layers if not lp.drop]
    layers = couplings(model)
    if len(kept) != len(layers):
        raise PlanError(f"the plan keeps {len(kept)} layers, the model has {len(layers)}")
    changed = 0
    for i, (lp, lc) in enumerate(zip(kept, layers, strict=True)):
        if lp.precision is None:
            continue
        if lc.experts is not None:
            raise PlanError(
                f"layer {i}: per-block precision of mixture-of-experts layers is not supported yet"
            )
        for coupled, name in zip((lc.attention, lc.mlp), lp.precision, strict=True):
            if name not in PLAN_PRECISIONS:
                raise PlanError(
                    f"layer {i}: precision {name!r} is not supported; valid choices: {list(PLAN_PRECISIONS)}"
                )
            for module in {id(c.module): c.module for c in coupled}.values():
                changed += _set(module, name)
    if changed:
        log.info("projections at their plan's precision: %s", _summary(plan))
    return model


def _set(module: nn.Module, name: str) -> int:
    """`module` at precision `name`; 1 where it changed."""
    previous = getattr(module, _MARK, None)
    if previous == name:
        return 0
    for param in module.parameters(recurse=False):
        param.data = param.data.to(PLAN_PRECISIONS[name])
    if previous is None:
        module.register_forward_pre_hook(_cast_input)
        module.register_forward_hook(_cast_output)
    setattr(module, _MARK, name)
    return 1


def _summary(plan: PrunePlan) -> str:
    """ "attention bf16 x4, fp32 x2; mlp bf16 x6": how many kept layers run each precision."""
    parts = []
    for k, block in enumerate(("attention", "mlp")):
        counts: dict[str, int] = {}
        for lp in plan.layers:
            if not lp.drop and lp.precision is not None:
                counts[lp.precision[k]] = counts.get(lp.precision[k], 0) + 1
        parts.append(f"{block} " + ", ".join(f"{p} x{n}" for p, n in counts.items()))
    return "; ".join(parts)
