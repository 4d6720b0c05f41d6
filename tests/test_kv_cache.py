"""Pruned decoders generate the same with a KV cache as without, empty attention layers included."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from hwprune import prunable
from tests.conftest import CASES, Case, count

DECODERS = [
    "gpt2",
    "gpt_neox",
    "phi3",
    "llama_gqa",
    "qwen2",
    "mistral",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "granite",
    "olmo",
    "stablelm",
    "falcon_mha",
    "falcon_mqa",
    "falcon_gqa",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
]


def plan_with_empty_attention(model: torch.nn.Module, empty: int | None, seed: int) -> prunable.PrunePlan:
    """Random kept units per layer; layer `empty` keeps no attention at all."""
    structure = prunable.discover(model)
    gen = torch.Generator().manual_seed(seed)
    heads, mlp = [], []
    for i, layer in enumerate(structure.layers):
        n_units = 0 if i == empty else count(gen, layer.attention_units)
        heads.append(sorted(torch.randperm(layer.attention_units, generator=gen)[:n_units].tolist()))
        width = count(gen, layer.mlp_width)
        mlp.append(sorted(torch.randperm(layer.mlp_width, generator=gen)[:width].tolist()))
    ref = prunable.model_ref(model, with_weights=False)
    return prunable.PrunePlan.from_units(structure, ref, attention=heads, mlp=mlp)


def cache_of(out: object) -> object:
    return getattr(out, "cache", None) or out.past_key_values  # type: ignore[attr-defined]


def cached_and_uncached(case: Case, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Outputs of the last 4 of 9 positions: prefill of 6 then 3 cached one-token steps, and one
    uncached forward; and the cache. Each (B, 4, D)."""
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = case.output(model(input_ids=ids, use_cache=False))  # (B, T, D)
        out = model(input_ids=ids[:, :6], use_cache=True)
        cache = cache_of(out)
        steps = [case.output(out)[:, -1]]
        for t in range(6, 9):  # three decode steps of one token each
            out = model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(case.output(out)[:, -1])
    return torch.stack(steps, 1), full[:, 5:], cache


@pytest.mark.parametrize("empty", [0, 1, None], ids=["layer0-empty", "layer1-empty", "no-empty"])
@pytest.mark.parametrize("name", DECODERS)
def test_cached_steps_equal_the_uncached_forward(name: str, empty: int | None) -> None:
    case: Case = CASES[name]
    model = case.build()
    pruned = prunable.apply_plan(copy.deepcopy(model), plan_with_empty_attention(model, empty, seed=3))
    cached, uncached, cache = cached_and_uncached(case, pruned)
    assert cache.get_seq_length() == 9  # type: ignore[attr-defined]
    torch.testing.assert_close(cached, uncached, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "qwen2"])
def test_generate_with_cache_equals_without_when_layer0_keeps_no_attention(name: str) -> None:
    model = CASES[name].build()
    pruned = prunable.apply_plan(copy.deepcopy(model), plan_with_empty_attention(model, 0, seed=5))
    ids = torch.randint(0, 120, (2, 5), generator=torch.Generator().manual_seed(1))
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = pruned.generate(ids, use_cache=True, **kwargs)
        uncached = pruned.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (2, 11)
    assert torch.equal(cached, uncached)


def test_a_static_cache_refuses_a_layer_without_heads() -> None:
    model = CASES["qwen2"].build()
    cache = transformers.StaticCache(config=model.config, max_cache_len=16)
    empty = torch.zeros(1, 0, 2, 8)  # (B, 0 heads, T, hd)
    with pytest.raises(
        ValueError, match="layer 0 keeps no attention heads, which a StaticLayer KV cache cannot hold"
    ):
        prunable.append_kv(cache, empty, empty, 0)


def test_append_kv_counts_the_tokens_of_a_headless_layer() -> None:
    cache = transformers.DynamicCache()
    empty = torch.zeros(2, 0, 5, 8)  # (B, 0 heads, T, hd)
    prunable.append_kv(cache, empty, empty, 0)
    prunable.append_kv(cache, torch.ones(2, 2, 5, 8), torch.ones(2, 2, 5, 8), 1)
    assert cache.get_seq_length(0) == 5 and cache.get_seq_length(1) == 5
    prunable.append_kv(cache, empty[:, :, :1], empty[:, :, :1], 0)
    assert cache.get_seq_length() == 6
    plain = transformers.DynamicCache()
    plain.update(empty, empty, 0)
    assert plain.get_seq_length() == 0  # what transformers reports without append_kv


def record_decode_calls(model: torch.nn.Module) -> list[tuple[tuple[int, ...], int]]:
    """Wrap `model.forward` to record each call's (input_ids shape, cached tokens)."""
    seen: list[tuple[tuple[int, ...], int]] = []
    forward = model.forward

    def recorded(*args, **kwargs):  # type: ignore[no-untyped-def]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen.append((tuple(kwargs["input_ids"].shape), cache.get_seq_length()))
        return forward(*args, **kwargs)

    model.forward = recorded  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "phi3", "falcon_mqa", "falcon_gqa", "llama_gqa"])
def test_every_decoder_family_is_timed_at_decode(name: str) -> None:
    """`hwprune-apply` measures decode plans of every decoder family (it refused all but LLaMA's)."""
    from hwprune import cost_models
    from hwprune.search._blocks import model_timer
    from tests.test_surgery import random_plan

    model = CASES[name].build()
    pruned = prunable.pruned_copy(model, random_plan(model, 1, empty_layer=1), check_weights=False)
    workload = cost_models.Workload(batch_size=2, phase="decode", kv_len=16, dtype="fp32")
    for m in (model, pruned):
        seen = record_decode_calls(m)
        step = model_timer(m, workload, "cpu")
        times = [step() for _ in range(3)]
        # Every timed call is one new token per sequence against the same 16 cached tokens.
        assert seen == [((2, 1), 16)] * 3 and min(times) > 0
