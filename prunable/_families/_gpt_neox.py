"""GPT-NeoX (Pythia): one fused query_key_value projection laid out head by head, parallel residual.

The fused projection's output is viewed as (..., heads, 3 * head_size) with the head count inferred
(-1), so head h owns the contiguous rows [h * 3hd, (h + 1) * 3hd) of it (its q, k and v), and a
layer can keep any number of heads without the config saying so.
"""

from __future__ import annotations

from typing import Any

from hwprune.prunable._coupling import Coupling, LayerCouplings, Tap, contiguous_index
from hwprune.prunable._families._base import Family, Skipped
from hwprune.prunable._structure import LayerStructure, Structure


class GPTNeoXFamily(Family):
    name = "gpt_neox"
    decoder = True
    model_types = ("gpt_neox",)
    blocks_path = "layers"

    def head_dim(self, config: Any) -> int:
        return int(config.hidden_size // config.num_attention_heads)

    def layer_structure(self, block: Any, config: Any) -> LayerStructure:
        head_dim = self.head_dim(config)
        attn = block.attention
        heads = 0 if isinstance(attn, Skipped) else attn.query_key_value.out_features // (3 * head_dim)
        return LayerStructure(
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=head_dim,
            mlp_width=int(block.mlp.dense_h_to_4h.out_features),
        )

    def couplings(self, block: Any, config: Any) -> LayerCouplings:
        layer = self.layer_structure(block, config)
        out = LayerCouplings(heads_per_unit=1, head_dim=layer.head_dim)
        # In the parallel residual (the default) both sub-layers add to h + the other's output: no
        # single tensor is the stream either is added to, which `reconstruct` needs.
        sequential = not config.use_parallel_residual
        if layer.num_heads:
            attn = block.attention
            out.attention = [
                Coupling(attn.query_key_value, "out", contiguous_index(layer.num_heads, 3 * layer.head_dim)),
                Coupling(attn.dense, "in", contiguous_index(layer.num_heads, layer.head_dim)),
            ]
            out.attn_gate_site = attn.dense
            if sequential:
                out.attn_residual = Tap(block.input_layernorm)
        if layer.mlp_width:
            residual = Tap(block.post_attention_layernorm) if sequential else None
            out.couple_mlp([block.mlp.dense_h_to_4h], block.mlp.dense_4h_to_h, layer.mlp_width, residual)
        return out

    def set_widths(self, block: Any, config: Any, *, heads: int, kv_heads: int, mlp: int) -> None:
        if heads == 0 and not isinstance(block.attention, Skipped):
            attn = block.attention
            block.attention = Skipped(
                width=config.hidden_size,
                bias=attn.dense.bias,
                returns_tuple=True,
                cache_layer=attn.layer_idx,
                head_dim=self.head_dim(config),
            )

    def config_updates(self, config: Any, structure: Structure) -> dict[str, Any] | None:
        uniform = self.uniform_widths(structure)
        # The head width is hidden / heads: only the MLP width is expressible.
        if uniform is None or uniform[0] != config.num_attention_heads:
            return None
        return {"intermediate_size": uniform[2]}
