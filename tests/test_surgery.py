"""Physical pruning equals gating: exact outputs, exact parameter counts, bad plans rejected first."""

from __future__ import annotations

import copy

import pytest
import torch

from hwprune import prunable
from tests.conftest import CASES, Case, count, expert_params_removed, random_experts, run


def random_plan(model: torch.nn.Module, seed: int, *, empty_layer: int | None = None) -> prunable.PrunePlan:
    """Random kept units per layer; `empty_layer` keeps no head and no neuron."""
    gen = torch.Generator().manual_seed(seed)
    structure = prunable.discover(model)
    heads, mlp = [], []
    for i, layer in enumerate(structure.layers):
        if i == empty_layer:
            heads.append([])
            mlp.append([])
            continue
        n_units = count(gen, layer.attention_units)
        n_neurons = count(gen, layer.mlp_width)
        heads.append(torch.randperm(layer.attention_units, generator=gen)[:n_units].tolist())
        mlp.append(torch.randperm(layer.mlp_width, generator=gen)[:n_neurons].tolist())
    experts, neurons = random_experts(structure, gen)
    return prunable.PrunePlan.from_units(
        structure, prunable.model_ref(model), attention=heads, mlp=mlp, experts=experts, expert_mlp=neurons
    )


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("empty_layer", [None, 1])
@pytest.mark.parametrize("seed", [0, 1])
def test_pruned_equals_gated_and_params_drop_exactly(case: Case, seed: int, empty_layer: int | None) -> None:
    model = case.build()
    structure = prunable.discover(model)
    plan = random_plan(model, seed, empty_layer=empty_layer)
    with prunable.gated(model) as gates:
        gates.keep_only(plan)
        gated_out = run(case, model)
    params_before = n_params(model)

    prunable.apply_plan(model, plan)
    pruned_out = run(case, model)

    assert pruned_out.shape == gated_out.shape
    assert (pruned_out - gated_out).abs().max().item() <= 1e-4
    removed_units = sum(la.attention_units for la in structure.layers) - sum(
        len(u) for u, _ in plan.kept_units(structure)
    )
    removed_neurons = sum(la.mlp_width for la in structure.layers) - sum(len(lp.mlp) for lp in plan.layers)
    expected = removed_units * case.head_unit_params + removed_neurons * case.neuron_params
    expected += case.attention_shared_params * (empty_layer is not None)
    expected += expert_params_removed(
        structure, [lp.experts for lp in plan.layers], [lp.expert_mlp or [] for lp in plan.layers]
    )
    assert params_before - n_params(model) == expected
    # The model describes itself by its new widths.
    after = prunable.discover(model)
    for layer, (heads_kept, mlp_kept) in zip(after.layers, plan.kept_counts(), strict=True):
        assert (layer.num_heads, layer.mlp_width) == (heads_kept, mlp_kept)


def test_empty_layer_passes_the_residual_through() -> None:
    """A pre-norm block with no heads and no neurons and no biases is the identity."""
    case = CASES["llama_gqa"]
    model = case.build()
    plan = random_plan(model, 0, empty_layer=2)
    prunable.apply_plan(model, plan)
    block = model.layers[2]
    x = torch.randn(2, 5, 64)
    pos = model.rotary_emb(x, torch.arange(5)[None])
    with torch.no_grad():
        assert torch.equal(block(x, position_embeddings=pos), x)


def test_pruned_model_still_trains(case: Case) -> None:
    """Sliced parameters are ordinary leaf parameters: gradients flow and have the new shapes."""
    model = case.build()
    prunable.apply_plan(model, random_plan(model, 2))
    out = case.output(model(**case.inputs(torch.Generator().manual_seed(0))))
    out.pow(2).mean().backward()
    for p in model.parameters():
        if p.grad is not None:
            assert p.grad.shape == p.shape


def test_uniform_gqa_plan_updates_config() -> None:
    case = CASES["llama_gqa"]
    model = case.build()
    structure = prunable.discover(model)
    plan = prunable.PrunePlan.from_units(
        structure, prunable.model_ref(model), attention=[[1]] * 3, mlp=[list(range(0, 80, 2))] * 3
    )
    prunable.apply_plan(model, plan)
    assert model.config.num_attention_heads == 4
    assert model.config.num_key_value_heads == 1
    assert model.config.head_dim == 8
    assert model.config.intermediate_size == 40


def test_plan_breaking_kv_groups_is_rejected_before_any_change() -> None:
    model = CASES["qwen2"].build()
    structure = prunable.discover(model)
    dense = prunable.PrunePlan.dense(structure, prunable.model_ref(model))
    layers = list(dense.layers)
    layers[0] = prunable.LayerPlan(heads=(0, 1, 2, 5), mlp=layers[0].mlp)  # group 1 split
    bad = prunable.PrunePlan(model=dense.model, layers=tuple(layers))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(prunable.PlanError, match=r"layer 0: heads break the KV grouping \(2 groups of 4"):
        prunable.apply_plan(model, bad)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("heads", "mlp", "message"),
    [
        ((0, 1, 9), None, r"layer 0: heads indices \[9\] out of range \[0, 4\)"),
        ((0, 0, 1), None, r"layer 0: heads indices \[0\] appear more than once"),
        (None, (-1, 3), r"layer 0: mlp indices \[-1\] out of range \[0, 96\)"),
    ],
)
def test_bad_indices_fail_before_any_weight_changes(
    heads: tuple[int, ...] | None, mlp: tuple[int, ...] | None, message: str
) -> None:
    model = CASES["bert"].build()
    dense = prunable.PrunePlan.dense(prunable.discover(model), prunable.model_ref(model))
    layers = list(dense.layers)
    layers[0] = prunable.LayerPlan(heads=heads or layers[0].heads, mlp=mlp or layers[0].mlp)
    bad = prunable.PrunePlan(model=dense.model, layers=tuple(layers))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(prunable.PlanError, match=message):
        prunable.apply_plan(model, bad)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_plan_for_another_model_is_rejected() -> None:
    bert, gpt2 = CASES["bert"].build(), CASES["gpt2"].build()
    plan = random_plan(bert, 0)
    with pytest.raises(prunable.PlanError, match="plan was made for a different model"):
        prunable.apply_plan(gpt2, plan)
    # Same architecture, other weights: caught by the weights fingerprint.
    other = CASES["bert"].build()
    with torch.no_grad():
        other.encoder.layer[0].output.dense.weight.add_(1.0)
    with pytest.raises(prunable.PlanError, match="plan was made for other weights"):
        prunable.apply_plan(other, plan)
    prunable.apply_plan(other, plan, check_weights=False)  # explicitly allowed
    assert prunable.discover(other).layers[0].num_heads == len(plan.layers[0].heads)


def test_pruned_copy_equals_pruning_a_deep_copy_and_shares_nothing_with_the_dense_model(case: Case) -> None:
    model = case.build()
    plan = random_plan(model, 0, empty_layer=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = run(case, prunable.apply_plan(copy.deepcopy(model), plan))

    pruned = prunable.pruned_copy(model, plan)

    torch.testing.assert_close(run(case, pruned), expected, rtol=0, atol=0)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the dense model is as it was
    dense = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    assert not any(t.untyped_storage().data_ptr() in dense for t in (*pruned.parameters(), *pruned.buffers()))
    # Training the copy (recovery does) cannot reach the dense model.
    with torch.no_grad():
        for p in pruned.parameters():
            p.add_(1.0)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_phi3_layers_read_their_own_head_counts_and_the_shared_config_for_the_rest() -> None:
    case = CASES["phi3"]
    model = case.build()
    structure = prunable.discover(model)
    plan = prunable.PrunePlan.from_units(
        structure,
        prunable.model_ref(model),
        attention=[[0], [0, 1], [1]],
        mlp=[range(80), range(40), range(80)],
    )
    prunable.apply_plan(model, plan)
    layers = model.model.layers
    assert [la.self_attn.config.num_attention_heads for la in layers] == [4, 8, 4]
    assert model.config.num_attention_heads == 8  # the shared config still describes the dense model
    model.config.hwprune_probe = "seen"  # e.g. set_attn_implementation: every layer must follow it
    assert all(la.self_attn.config.hwprune_probe == "seen" for la in layers)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(run(case, twin), run(case, model), rtol=0, atol=0)
    assert twin.model.layers[0].self_attn.config.shared is twin.config
