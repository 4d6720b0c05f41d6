"""Structure discovery for every supported family, and a clear error for the rest."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import transformers

from hwprune import prunable
from tests.conftest import CASES, Case

EXPECTED = {
    "bert": (4, 4, 16, 96, False),
    "roberta": (4, 4, 16, 96, False),
    "distilbert": (4, 4, 16, 96, False),
    "vit": (4, 4, 16, 96, False),
    "vit_classifier": (4, 4, 16, 96, False),
    "deit": (4, 4, 16, 96, False),
    "gpt2": (4, 4, 16, 96, False),
    "gpt_neox": (4, 4, 16, 96, False),
    "modernbert": (4, 4, 16, 96, True),
    "deberta_v2": (4, 4, 16, 96, False),
    "deberta_v3": (4, 4, 16, 96, False),
    "llama_gqa": (8, 2, 8, 80, True),
    "qwen2": (8, 2, 8, 80, True),
    "mistral": (8, 2, 8, 80, True),
    "phi3": (8, 2, 8, 80, True),
    **dict.fromkeys(
        ["qwen3", "gemma", "gemma2", "gemma3_text", "granite", "olmo", "stablelm"], (8, 2, 8, 80, True)
    ),
    "mixtral": (8, 2, 8, 0, True),
    "falcon_mha": (8, 8, 8, 96, False),
    "falcon_mqa": (8, 1, 8, 96, False),
    "falcon_gqa": (8, 2, 8, 96, False),
    "qwen2_moe": (8, 2, 8, 40, True),
    "qwen3_moe": (8, 2, 8, 0, True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_discover_reads_every_layer(name: str) -> None:
    structure = prunable.discover(CASES[name].build())
    assert structure.num_layers == 3
    assert structure.hidden_size == 64
    for layer in structure.layers:
        assert (
            layer.num_heads,
            layer.num_kv_heads,
            layer.head_dim,
            layer.mlp_width,
            layer.gated_mlp,
        ) == EXPECTED[name]


def test_gqa_units_are_kv_groups() -> None:
    layer = prunable.discover(CASES["llama_gqa"].build()).layers[0]
    assert layer.attention_units == 2
    assert layer.heads_per_unit == 4
    assert layer.units("attention") == 2 and layer.units("mlp") == 80
    with pytest.raises(ValueError, match="unknown unit kind 'experts'"):
        layer.units("experts")  # type: ignore[arg-type]


def test_fingerprint_tracks_architecture_not_task_head() -> None:
    base = prunable.discover(CASES["vit"].build())
    classifier = prunable.discover(CASES["vit_classifier"].build())
    assert base.model_class != classifier.model_class
    assert base.fingerprint() == classifier.fingerprint()
    assert base.fingerprint() != prunable.discover(CASES["gpt2"].build()).fingerprint()


def test_unsupported_model_names_class_and_supported_families() -> None:
    model = transformers.T5Model(
        transformers.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=50)
    )
    with pytest.raises(
        ValueError, match=r"T5Model \(model_type='t5'\).*supported model types: \[.*'bert'.*'llama'"
    ):
        prunable.discover(model)
    with pytest.raises(ValueError, match="not a supported architecture"):
        prunable.discover(torch.nn.Linear(3, 3))


def test_cross_attention_is_rejected_not_half_described() -> None:
    config = transformers.BertConfig(
        hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=1, vocab_size=50
    )
    config.is_decoder = True
    config.add_cross_attention = True
    with pytest.raises(ValueError, match="add_cross_attention=True is not supported"):
        prunable.discover(transformers.BertModel(config))


def test_bundled_minilm_structure(minilm: torch.nn.Module) -> None:
    structure = prunable.discover(minilm)
    assert structure.num_layers == 6
    assert structure.hidden_size == 384
    assert all((la.num_heads, la.head_dim, la.mlp_width) == (12, 32, 1536) for la in structure.layers)
    assert structure.total_units("attention") == 72


TINY = {
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_hidden_layers": 1,
    "vocab_size": 50,
    "intermediate_size": 48,
}
REFUSED_MODELS = {
    "olmo2": lambda: transformers.Olmo2Model(transformers.Olmo2Config(**TINY, num_key_value_heads=2)),
}


@pytest.mark.parametrize("model_type", sorted(REFUSED_MODELS))
def test_refused_families_say_why(model_type: str) -> None:
    from hwprune.prunable._families import REFUSED

    model = REFUSED_MODELS[model_type]()
    assert model.config.model_type == model_type
    reason = REFUSED[model_type]
    with pytest.raises(
        ValueError, match=rf"\(model_type='{model_type}'\) is not supported: {re.escape(reason)}"
    ):
        prunable.discover(model)


def test_stablelm_with_per_head_layernorms_is_refused_with_the_reason() -> None:
    model = transformers.StableLmModel(transformers.StableLmConfig(**TINY, qk_layernorm=True))
    with pytest.raises(ValueError, match="qk_layernorm=True is not supported: its per-head LayerNorms"):
        prunable.discover(model)


def test_falcon_with_alibi_is_refused_with_the_reason() -> None:
    model = transformers.FalconModel(
        transformers.FalconConfig(
            hidden_size=32, num_attention_heads=4, num_hidden_layers=1, vocab_size=50, alibi=True
        )
    )
    with pytest.raises(ValueError, match="alibi=True is not supported: the model builds one ALiBi slope per"):
        prunable.discover(model)


RMSNORM_FAMILIES = {
    "llama_gqa", "qwen2", "mistral", "phi3", "qwen3", "gemma", "gemma2", "gemma3_text", "granite",
    "mixtral", "qwen2_moe", "qwen3_moe",
}  # fmt: skip


def test_each_family_reports_the_norm_its_blocks_use(case: Case) -> None:
    """Read from the modules, not guessed from the family: Phi-3 is priced with RMSNorm, OLMo's
    parameter-free norm and StableLM's with LayerNorm (the LLaMA adapter serves all three)."""
    structure = prunable.discover(case.build())
    assert structure.norm == ("rmsnorm" if case.name in RMSNORM_FAMILIES else "layernorm")
    assert structure.fingerprint() == dataclasses.replace(structure, norm="other").fingerprint()
