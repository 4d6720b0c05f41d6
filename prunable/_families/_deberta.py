"""DeBERTa-v2/v3: BERT's post-norm block with disentangled attention.

Relative-position embeddings are projected by the layer's own query/key projections (or by its
`pos_query_proj` / `pos_key_proj` when `share_att_key` is off) and split into the attention's
`num_attention_heads`, so a head owns its rows of every one of those projections and a layer can
keep any subset of heads.
"""

from __future__ import annotations

from typing import Any

from hwprune.prunable._coupling import Coupling, LayerCouplings, Tap, contiguous_index
from hwprune.prunable._families._base import Family, Skipped
from hwprune.prunable._structure import LayerStructure, Structure


class DebertaV2Family(Family):
    name = "deberta-v2"
    model_types = ("deberta-v2",)
    blocks_path = "encoder.layer"

    def head_dim(self, config: Any) -> int:
        explicit = getattr(config, "attention_head_size", None)
        return int(explicit) if explicit else config.hidden_size // config.num_attention_heads

    def layer_structure(self, block: Any, config: Any) -> LayerStructure:
        attn = block.attention.self
        heads = 0 if isinstance(attn, Skipped) else int(attn.num_attention_heads)
        return LayerStructure(
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=self.head_dim(config),
            mlp_width=int(block.intermediate.dense.out_features),
        )

    def couplings(self, block: Any, config: Any) -> LayerCouplings:
        layer = self.layer_structure(block, config)
        out = LayerCouplings(heads_per_unit=1, head_dim=layer.head_dim)
        if layer.num_heads:
            attn, proj = block.attention.self, block.attention.output.dense
            index = contiguous_index(layer.num_heads, layer.head_dim)  # (heads, hd)
            projections = [attn.query_proj, attn.key_proj, attn.value_proj]
            projections += [
                getattr(attn, name) for name in ("pos_query_proj", "pos_key_proj") if hasattr(attn, name)
            ]
            out.heads = [Coupling(m, "out", index) for m in projections]
            out.heads.append(Coupling(proj, "in", index))
            out.attn_gate_site = proj
            # The layer's input, the residual (query_proj also projects the position embeddings).
            out.attn_residual = Tap(block.attention)
        if layer.mlp_width:
            index = contiguous_index(layer.mlp_width, 1)  # (neurons, 1)
            out.mlp = [
                Coupling(block.intermediate.dense, "out", index),
                Coupling(block.output.dense, "in", index),
            ]
            out.mlp_gate_site = block.output.dense
            out.mlp_residual = Tap(block.intermediate.dense)
        return out

    def set_widths(self, block: Any, config: Any, *, heads: int, kv_heads: int, mlp: int) -> None:
        if heads == 0:
            # The output projection keeps its bias, added before the residual and LayerNorm as before.
            block.attention.self = Skipped(width=0, returns_tuple=True)
            return
        attn = block.attention.self
        attn.num_attention_heads = heads
        attn.all_head_size = heads * attn.attention_head_size

    def drop_problem(self, model: Any, dropped: list[int]) -> str | None:
        encoder = getattr(model, "base_model", model).encoder
        if 0 in dropped and getattr(encoder, "conv", None) is not None:
            return "layer 0 cannot be dropped: the encoder's convolution is applied to its output"
        return None

    def config_updates(self, config: Any, structure: Structure) -> dict[str, Any] | None:
        uniform = self.uniform_widths(structure)
        # The head width is hidden / heads: only the MLP width is expressible.
        if uniform is None or uniform[0] != config.num_attention_heads:
            return None
        return {"intermediate_size": uniform[2]}
