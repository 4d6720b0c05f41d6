"""GPT-2: fused QKV in one transposed Conv1D, pre-norm blocks."""

from __future__ import annotations

from typing import Any

import torch

from hwprune.prunable._coupling import Coupling, LayerCouplings, Tap, contiguous_index
from hwprune.prunable._families._base import Family, Skipped
from hwprune.prunable._structure import LayerStructure, Structure


class GPT2Family(Family):
    name = "gpt2"
    decoder = True
    model_types = ("gpt2",)
    blocks_path = "h"

    def layer_structure(self, block: Any, config: Any) -> LayerStructure:
        head_dim = self.head_dim(config)
        heads = 0 if isinstance(block.attn, Skipped) else int(block.attn.split_size) // head_dim
        mlp = 0 if isinstance(block.mlp, Skipped) else int(block.mlp.c_fc.nf)
        return LayerStructure(num_heads=heads, num_kv_heads=heads, head_dim=head_dim, mlp_width=mlp)

    def couplings(self, block: Any, config: Any) -> LayerCouplings:
        layer = self.layer_structure(block, config)
        out = LayerCouplings(
            heads_per_unit=1,
            head_dim=layer.head_dim,
        )
        if layer.num_heads:
            per_head = contiguous_index(layer.num_heads, layer.head_dim)  # (heads, hd)
            width = layer.num_heads * layer.head_dim
            # c_attn's output is [q | k | v], each `width` wide; head h owns its slice of all three.
            fused = torch.cat([per_head, per_head + width, per_head + 2 * width], dim=1)  # (heads, 3*hd)
            out.attention = [
                Coupling(block.attn.c_attn, "out", fused),
                Coupling(block.attn.c_proj, "in", per_head),
            ]
            out.attn_gate_site = block.attn.c_proj
            out.attn_residual = Tap(block.ln_1)
        if layer.mlp_width:
            out.couple_mlp([block.mlp.c_fc], block.mlp.c_proj, layer.mlp_width, Tap(block.ln_2))
        return out

    def set_widths(self, block: Any, config: Any, *, heads: int, kv_heads: int, mlp: int) -> None:
        if heads == 0:
            attn = block.attn
            block.attn = Skipped(
                width=config.hidden_size,
                bias=attn.c_proj.bias,
                returns_tuple=True,
                cache_layer=attn.layer_idx,
                head_dim=attn.head_dim,
            )
        else:
            block.attn.num_heads = heads
            block.attn.split_size = heads * block.attn.head_dim
        if mlp == 0 and not isinstance(block.mlp, Skipped):
            # Conv1D flattens its input with view(-1, nx), which fails for nx == 0.
            block.mlp = Skipped(width=config.hidden_size, bias=block.mlp.c_proj.bias, returns_tuple=False)

    def config_updates(self, config: Any, structure: Structure) -> dict[str, Any] | None:
        uniform = self.uniform_widths(structure)
        # GPT-2 derives head width as n_embd / n_head: only the MLP width is expressible.
        if uniform is None or uniform[0] != config.num_attention_heads:
            return None
        return {"n_inner": uniform[2]}
