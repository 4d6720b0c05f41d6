"""Falcon: one fused query_key_value projection in one of three layouts, rotary positions.

The attention reads its head counts from its own `num_heads` / `num_kv_heads`, so each layer can
keep its own. The fused output is laid out
- multi-head: head by head, [q | k | v] of each (one unit per head);
- multi-query (Falcon-7B): all query heads, then the one key and value head (one unit, the whole
  attention, since every query head reads the same key and value);
- new decoder architecture (Falcon-40B/180B): KV group by group, [its query heads | k | v].
ALiBi models are refused: the model builds one slope per configured head for every layer.
"""

from __future__ import annotations

from typing import Any

from hwprune.errors import UnsupportedModelError
from hwprune.prunable._coupling import Coupling, LayerCouplings, Tap, contiguous_index
from hwprune.prunable._families._base import Family, Skipped
from hwprune.prunable._structure import LayerStructure, Structure


class FalconFamily(Family):
    name = "falcon"
    decoder = True
    model_types = ("falcon",)
    blocks_path = "h"

    def check_config(self, config: Any) -> None:
        super().check_config(config)
        if config.alibi:
            raise UnsupportedModelError(
                "falcon with alibi=True is not supported: the model builds one ALiBi slope per configured "
                "head and hands all of them to every layer, so no layer can keep fewer heads"
            )

    def head_dim(self, config: Any) -> int:
        return int(config.hidden_size // config.num_attention_heads)

    @staticmethod
    def group_size(config: Any) -> int:
        """Query heads per attention unit."""
        if config.new_decoder_architecture:
            return int(config.num_attention_heads // config.num_kv_heads)
        return int(config.num_attention_heads) if config.multi_query else 1

    def layer_structure(self, block: Any, config: Any) -> LayerStructure:
        head_dim = self.head_dim(config)
        attn = block.self_attention
        heads = 0 if isinstance(attn, Skipped) else attn.dense.in_features // head_dim
        return LayerStructure(
            num_heads=heads,
            num_kv_heads=heads // self.group_size(config),
            head_dim=head_dim,
            mlp_width=int(block.mlp.dense_h_to_4h.out_features),
        )

    def couplings(self, block: Any, config: Any) -> LayerCouplings:
        layer = self.layer_structure(block, config)
        out = LayerCouplings(heads_per_unit=layer.heads_per_unit, head_dim=layer.head_dim)
        sequential = not (config.parallel_attn or config.new_decoder_architecture)
        if layer.num_heads:
            attn, hd, units, rep = (
                block.self_attention,
                layer.head_dim,
                layer.attention_units,
                layer.heads_per_unit,
            )
            if config.new_decoder_architecture:
                fused = contiguous_index(units, (rep + 2) * hd)  # (groups, ...): [its q heads | k | v]
            elif config.multi_query:
                fused = contiguous_index(1, (layer.num_heads + 2) * hd)  # one unit: every row
            else:
                fused = contiguous_index(units, 3 * hd)  # (heads, 3 hd): [q | k | v] of each head
            out.attention = [
                Coupling(attn.query_key_value, "out", fused),
                Coupling(attn.dense, "in", contiguous_index(units, rep * hd)),
            ]
            out.attn_gate_site = attn.dense
            if sequential:
                out.attn_residual = Tap(block.input_layernorm)
        if layer.mlp_width:
            residual = Tap(block.post_attention_layernorm) if sequential else None
            out.couple_mlp([block.mlp.dense_h_to_4h], block.mlp.dense_4h_to_h, layer.mlp_width, residual)
        return out

    def set_widths(self, block: Any, config: Any, *, heads: int, kv_heads: int, mlp: int) -> None:
        attn = block.self_attention
        if heads == 0:
            if not isinstance(attn, Skipped):
                block.self_attention = Skipped(
                    width=config.hidden_size,
                    bias=attn.dense.bias,
                    returns_tuple=True,
                    cache_layer=attn.layer_idx,
                    head_dim=self.head_dim(config),
                )
            return
        attn.num_heads = heads
        if config.new_decoder_architecture or not config.multi_query:
            attn.num_kv_heads = kv_heads if config.new_decoder_architecture else heads

    def config_updates(self, config: Any, structure: Structure) -> dict[str, Any] | None:
        uniform = self.uniform_widths(structure)
        # The head width is hidden / heads: only the MLP width is expressible.
        if uniform is None or uniform[0] != config.num_attention_heads:
            return None
        return {"ffn_hidden_size": uniform[2]}
