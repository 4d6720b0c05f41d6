"""DeBERTa-v2/v3: BERT's post-norm block with disentangled attention.

Relative-position embeddings are projected by the layer's own query/key projections (or by its
`pos_query_proj` / `pos_key_proj` when `share_att_key` is off) and split into the attention's
`num_attention_heads`, so a head owns its rows of every one of those projections and a layer can
keep any subset of heads. Everything else is BERT's.
"""

from __future__ import annotations

from typing import Any

from hwprune.prunable._coupling import Tap
from hwprune.prunable._families._bert import BertFamily


class DebertaV2Family(BertFamily):
    name = "deberta-v2"
    model_types = ("deberta-v2",)

    def head_dim(self, config: Any) -> int:
        explicit = getattr(config, "attention_head_size", None)
        return int(explicit) if explicit else config.hidden_size // config.num_attention_heads

    def head_projections(self, attn: Any) -> list[Any]:
        names = ("query_proj", "key_proj", "value_proj", "pos_query_proj", "pos_key_proj")
        return [getattr(attn, name) for name in names if hasattr(attn, name)]

    def attention_residual(self, block: Any) -> Tap:
        # query_proj also projects the position embeddings: read the attention's own input instead.
        return Tap(block.attention)

    def drop_problem(self, model: Any, dropped: list[int]) -> str | None:
        encoder = getattr(model, "base_model", model).encoder
        if 0 in dropped and getattr(encoder, "conv", None) is not None:
            return "layer 0 cannot be dropped: the encoder's convolution is applied to its output"
        return None
