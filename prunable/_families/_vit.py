"""Vision Transformers with ViT's block (ViT, DeiT): pre-norm, q/k/v/o and fc1/fc2."""

from __future__ import annotations

from typing import Any

from hwprune.prunable._coupling import LayerCouplings, Tap
from hwprune.prunable._families._base import Family, Skipped, qkvo_couplings
from hwprune.prunable._structure import LayerStructure, Structure


class ViTFamily(Family):
    name = "vit"
    model_types = ("vit", "deit")
    blocks_path = "layers"

    def layer_structure(self, block: Any, config: Any) -> LayerStructure:
        head_dim = self.head_dim(config)
        attn = block.attention
        heads = 0 if isinstance(attn, Skipped) else attn.q_proj.out_features // head_dim
        return LayerStructure(
            num_heads=heads, num_kv_heads=heads, head_dim=head_dim, mlp_width=int(block.mlp.fc1.out_features)
        )

    def couplings(self, block: Any, config: Any) -> LayerCouplings:
        layer = self.layer_structure(block, config)
        out = LayerCouplings(
            heads_per_unit=1,
            head_dim=layer.head_dim,
        )
        if layer.num_heads:
            a = block.attention
            out.attention = qkvo_couplings(
                a.q_proj,
                a.k_proj,
                a.v_proj,
                a.o_proj,
                kv_heads=layer.num_heads,
                rep=1,
                head_dim=layer.head_dim,
            )
            out.attn_gate_site = a.o_proj
            out.attn_residual = Tap(block.layernorm_before)
        if layer.mlp_width:
            out.couple_mlp([block.mlp.fc1], block.mlp.fc2, layer.mlp_width, Tap(block.layernorm_after))
        return out

    def set_widths(self, block: Any, config: Any, *, heads: int, kv_heads: int, mlp: int) -> None:
        if heads == 0:
            block.attention = Skipped(
                width=config.hidden_size, bias=block.attention.o_proj.bias, returns_tuple=True
            )
            return
        block.attention.num_attention_heads = heads

    def config_updates(self, config: Any, structure: Structure) -> dict[str, Any] | None:
        uniform = self.uniform_widths(structure)
        if uniform is None:
            return None
        heads, _, mlp = uniform
        # ViTAttention reads an explicit config.head_dim, so fewer heads stay expressible.
        return {"num_attention_heads": heads, "head_dim": self.head_dim(config), "intermediate_size": mlp}
