"""ModernBERT: pre-norm encoder with a fused Wqkv = [q | k | v] and a fused GLU input Wi = [input | gate].

The attention views Wqkv's output as (..., 3, heads, head_dim) with the head count inferred (-1),
so a layer can keep any heads; head h owns its slice of each third. Neuron n owns row n of each
half of Wi, which slicing keeps in order, so `chunk(2)` still splits input from gate.
"""

from __future__ import annotations

from typing import Any

import torch

from hwprune.prunable._coupling import Coupling, LayerCouplings, Tap, contiguous_index
from hwprune.prunable._families._base import Family, Skipped
from hwprune.prunable._structure import LayerStructure, Structure


class ModernBertFamily(Family):
    name = "modernbert"
    model_types = ("modernbert",)
    blocks_path = "layers"

    def head_dim(self, config: Any) -> int:
        return int(config.hidden_size // config.num_attention_heads)

    def layer_structure(self, block: Any, config: Any) -> LayerStructure:
        head_dim = self.head_dim(config)
        heads = 0 if isinstance(block.attn, Skipped) else block.attn.Wqkv.out_features // (3 * head_dim)
        return LayerStructure(
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=head_dim,
            mlp_width=int(block.mlp.Wo.in_features),
            gated_mlp=True,
        )

    def couplings(self, block: Any, config: Any) -> LayerCouplings:
        layer = self.layer_structure(block, config)
        out = LayerCouplings(heads_per_unit=1, head_dim=layer.head_dim)
        if layer.num_heads:
            per_head = contiguous_index(layer.num_heads, layer.head_dim)  # (heads, hd)
            width = layer.num_heads * layer.head_dim
            fused = torch.cat([per_head, per_head + width, per_head + 2 * width], dim=1)  # (heads, 3*hd)
            out.attention = [Coupling(block.attn.Wqkv, "out", fused), Coupling(block.attn.Wo, "in", per_head)]
            out.attn_gate_site = block.attn.Wo
            out.attn_residual = Tap(block.attn_norm)  # an Identity in layer 0: its input is the stream
        if layer.mlp_width:
            n = layer.mlp_width
            halves = torch.stack([torch.arange(n), torch.arange(n) + n], dim=1)  # (neurons, 2)
            out.mlp = [Coupling(block.mlp.Wi, "out", halves), Coupling(block.mlp.Wo, "in", halves[:, :1])]
            out.mlp_gate_site = block.mlp.Wo
            out.mlp_residual = Tap(block.mlp_norm)
        return out

    def set_widths(self, block: Any, config: Any, *, heads: int, kv_heads: int, mlp: int) -> None:
        if heads == 0 and not isinstance(block.attn, Skipped):
            block.attn = Skipped(width=config.hidden_size, bias=block.attn.Wo.bias, returns_tuple=True)

    def config_updates(self, config: Any, structure: Structure) -> dict[str, Any] | None:
        uniform = self.uniform_widths(structure)
        # The head width is hidden / heads: only the MLP width is expressible.
        if uniform is None or uniform[0] != config.num_attention_heads:
            return None
        return {"intermediate_size": uniform[2]}
