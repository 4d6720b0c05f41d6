"""Depth pruning: a dropped layer leaves the model, exactly as skipping it would, in every family."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from hwprune import prunable
from tests.conftest import CASES, Case, count, run
from tests.test_kv_cache import DECODERS, cached_and_uncached
from tests.test_surgery import n_params


def depth_plan(
    model: torch.nn.Module, drop: set[int], *, seed: int = 0, uniform: bool = False
) -> prunable.PrunePlan:
    """Drops the layers in `drop`; the others keep random units (or, if `uniform`, every attention
    unit and the first half of the MLP, a shape every family's config can express)."""
    gen = torch.Generator().manual_seed(seed)
    structure = prunable.discover(model)
    heads, mlp = [], []
    for i, layer in enumerate(structure.layers):
        if i in drop:
            heads.append([])
            mlp.append([])
            continue
        if uniform:
            heads.append(range(layer.attention_units))
            mlp.append(range(layer.mlp_width // 2))
            continue
        n_units = count(gen, layer.attention_units)
        n_neurons = count(gen, layer.mlp_width)
        heads.append(torch.randperm(layer.attention_units, generator=gen)[:n_units].tolist())
        mlp.append(torch.randperm(layer.mlp_width, generator=gen)[:n_neurons].tolist())
    drops = [i in drop for i in range(structure.num_layers)]
    return prunable.PrunePlan.from_units(
        structure, prunable.model_ref(model), attention=heads, mlp=mlp, drop=drops
    )


def block_params(model: torch.nn.Module, layer: int) -> int:
    family = prunable._families.family_of(model)
    return sum(p.numel() for p in family.blocks(model)[layer].parameters())


@pytest.mark.parametrize("drop", [{0}, {1, 2}], ids=["first", "last-two"])
def test_dropping_layers_equals_skipping_them(case: Case, drop: set[int]) -> None:
    model = case.build()
    plan = depth_plan(model, drop, seed=len(drop))
    with prunable.gated(model) as gates:
        gates.keep_only(plan)
        skipped = run(case, model)
    structure = prunable.discover(model)
    kept = [i for i in range(structure.num_layers) if i not in drop]
    # Params after: the dropped blocks go whole; the kept ones lose their removed units.
    removed_units = sum(
        structure.layers[i].attention_units - len(plan.kept_units(structure)[i][0]) for i in kept
    )
    removed_neurons = sum(structure.layers[i].mlp_width - len(plan.layers[i].mlp) for i in kept)
    expected_params = (
        n_params(model)
        - sum(block_params(model, i) for i in drop)
        - removed_units * case.head_unit_params
        - removed_neurons * case.neuron_params
    )

    prunable.apply_plan(model, plan)
    assert (run(case, model) - skipped).abs().max().item() <= 1e-4
    after = prunable.discover(model)
    assert after.num_layers == len(kept) == model.config.num_hidden_layers
    assert [(la.num_heads, la.mlp_width) for la in after.layers] == [plan.kept_counts()[i] for i in kept]
    assert n_params(model) == expected_params


def test_dropped_layers_save_and_reload(case: Case, tmp_path: Path) -> None:
    model = case.build()
    plan = depth_plan(model, {1}, seed=4)
    prunable.apply_plan(model, plan)
    expected = run(case, model)
    prunable.save_pruned(model, plan, tmp_path)
    reloaded = prunable.load_pruned(tmp_path)
    assert prunable.discover(reloaded).num_layers == 2
    torch.testing.assert_close(run(case, reloaded), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["bert", "distilbert", "gpt2", "llama_gqa", "gemma2", "vit"])
def test_uniform_plan_with_a_dropped_layer_reloads_with_from_pretrained(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    model = case.build()
    plan = depth_plan(model, {0}, uniform=True)
    prunable.apply_plan(model, plan)
    prunable.save_pruned(model, plan, tmp_path)
    manifest = json.loads((tmp_path / "hwprune.json").read_text())
    assert manifest["config_expresses_shape"] is True
    auto = (
        getattr(transformers, type(model).__name__)
        .from_pretrained(str(tmp_path), local_files_only=True)
        .eval()
    )
    assert prunable.discover(auto).num_layers == 2
    torch.testing.assert_close(run(case, auto), run(case, model), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("drop", [{0}, {1}], ids=["layer0", "layer1"])
@pytest.mark.parametrize("name", DECODERS)
def test_cached_steps_equal_the_uncached_forward_after_dropping(name: str, drop: set[int]) -> None:
    case = CASES[name]
    model = case.build()
    pruned = prunable.apply_plan(copy.deepcopy(model), depth_plan(model, drop, seed=5))
    cached, uncached, cache = cached_and_uncached(case, pruned)
    assert cache.get_seq_length() == 9  # type: ignore[attr-defined]
    assert len(cache.layers) == 2  # type: ignore[attr-defined]
    torch.testing.assert_close(cached, uncached, rtol=1e-4, atol=1e-5)


def test_plan_files_say_which_layers_go(tmp_path: Path) -> None:
    model = CASES["llama_gqa"].build()
    plan = depth_plan(model, {1})
    text = plan.save(tmp_path / "plan.yaml").read_text()
    assert "- drop: true" in text
    again = prunable.PrunePlan.load(tmp_path / "plan.yaml")
    assert again == plan
    assert again.dropped() == [1]


def test_bad_depth_plans_fail_before_any_change() -> None:
    model = CASES["llama_gqa"].build()
    structure = prunable.discover(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    every = depth_plan(model, {0, 1, 2})
    with pytest.raises(prunable.PlanError, match="drops all 3 layers"):
        prunable.apply_plan(model, every)
    plan = depth_plan(model, {1})
    layers = list(plan.layers)
    layers[1] = prunable.LayerPlan(heads=(0, 1, 2, 3), mlp=(), drop=True)
    with pytest.raises(prunable.PlanError, match="layer 1: dropped, but keeps 4 heads"):
        prunable.apply_plan(model, prunable.PrunePlan(model=plan.model, layers=tuple(layers)))
    assert prunable.discover(model) == structure
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_drop_entry_is_exactly_drop_true(tmp_path: Path) -> None:
    model = CASES["bert"].build()
    data = depth_plan(model, {1}).to_dict()
    data["layers"][1] = {"drop": True, "heads": [0]}
    with pytest.raises(prunable.PlanError, match=r"layers\[1\] must have exactly the keys"):
        prunable.PrunePlan.from_dict(data)


def test_deberta_with_a_convolution_after_layer_0_keeps_layer_0() -> None:
    model = transformers.DebertaV2Model(
        transformers.DebertaV2Config(
            hidden_size=64,
            num_attention_heads=4,
            intermediate_size=96,
            num_hidden_layers=3,
            vocab_size=120,
            conv_kernel_size=3,
        )
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(prunable.PlanError, match="layer 0 cannot be dropped: the encoder's convolution"):
        prunable.apply_plan(model, depth_plan(model, {0}, seed=1))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    prunable.apply_plan(model, depth_plan(model, {1}, seed=1))  # any other layer may go
    assert prunable.discover(model).num_layers == 2


def test_a_shallower_decoder_is_timed_at_decode_against_its_own_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hwprune.cost_models import Workload
    from hwprune.search import _blocks, model_timer

    made: list[Any] = []
    real = _blocks.prefilled_cache
    monkeypatch.setattr(_blocks, "prefilled_cache", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    case = CASES["llama_gqa"]
    model = case.build()
    pruned = prunable.apply_plan(copy.deepcopy(model), depth_plan(model, {0}, seed=6))
    assert prunable.discover(pruned).num_layers == 2
    timer = model_timer(pruned, Workload(batch_size=2, dtype="fp32", phase="decode", kv_len=8), "cpu")
    (cache,) = made
    assert len(cache.layers) == 2  # the cache of the 2 layers kept, not of the dense model's 3
    for _ in range(3):  # each call is one step of seq_len (1) new tokens against 8 cached ones, then cropped
        assert timer() > 0
        assert cache.get_seq_length() == 8
        assert all(layer.keys.shape[-2] == 8 for layer in cache.layers)
