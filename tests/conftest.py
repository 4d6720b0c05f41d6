"""Tiny random-weight models of every supported family, with inputs that exercise masks and GQA."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
import transformers
from torch import nn

if TYPE_CHECKING:
    from hwprune.search.config import AppConfig

SHARED_STSB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stsb"


@dataclass
class Case:
    """A family under test: how to build it, feed it and read its output."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], dict[str, torch.Tensor]]
    output: Callable[[object], torch.Tensor]
    # Parameters one unit owns (for the exact parameter-count check), from the config alone.
    head_unit_params: int
    neuron_params: int
    # Parameters of an attention sub-layer that no unit owns and that go with its last unit
    # (per-head q/k norms shared by all heads).
    attention_shared_params: int = 0


def count(gen: torch.Generator, width: int) -> int:
    """A random number of units to keep, in [1, width] (0 for a width of 0)."""
    return int(torch.randint(1, width + 1, (1,), generator=gen)) if width else 0


def random_experts(
    structure: object, gen: torch.Generator
) -> tuple[list[list[int] | None], list[list[list[int]] | None]]:
    """Per layer, random kept experts (at least top_k) and as many random neurons for each; None
    for dense layers."""
    experts: list[list[int] | None] = []
    neurons: list[list[list[int]] | None] = []
    for layer in structure.layers:  # type: ignore[attr-defined]
        if not layer.is_moe:
            experts.append(None)
            neurons.append(None)
            continue
        k = int(torch.randint(layer.top_k, layer.num_experts + 1, (1,), generator=gen))
        kept = sorted(torch.randperm(layer.num_experts, generator=gen)[:k].tolist())
        width = 8 * count(gen, layer.expert_width // 8)  # pruned expert widths are multiples of 8
        experts.append(kept)
        neurons.append([torch.randperm(layer.expert_width, generator=gen)[:width].tolist() for _ in kept])
    return experts, neurons


def expert_params_removed(structure: object, experts: list, neurons: list) -> int:
    """Parameters a plan's expert choices remove: 3 * hidden per expert neuron, plus a router row
    per expert."""
    hidden = structure.hidden_size  # type: ignore[attr-defined]
    removed = 0
    for layer, kept, widths in zip(structure.layers, experts, neurons, strict=True):  # type: ignore[attr-defined]
        if kept is None:
            continue
        dense = layer.num_experts * layer.expert_width
        removed += 3 * hidden * (dense - sum(len(w) for w in widths)) + hidden * (
            layer.num_experts - len(kept)
        )
    return removed


def _text_inputs(vocab: int, *, padded: bool) -> Callable[[torch.Generator], dict[str, torch.Tensor]]:
    def make(gen: torch.Generator) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, vocab, (3, 11), generator=gen)
        out = {"input_ids": ids}
        if padded:
            mask = torch.ones_like(ids)
            mask[1, 7:] = 0  # one padded row, so attention masks matter
            out["attention_mask"] = mask
        return out

    return make


def _hidden(out: object) -> torch.Tensor:
    return out.last_hidden_state  # type: ignore[attr-defined]


def _logits(out: object) -> torch.Tensor:
    return out.logits  # type: ignore[attr-defined]


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        model = build().eval()
        # Random init leaves biases at zero; make them count in the exactness checks.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
        return model

    return make


H = 64


def _cases() -> list[Case]:
    bert_cfg = dict(
        hidden_size=H, num_attention_heads=4, intermediate_size=96, num_hidden_layers=3, vocab_size=120
    )
    hd = H // 4
    bert_head = 3 * (H * hd + hd) + hd * H
    bert_neuron = 2 * H + 1
    vit_cfg = dict(
        hidden_size=H,
        num_attention_heads=4,
        intermediate_size=96,
        num_hidden_layers=3,
        image_size=32,
        patch_size=8,
    )
    llama_cfg = dict(
        hidden_size=H,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=80,
        num_hidden_layers=3,
        vocab_size=120,
        max_position_embeddings=64,
    )
    g_hd, rep = H // 8, 4
    llama_group = 2 * rep * g_hd * H + 2 * g_hd * H
    qwen_group = llama_group + rep * g_hd + 2 * g_hd  # q, k, v carry biases
    return [
        Case(
            "bert",
            _seeded(lambda: transformers.BertModel(transformers.BertConfig(**bert_cfg))),
            _text_inputs(120, padded=True),
            _hidden,
            bert_head,
            bert_neuron,
        ),
        Case(
            "roberta",
            _seeded(
                lambda: transformers.RobertaModel(transformers.RobertaConfig(**bert_cfg, pad_token_id=1))
            ),
            _text_inputs(120, padded=True),
            _hidden,
            bert_head,
            bert_neuron,
        ),
        Case(
            "distilbert",
            _seeded(
                lambda: transformers.DistilBertModel(
                    transformers.DistilBertConfig(dim=H, n_heads=4, hidden_dim=96, n_layers=3, vocab_size=120)
                )
            ),
            _text_inputs(120, padded=True),
            _hidden,
            bert_head,
            bert_neuron,
        ),
        Case(
            "vit",
            _seeded(lambda: transformers.ViTModel(transformers.ViTConfig(**vit_cfg))),
            lambda gen: {"pixel_values": torch.randn(2, 3, 32, 32, generator=gen)},
            _hidden,
            bert_head,
            bert_neuron,
        ),
        Case(
            "vit_classifier",
            _seeded(
                lambda: transformers.ViTForImageClassification(
                    transformers.ViTConfig(**vit_cfg, num_labels=5)
                )
            ),
            lambda gen: {"pixel_values": torch.randn(2, 3, 32, 32, generator=gen)},
            _logits,
            bert_head,
            bert_neuron,
        ),
        Case(
            "deit",
            _seeded(
                lambda: transformers.DeiTForImageClassification(
                    transformers.DeiTConfig(**vit_cfg, num_labels=5)
                )
            ),
            lambda gen: {"pixel_values": torch.randn(2, 3, 32, 32, generator=gen)},
            _logits,
            bert_head,
            bert_neuron,
        ),
        Case(
            "gpt2",
            _seeded(
                lambda: transformers.GPT2LMHeadModel(
                    transformers.GPT2Config(
                        n_embd=H, n_head=4, n_inner=96, n_layer=3, vocab_size=120, n_positions=64
                    )
                )
            ),
            _text_inputs(120, padded=False),
            _logits,
            bert_head,
            bert_neuron,
        ),
        Case(
            "llama_gqa",
            _seeded(lambda: transformers.LlamaModel(transformers.LlamaConfig(**llama_cfg))),
            _text_inputs(120, padded=True),
            _hidden,
            llama_group,
            3 * H,
        ),
        Case(
            "qwen2",
            _seeded(lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**llama_cfg))),
            _text_inputs(120, padded=False),
            _logits,
            qwen_group,
            3 * H,
        ),
        Case(
            "mistral",
            _seeded(lambda: transformers.MistralModel(transformers.MistralConfig(**llama_cfg))),
            _text_inputs(120, padded=False),
            _hidden,
            llama_group,
            3 * H,
        ),
        *(
            Case(
                name,
                _seeded(
                    lambda shared=shared: transformers.DebertaV2Model(
                        transformers.DebertaV2Config(
                            **bert_cfg,
                            relative_attention=True,
                            pos_att_type=["p2c", "c2p"],
                            position_buckets=8,
                            max_relative_positions=16,
                            share_att_key=shared,
                        )
                    )
                ),
                _text_inputs(120, padded=True),
                _hidden,
                (3 if shared else 5) * (H * hd + hd)
                + hd * H,  # q, k, v (and pos q, pos k) rows; output columns
                bert_neuron,
            )
            for name, shared in (("deberta_v2", False), ("deberta_v3", True))
        ),
        Case(
            "modernbert",
            _seeded(
                lambda: transformers.ModernBertModel(
                    transformers.ModernBertConfig(
                        hidden_size=H,
                        num_attention_heads=4,
                        intermediate_size=96,
                        num_hidden_layers=3,
                        vocab_size=120,
                        pad_token_id=0,
                        bos_token_id=1,
                        eos_token_id=2,
                        cls_token_id=1,
                        sep_token_id=2,
                        global_attn_every_n_layers=2,
                        local_attention=4,
                    )
                )
            ),
            _text_inputs(120, padded=True),
            _hidden,
            4 * hd * H,
            3 * H,
        ),
        Case(
            "gpt_neox",
            _seeded(
                lambda: transformers.GPTNeoXForCausalLM(
                    transformers.GPTNeoXConfig(
                        hidden_size=H,
                        num_attention_heads=4,
                        intermediate_size=96,
                        num_hidden_layers=3,
                        vocab_size=120,
                        max_position_embeddings=64,
                    )
                )
            ),
            _text_inputs(120, padded=False),
            _logits,
            bert_head,
            bert_neuron,
        ),
        Case(
            "phi3",
            _seeded(
                lambda: transformers.Phi3ForCausalLM(
                    transformers.Phi3Config(**llama_cfg, pad_token_id=0, bos_token_id=1, eos_token_id=2)
                )
            ),
            _text_inputs(120, padded=False),
            _logits,
            llama_group,
            3 * H,
        ),
        *_llama_like(llama_cfg, llama_group),
        *_moe(llama_cfg, llama_group),
        *_falcon(),
    ]


def _falcon() -> list[Case]:
    """Falcon's three fused attention layouts: multi-head (sequential residual), multi-query (one
    unit, the whole attention) and the new decoder architecture (KV groups)."""
    base = {"hidden_size": H, "num_hidden_layers": 3, "vocab_size": 120, "ffn_hidden_size": 96, "bias": True}
    hd = H // 8
    layouts = {
        "falcon_mha": (
            {"num_attention_heads": 8, "multi_query": False, "parallel_attn": False},
            4 * hd * H + 3 * hd,
        ),
        "falcon_mqa": ({"num_attention_heads": 8, "multi_query": True}, (8 + 2) * hd * (H + 1) + 8 * hd * H),
        "falcon_gqa": (
            {"num_attention_heads": 8, "num_kv_heads": 2, "new_decoder_architecture": True},
            (4 + 2) * hd * (H + 1) + 4 * hd * H,
        ),
    }
    return [
        Case(
            name,
            _seeded(
                lambda kwargs=kwargs: transformers.FalconForCausalLM(
                    transformers.FalconConfig(**base, **kwargs)
                )
            ),
            _text_inputs(120, padded=False),
            _logits,
            unit,
            2 * H + 1,
        )
        for name, (kwargs, unit) in layouts.items()
    ]


def _moe(cfg: dict[str, int], group_params: int) -> list[Case]:
    """Mixture-of-experts decoders (4 experts, top-2), served by the LLaMA adapter; Qwen2-MoE with a
    shared expert, whose neurons are the layer's MLP units."""
    moe = {"num_experts_per_tok": 2, "moe_intermediate_size": 32, "num_experts": 4}
    families = {
        "mixtral": (
            transformers.MixtralForCausalLM,
            transformers.MixtralConfig,
            {**cfg, "intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2},
        ),
        "qwen2_moe": (
            transformers.Qwen2MoeForCausalLM,
            transformers.Qwen2MoeConfig,
            {**cfg, **moe, "shared_expert_intermediate_size": 40},
        ),
        "qwen3_moe": (
            transformers.Qwen3MoeForCausalLM,
            transformers.Qwen3MoeConfig,
            {**cfg, **moe, "head_dim": H // 8, "norm_topk_prob": True},
        ),
    }
    qwen2_group = group_params + 4 * (H // 8) + 2 * (H // 8)  # q, k, v carry biases
    return [
        Case(
            name,
            _seeded(lambda model=model, config=config, kwargs=kwargs: model(config(**kwargs))),
            _text_inputs(120, padded=False),
            _logits,
            qwen2_group if name == "qwen2_moe" else group_params,
            3 * H,
            attention_shared_params=2 * H // 8 if name == "qwen3_moe" else 0,  # q_norm, k_norm
        )
        for name, (model, config, kwargs) in families.items()
    ]


def _llama_like(cfg: dict[str, int], group_params: int) -> list[Case]:
    """Decoders the LLaMA adapter serves by declaration, as causal LMs (logits, generation)."""
    small = {**cfg, "head_dim": H // 8}  # Gemma's default head width is 256
    families = {
        "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config, small),
        "gemma": (transformers.GemmaForCausalLM, transformers.GemmaConfig, small),
        "gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config, small),
        "gemma3_text": (
            transformers.Gemma3ForCausalLM,
            transformers.Gemma3TextConfig,
            {**small, "sliding_window": 4},  # layers 0-1 sliding, layer 2 global (pattern 6 -> every 6th)
        ),
        "granite": (
            transformers.GraniteForCausalLM,
            transformers.GraniteConfig,
            {**cfg, "residual_multiplier": 0.5, "attention_multiplier": 0.3, "embedding_multiplier": 2.0},
        ),
        "olmo": (transformers.OlmoForCausalLM, transformers.OlmoConfig, cfg),
        "stablelm": (transformers.StableLmForCausalLM, transformers.StableLmConfig, cfg),
    }
    return [
        Case(
            name,
            _seeded(lambda model=model, config=config, kwargs=kwargs: model(config(**kwargs))),
            _text_inputs(120, padded=False),
            _logits,
            group_params,
            3 * H,
            attention_shared_params=2 * H // 8 if name in ("qwen3", "gemma3_text") else 0,  # q_norm, k_norm
        )
        for name, (model, config, kwargs) in families.items()
    ]


CASES = {case.name: case for case in _cases()}


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]


def run(case: Case, model: nn.Module, gen_seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(gen_seed)
    with torch.no_grad():
        return case.output(model(**case.inputs(gen)))


@pytest.fixture(scope="session")
def minilm() -> nn.Module:
    from hwprune import prunable

    return prunable.load_model(prunable.MINILM, "BertModel")


@pytest.fixture(scope="session")
def stsb_dir() -> Path:
    if not (SHARED_STSB / "sts-dev.csv").is_file():
        pytest.skip(f"STS-B data not found at {SHARED_STSB}")
    return SHARED_STSB


# A small search of the bundled MiniLM (fidelity task, gpu_h100 roofline), shared by the tests of the
# apps and of bad input: tests that change a run work on a copy.
SMALL = [
    "task.build.calibration_samples=24",
    "task.build.eval_samples=24",
    "task.build.validation_samples=24",
    "search.n_trials=30",
    "search.rescore=2",
    "search.uniform_baselines=[0.5]",
    "search.exact_seeds=3",
]


def app_config(tmp_path: Path, *overrides: str) -> AppConfig:
    from hwprune.search.config import AppConfig, compose, to_object

    cfg = compose("config", [*SMALL, f"saliency.cache_dir={tmp_path / 'cache'}", *overrides])
    app = to_object(cfg)
    assert isinstance(app, AppConfig)
    return app


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hwprune.search import run_config, write_report

    tmp = tmp_path_factory.mktemp("search")
    outcome = run_config(app_config(tmp, "hardware=gpu_h100"), tmp / "run")
    write_report(outcome)
    return tmp / "run"
