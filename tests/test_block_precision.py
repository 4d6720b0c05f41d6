"""A plan's per-layer block precisions: set on the model, saved and reloaded, refused when unknown."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from hwprune import prunable
from tests.conftest import CASES, run
from tests.test_surgery import random_plan

DENSE_CASES = sorted(
    n for n, c in CASES.items() if not any(la.is_moe for la in prunable.discover(c.build()).layers)
)


def mixed(plan: prunable.PrunePlan, seed: int) -> prunable.PrunePlan:
    """`plan` with each layer's attention and MLP at a random one of fp32, bf16 and fp16."""
    gen = torch.Generator().manual_seed(seed)
    names = list(prunable.PLAN_PRECISIONS)
    pick = [names[int(i)] for i in torch.randint(0, len(names), (2 * len(plan.layers),), generator=gen)]
    return plan.with_precisions(pick[::2], pick[1::2])


def projections(model: nn.Module) -> list[tuple[list[nn.Module], list[nn.Module]]]:
    return [
        ([c.module for c in lc.attention], [c.module for c in lc.mlp]) for lc in prunable.couplings(model)
    ]


@pytest.mark.parametrize("name", DENSE_CASES)
def test_layers_compute_at_their_plan_s_precisions_between_a_stream_in_the_model_s_dtype(name: str) -> None:
    case = CASES[name]
    model = case.build()
    plan = mixed(random_plan(model, 3), seed=5)
    prunable.apply_plan(model, plan)
    fp32_out = run(case, model)
    prunable.set_precisions(model, plan)
    kept = [lp.precision for lp in plan.layers if not lp.drop]
    layers = prunable.blocks(model)
    dtype = prunable.PLAN_PRECISIONS
    seen: dict[str, list] = {"layer out": [], "attention in": [], "mlp in": []}
    hooks = []
    for k, (layer, (att, mlp)) in enumerate(zip(layers, projections(model), strict=True)):
        precision = kept[k]
        assert precision is not None
        a, m = (dtype[p] for p in precision)
        # Weights: the attention's projections at a, everything else of the layer at m.
        own = {id(p) for mod in att for p in mod.parameters()}
        assert all(p.dtype == a for mod in att for p in mod.parameters())
        assert all(p.dtype == m for p in layer.parameters() if id(p) not in own)
        hooks.append(
            layer.register_forward_hook(lambda _m, _a, out: seen["layer out"].append(_first(out).dtype))
        )
        for mod, key, want in [(x, "attention in", a) for x in att] + [(x, "mlp in", m) for x in mlp]:
            hooks.append(
                mod.register_forward_pre_hook(
                    lambda _m, args, k=key, w=want: seen[k].append(args[0].dtype == w)
                )
            )
    inside = {id(p) for layer in layers for p in layer.parameters()}
    assert all(
        p.dtype == torch.float32 for p in model.parameters() if id(p) not in inside
    )  # embeddings, heads
    out = run(case, model)
    for h in hooks:
        h.remove()
    # Each projection computes at its block's precision; the stream between layers stays fp32.
    assert seen["attention in"] and all(seen["attention in"]) and all(seen["mlp in"])
    assert set(seen["layer out"]) == {torch.float32}
    assert out.dtype == fp32_out.dtype and not torch.equal(out, fp32_out)
    cosine = nn.functional.cosine_similarity(
        out.flatten().double(), fp32_out.flatten().double(), dim=0
    ).item()
    assert cosine > 0.99 and math.isfinite(cosine)


def _first(out: object) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]  # type: ignore[index]


def _copy(model: nn.Module) -> nn.Module:
    return prunable.converted_copy(model, params=lambda t: t.clone(), buffers=lambda t: t.clone())


def test_fp32_everywhere_changes_nothing_and_setting_twice_changes_nothing_more() -> None:
    case = CASES["bert"]
    model = case.build()
    plan = random_plan(model, 1)
    prunable.apply_plan(model, plan)
    expected = run(case, model)
    n = len(plan.layers)
    prunable.set_precisions(model, plan.with_precisions(["fp32"] * n, ["fp32"] * n))
    torch.testing.assert_close(run(case, model), expected, rtol=0, atol=0)
    half = plan.with_precisions(["bf16"] * n, ["fp16"] * n)
    prunable.set_precisions(model, half)
    once = run(case, model)
    prunable.set_precisions(model, half)
    torch.testing.assert_close(run(case, model), once, rtol=0, atol=0)
    marked = [*prunable.blocks(model), *(m for a, _ in projections(model) for m in a)]
    assert {len(m._forward_pre_hooks) for m in marked} == {1}  # one input cast each, however often set


@pytest.mark.parametrize("name", ["bert", "llama_gqa", "gpt2"])
def test_a_mixed_precision_model_saves_and_reloads_identically(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    model = case.build()
    plan = mixed(random_plan(model, 2, empty_layer=0), seed=9)
    prunable.apply_plan(model, plan)
    prunable.set_precisions(model, plan)
    expected = run(case, model)
    prunable.save_pruned(model, plan, tmp_path)
    reloaded = prunable.load_pruned(tmp_path)
    assert prunable.block_precisions(reloaded) == prunable.block_precisions(model)
    torch.testing.assert_close(run(case, reloaded), expected, rtol=0, atol=0)
    assert prunable.PrunePlan.load(tmp_path / "hwprune_plan.yaml") == plan


def test_plan_files_keep_block_precisions_and_refuse_unknown_ones(tmp_path: Path) -> None:
    model = CASES["bert"].build()
    plan = mixed(random_plan(model, 4), seed=1)
    assert plan.mixed_precision and not random_plan(model, 4).mixed_precision
    path = plan.save(tmp_path / "plan.yaml")
    assert "precision: {attention:" in path.read_text() or "precision:\n" in path.read_text()
    assert prunable.PrunePlan.load(path) == plan
    bad = (
        path.read_text()
        .replace("attention: bf16", "attention: int4", 1)
        .replace("attention: fp16", "attention: int4", 1)
    )
    (tmp_path / "bad.yaml").write_text(bad)
    with pytest.raises(
        prunable.PlanError,
        match=r"precision 'int4' is not supported; valid choices: \['fp32', 'bf16', 'fp16'\]",
    ):
        prunable.PrunePlan.load(tmp_path / "bad.yaml")
    n = len(plan.layers)
    with pytest.raises(prunable.PlanError, match="'fp8' is not supported"):
        plan.with_precisions(["fp8"] * n, ["fp32"] * n)
    with pytest.raises(prunable.PlanError, match="one precision per layer"):
        plan.with_precisions(["fp32"], ["fp32"])
