"""LLaMA-style decoders (LLaMA, Mistral, Qwen2): grouped-query attention, gated (SwiGLU) MLP."""

from __future__ import annotations

from typing import Any

from hwprune.prunable._coupling import Coupling, LayerCouplings, Tap, contiguous_index
from hwprune.prunable._families._base import Family, Skipped, qkvo_couplings
from hwprune.prunable._structure import LayerStructure, Structure


class LlamaFamily(Family):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2")
    blocks_path = "layers"

    def layer_structure(self, block: Any, config: Any) -> LayerStructure:
        head_dim = self.head_dim(config)
        attn = block.self_attn
        if isinstance(attn, Skipped):
            heads = kv = 0
        else:
            heads = attn.q_proj.out_features // head_dim
            kv = attn.k_proj.out_features // head_dim
        return LayerStructure(
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            mlp_width=int(block.mlp.up_proj.out_features),
            gated_mlp=True,
        )

    def couplings(self, block: Any, config: Any) -> LayerCouplings:
        layer = self.layer_structure(block, config)
        out = LayerCouplings(
            heads_per_unit=layer.heads_per_group,
            head_dim=layer.head_dim,
        )
        if layer.num_heads:
            a = block.self_attn
            out.heads = qkvo_couplings(
                a.q_proj,
                a.k_proj,
                a.v_proj,
                a.o_proj,
                kv_heads=layer.num_kv_heads,
                rep=layer.heads_per_group,
                head_dim=layer.head_dim,
            )
            out.attn_gate_site = a.o_proj
            out.attn_residual = Tap(block.input_layernorm)
        if layer.mlp_width:
            m = block.mlp
            index = contiguous_index(layer.mlp_width, 1)  # (neurons, 1)
            out.mlp = [Coupling(m.gate_proj, "out", index), Coupling(m.up_proj, "out", index)]
            out.mlp.append(Coupling(m.down_proj, "in", index))
            out.mlp_gate_site = m.down_proj
            out.mlp_residual = Tap(block.post_attention_layernorm)
        return out

    def set_widths(self, block: Any, config: Any, *, heads: int, kv_heads: int, mlp: int) -> None:
        if heads == 0:
            # The stand-in still counts the layer's tokens in a KV cache (with zero heads).
            attn = block.self_attn
            block.self_attn = Skipped(
                width=config.hidden_size,
                bias=attn.o_proj.bias,
                returns_tuple=True,
                cache_layer=attn.layer_idx,
                head_dim=self.head_dim(config),
            )
        # num_key_value_groups (query heads per KV head) is unchanged: whole groups are removed.
        if hasattr(block.mlp, "intermediate_size"):
            block.mlp.intermediate_size = mlp

    def config_updates(self, config: Any, structure: Structure) -> dict[str, Any] | None:
        uniform = self.uniform_widths(structure)
        if uniform is None:
            return None
        heads, kv, mlp = uniform
        return {
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "head_dim": self.head_dim(config),
            "intermediate_size": mlp,
        }
