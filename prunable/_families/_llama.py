"""LLaMA-like decoders: separate Q/K/V/O projections with grouped-query attention, a gated MLP.

One adapter serves every family whose blocks have that layout; what differs between them is
declared in `LAYOUTS`, one line each, and checked by the shared conformance tests (discovery, exact
surgery with empty layers, save and reload, cached generation). Families whose layout breaks an
assumption are refused (`_families.REFUSED`) with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hwprune.errors import UnsupportedModelError
from hwprune.prunable._coupling import LayerCouplings, Tap
from hwprune.prunable._experts import ExpertCoupling
from hwprune.prunable._families._base import Family, Skipped, qkvo_couplings
from hwprune.prunable._structure import LayerStructure, Structure


@dataclass(frozen=True)
class DecoderLayout:
    """How one LLaMA-like family differs from LLaMA.

    Attributes:
        mlp_norm: The norm in front of the MLP (its input is the residual stream there).
        adds_output_as_is: Whether each sub-layer's output is added to the residual stream unchanged;
            False where it is normalised (Gemma2/3) or scaled (Granite) first, which `reconstruct`
            recovery cannot fit.
        head_count_attrs: Attention attributes its forward reads the head counts from (StableLM),
            set to the pruned counts.
        config_head_dim: Whether the config's `head_dim` field sets the head width, so that a config
            with fewer heads still describes the pruned model (else the width is hidden / heads).
        moe_fields: For mixture-of-experts families, the config fields of the expert count, the
            expert width and the shared expert's width ("" without one).
    """

    mlp_norm: str = "post_attention_layernorm"
    adds_output_as_is: bool = True
    head_count_attrs: tuple[str, ...] = ()
    config_head_dim: bool = True
    moe_fields: tuple[str, str, str] | None = None


SANDWICH = DecoderLayout(mlp_norm="pre_feedforward_layernorm", adds_output_as_is=False)
LAYOUTS: dict[str, DecoderLayout] = {
    "llama": DecoderLayout(),
    "mistral": DecoderLayout(),
    "qwen2": DecoderLayout(),
    "qwen3": DecoderLayout(),  # q/k norms act per head (width head_dim): nothing to slice
    "gemma": DecoderLayout(),
    "gemma2": SANDWICH,
    "gemma3_text": SANDWICH,
    "granite": DecoderLayout(adds_output_as_is=False),  # residual_multiplier scales each output
    "olmo": DecoderLayout(),
    "stablelm": DecoderLayout(head_count_attrs=("num_heads", "num_key_value_heads"), config_head_dim=False),
    "mixtral": DecoderLayout(moe_fields=("num_local_experts", "intermediate_size", "")),
    "qwen2_moe": DecoderLayout(
        moe_fields=("num_experts", "moe_intermediate_size", "shared_expert_intermediate_size")
    ),
    "qwen3_moe": DecoderLayout(moe_fields=("num_experts", "moe_intermediate_size", "")),
}


class LlamaFamily(Family):
    name = "llama"
    decoder = True
    model_types = tuple(LAYOUTS)
    blocks_path = "layers"

    def check_config(self, config: Any) -> None:
        super().check_config(config)
        if config.model_type == "stablelm" and getattr(config, "qk_layernorm", False):
            raise UnsupportedModelError(
                "stablelm with qk_layernorm=True is not supported: its per-head LayerNorms are a module list "
                "by the config's head count"
            )

    def layer_structure(self, block: Any, config: Any) -> LayerStructure:
        head_dim = self.head_dim(config)
        attn = block.self_attn
        if isinstance(attn, Skipped):
            heads = kv = 0
        else:
            heads = attn.q_proj.out_features // head_dim
            kv = attn.k_proj.out_features // head_dim
        moe = {}
        if hasattr(block.mlp, "experts"):  # routed experts, maybe a shared expert beside them
            experts = block.mlp.experts
            moe = {
                "num_experts": int(experts.gate_up_proj.shape[0]),
                "expert_width": int(experts.down_proj.shape[-1]),
                "top_k": int(block.mlp.gate.top_k),
            }
        dense = self.dense_mlp(block)
        return LayerStructure(
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            mlp_width=int(dense.up_proj.out_features) if dense is not None else 0,
            gated_mlp=True,
            **moe,
        )

    @staticmethod
    def dense_mlp(block: Any) -> Any:
        """The block's dense gated MLP: the MLP itself, a mixture's shared expert, or None."""
        if hasattr(block.mlp, "experts"):
            return getattr(block.mlp, "shared_expert", None)
        return block.mlp

    def couplings(self, block: Any, config: Any) -> LayerCouplings:
        layout = LAYOUTS[config.model_type]
        layer = self.layer_structure(block, config)
        out = LayerCouplings(
            heads_per_unit=layer.heads_per_unit,
            head_dim=layer.head_dim,
        )
        if layer.num_heads:
            a = block.self_attn
            out.attention = qkvo_couplings(
                a.q_proj,
                a.k_proj,
                a.v_proj,
                a.o_proj,
                kv_heads=layer.num_kv_heads,
                rep=layer.heads_per_unit,
                head_dim=layer.head_dim,
            )
            out.attn_gate_site = a.o_proj
            if layout.adds_output_as_is:
                out.attn_residual = Tap(block.input_layernorm)
        if layer.mlp_width:
            m = self.dense_mlp(block)
            # A shared expert's output is gated and summed with the routed experts' first.
            as_is = layout.adds_output_as_is and not layer.is_moe
            parallel = getattr(config, "use_parallel_residual", False)
            residual = Tap(getattr(block, layout.mlp_norm)) if as_is and not parallel else None
            out.couple_mlp([m.gate_proj, m.up_proj], m.down_proj, layer.mlp_width, residual)
        if layer.is_moe:
            out.experts = ExpertCoupling(block=block.mlp, router=block.mlp.gate, experts=block.mlp.experts)
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
        else:
            for attr, count in zip(
                LAYOUTS[config.model_type].head_count_attrs, (heads, kv_heads), strict=False
            ):
                setattr(block.self_attn, attr, count)
        # num_key_value_groups (query heads per KV head) is unchanged: whole groups are removed.
        dense = self.dense_mlp(block)
        if hasattr(dense, "intermediate_size"):
            dense.intermediate_size = mlp

    def config_updates(self, config: Any, structure: Structure) -> dict[str, Any] | None:
        uniform = self.uniform_widths(structure)
        if uniform is None or not LAYOUTS[config.model_type].config_head_dim:
            return None
        heads, kv, mlp = uniform
        updates = {
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "head_dim": self.head_dim(config),
            "intermediate_size": mlp,
        }
        fields = LAYOUTS[config.model_type].moe_fields
        if fields is None:
            return updates
        experts = {(la.num_experts, la.expert_width) for la in structure.layers}
        if len(experts) != 1 or 0 in experts.pop() or getattr(config, "mlp_only_layers", None):
            return None  # a config has one expert count and width, for every layer
        count, width, shared = fields
        first = structure.layers[0]
        del updates["intermediate_size"]  # Mixtral's is the expert width; Qwen's the dense layers'
        updates |= {count: first.num_experts, width: first.expert_width}
        if shared:
            updates[shared] = mlp
        return updates
