"""What makes one layer of a plan invalid for a layer of a model (`PrunePlan.check` reports all of it)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from hwprune.prunable._structure import LayerStructure

if TYPE_CHECKING:
    from hwprune.prunable._plan import LayerPlan

# Kept neurons per routed expert come in multiples of this: grouped-GEMM expert kernels need 16-byte
# rows in bf16 (a reloaded model with 13-neuron experts crashed in torch._grouped_mm).
EXPERT_WIDTH_STEP = 8


def layer_problems(lp: LayerPlan, layer: LayerStructure) -> list[str]:
    """Every reason `lp` cannot be applied to `layer`, each a phrase (none: it can)."""
    if lp.drop and (lp.heads or lp.mlp or lp.experts):
        return [f"dropped, but keeps {len(lp.heads)} heads and {len(lp.mlp)} MLP neurons"]
    if lp.drop:
        return []
    problems = expert_problems(lp, layer)
    for key, values, size in (("heads", lp.heads, layer.num_heads), ("mlp", lp.mlp, layer.mlp_width)):
        bad = sorted({v for v in values if not 0 <= v < size})
        if bad:
            problems.append(f"{key} indices {bad[:8]} out of range [0, {size})")
        dupes = sorted(v for v, n in Counter(values).items() if n > 1)
        if dupes:
            problems.append(f"{key} indices {dupes[:8]} appear more than once")
    rep = layer.heads_per_unit
    if rep > 1:
        kept = set(lp.heads)
        groups = {h // rep for h in kept}
        broken = sorted(g for g in groups if any(g * rep + r not in kept for r in range(rep)))
        if broken:
            g = broken[0]
            problems.append(
                f"heads break the KV grouping ({layer.num_kv_heads} groups of {rep} query heads): group {g} "
                f"needs all of {list(range(g * rep, (g + 1) * rep))} or none"
            )
    return problems


def expert_problems(lp: LayerPlan, layer: LayerStructure) -> list[str]:
    """What is wrong with the routed experts `lp` keeps, for a mixture-of-experts `layer`."""
    if not layer.is_moe:
        return ["keeps experts, but its MLP is dense"] if lp.experts is not None else []
    if lp.experts is None:
        return [f"a mixture-of-experts layer ({layer.num_experts} experts) needs 'experts' and 'expert_mlp'"]
    problems = []
    bad = sorted({e for e in lp.experts if not 0 <= e < layer.num_experts})
    if bad:
        problems.append(f"experts {bad[:8]} out of range [0, {layer.num_experts})")
    if len(set(lp.experts)) != len(lp.experts):
        problems.append("experts appear more than once")
    if len(lp.experts) < layer.top_k:
        problems.append(
            f"keeps {len(lp.experts)} experts, fewer than the {layer.top_k} each token is routed to (top_k)"
        )
    neurons = lp.expert_mlp or ()
    if len(neurons) != len(lp.experts):
        problems.append(f"expert_mlp has {len(neurons)} entries for {len(lp.experts)} kept experts")
    widths = {len(n) for n in neurons}
    if len(widths) > 1 or 0 in widths:
        problems.append(
            f"every kept expert must keep the same number (>= 1) of neurons, got {sorted(widths)} "
            "(a layer's experts share one weight tensor)"
        )
    elif widths and (width := widths.pop()) != layer.expert_width and width % EXPERT_WIDTH_STEP:
        problems.append(
            f"experts keep {width} neurons; a pruned expert width must be a multiple of {EXPERT_WIDTH_STEP} "
            "(grouped-GEMM expert kernels need 16-byte rows in bf16)"
        )
    for n in neurons:
        if any(not 0 <= v < layer.expert_width for v in n) or len(set(n)) != len(n):
            problems.append(
                f"expert_mlp {list(n)[:8]} has duplicates or indices out of range [0, {layer.expert_width})"
            )
            break
    return problems
