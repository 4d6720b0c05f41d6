"""Bridges from the model side to plain-number cost models: block specs and real-layer factories."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hwprune import cost_models, prunable
from hwprune.cost_models.profilers import TORCH_DTYPES, torch_device, torch_timer
from hwprune.errors import ConfigError, UnsupportedModelError


def head_width(model: nn.Module) -> int:
    """Output columns of the model's head after the last block (an LM's vocabulary), 0 without one."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return int(head.out_features) if isinstance(head, nn.Linear) else 0


def block_spec(structure: prunable.Structure, *, head_width: int = 0) -> cost_models.BlockSpec:
    """The dense block shape of a (uniform) structure, as the cost models see it.

    Args:
        structure: The model's (dense, uniform) structure.
        head_width: Output columns of its head (`head_width(model)`), priced outside the blocks.
    """
    first = structure.layers[0]
    if any(layer != first for layer in structure.layers):
        raise UnsupportedModelError(
            f"cost models need the dense, uniform structure; got {structure.describe()}"
        )
    return cost_models.BlockSpec(
        hidden=structure.hidden_size,
        head_dim=first.head_dim,
        heads=first.num_heads,
        kv_heads=first.num_kv_heads,
        mlp=first.mlp_width,
        num_layers=structure.num_layers,
        gated_mlp=first.gated_mlp,
        norm=structure.norm,
        head_width=head_width,
        experts=first.num_experts,
        top_k=first.top_k,
        expert_width=first.expert_width,
    )


def check_workload(model: torch.nn.Module, workload: cost_models.Workload) -> None:
    """Refuse a workload the model cannot run (decode on an encoder, more tokens than its position
    table), before anything expensive."""
    if workload.phase == "decode" and not prunable.is_decoder(model):
        raise UnsupportedModelError(
            f"workload.phase=decode needs a decoder that generates with a KV cache; {type(model).__name__} "
            f"({prunable.discover(model).family}) is an encoder; valid for it: workload.phase=prefill"
        )
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    tokens = workload.seq_len + workload.kv_len
    if isinstance(limit, int) and tokens > limit:
        what = f"workload.seq_len={workload.seq_len}" + (
            f" + workload.kv_len={workload.kv_len}" if workload.kv_len else ""
        )
        raise ConfigError(
            f"{what} exceeds the model's max_position_embeddings={limit}; valid: <= {limit} tokens"
        )


def model_cost_model(
    profile: cost_models.HardwareProfile, model: nn.Module, workload: cost_models.Workload
) -> cost_models.CostModel:
    """The cost model of `model` at `workload` on `profile`: its dense block shape, and the most
    faithful source this device's tables allow (`cost_models.cost_model_for`)."""
    spec = block_spec(prunable.discover(model), head_width=head_width(model))
    return cost_models.cost_model_for(profile, spec, workload, tables=cost_models.load_tables(profile))


def model_mixed_cost_model(
    profile: cost_models.HardwareProfile,
    model: nn.Module,
    workload: cost_models.Workload,
    precisions: tuple[str, ...],
) -> cost_models.MixedPrecisionModel:
    """The cost model of `model` with each block at one of `precisions` (each precision's most
    faithful source, `cost_models.mixed_precision_model`)."""
    spec = block_spec(prunable.discover(model), head_width=head_width(model))
    tables = cost_models.load_tables(profile)
    return cost_models.mixed_precision_model(profile, spec, workload, precisions, tables=tables)


def _cache_keyword(module: nn.Module) -> str:
    """What a decoder (or one of its layers) calls its KV cache argument (`cache` in transformers 5.24+)."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class RealBlock(nn.Module):
    """One of the model's own layers at reduced width, callable on hidden states alone.

    For decode, `prepare_decode` gives the layer a real KV cache of `kv_len` random tokens; every
    call then runs one decode step against it and drops the new tokens again, so each timed step
    is the same step.
    """

    def __init__(self, model: nn.Module, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.rotary = getattr(getattr(model, "base_model", model), "rotary_emb", None)
        self.cache: Any = None
        self.kv_len = 0

    def prepare_decode(self, batch_size: int, kv_len: int) -> None:
        """Attach a KV cache holding `kv_len` tokens for each of `batch_size` sequences."""
        attn = getattr(self.block, "self_attn", None)
        if self.rotary is None or attn is None:
            raise UnsupportedModelError(
                f"timing decode steps needs a LLaMA-family decoder layer with a KV cache, not "
                f"{type(self.block).__name__}; profile with profiler.real_blocks=false for a reference block"
            )
        self.kv_len = kv_len
        if isinstance(attn, prunable.Skipped):
            return  # no attention left: the layer reads and writes no cache
        from transformers import DynamicCache

        param = next(self.block.parameters())
        kv_heads = attn.k_proj.out_features // attn.head_dim
        shape = (batch_size, kv_heads, kv_len, attn.head_dim)  # (B, kv heads, cached tokens, hd)
        gen = torch.Generator(device=param.device).manual_seed(0)
        keys, values = (
            torch.randn(shape, generator=gen, device=param.device).to(param.dtype) for _ in range(2)
        )
        self.cache = DynamicCache()
        self.cache.update(keys, values, attn.layer_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {}
        if self.rotary is not None:  # LLaMA-family layers take their rotary embeddings as input
            positions = torch.arange(self.kv_len, self.kv_len + x.shape[1], device=x.device)[None]
            kwargs["position_embeddings"] = self.rotary(x, positions)
        if self.cache is not None:
            kwargs[_cache_keyword(self.block)] = self.cache
            kwargs["use_cache"] = True
        out = self.block(x, **kwargs)
        if self.cache is not None:
            self.cache.crop(-x.shape[1])  # back to kv_len: the next call times the same step
        return out[0] if isinstance(out, tuple) else out


def real_block_factory(
    model: nn.Module, layer: int = 0
) -> Callable[[cost_models.BlockSpec, int, int], nn.Module]:
    """A `TorchProfiler` block factory timing pruned copies of `model`'s layer `layer`."""

    def factory(spec: cost_models.BlockSpec, units: int, mlp: int) -> nn.Module:
        return RealBlock(model, prunable.pruned_block(model, layer, units=units, neurons=mlp))

    factory.__name__ = f"{type(model).__name__}.layer{layer}"
    return factory


def model_inputs(
    model: nn.Module, workload: cost_models.Workload, *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Inputs of one forward at `workload`: images for image models (ViT, DeiT), else token ids (with
    a full mask in prefill)."""
    config: Any = model.config
    gen = torch.Generator().manual_seed(seed)
    b, t = workload.batch_size, workload.seq_len
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        size = config.image_size
        return {"pixel_values": torch.randn(b, config.num_channels, size, size, generator=gen)}
    ids = torch.randint(0, config.vocab_size, (b, t), generator=gen)
    if workload.phase == "decode":
        return {"input_ids": ids}  # one query per sequence sees every cached token: no mask needed
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def prefilled_cache(model: nn.Module, batch_size: int, kv_len: int) -> Any:
    """A KV cache holding `kv_len` random tokens per sequence in every layer, at each layer's width."""
    from transformers import DynamicCache

    structure = prunable.discover(model)
    param = next(model.parameters())
    gen = torch.Generator(device=param.device).manual_seed(0)
    cache = DynamicCache()
    for i, layer in enumerate(structure.layers):
        shape = (batch_size, layer.num_kv_heads, kv_len, layer.head_dim)  # 0 heads where attention went
        keys, values = (
            torch.randn(shape, generator=gen, device=param.device).to(param.dtype) for _ in range(2)
        )
        prunable.append_kv(cache, keys, values, i)
    return cache


def model_timer(model: nn.Module, workload: cost_models.Workload, device: str) -> Callable[[], float]:
    """One timed forward (ms) of `model` at `workload` on `device`, in the workload's (resolved) dtype.

    Prefill runs the whole input; decode runs one step of `seq_len` new tokens against a KV cache of
    `kv_len` tokens per sequence, then drops the new tokens again, so every call times the same step.
    The model moves to the device and dtype in place: callers time the model they passed. A model
    whose blocks run at their plan's precisions (`prunable.set_precisions`) keeps them: the
    workload's dtype is then that of the stream between its blocks.
    """
    if workload.dtype not in TORCH_DTYPES:
        raise ConfigError(
            f"workload.dtype={workload.dtype!r} cannot be timed with torch; valid: {sorted(TORCH_DTYPES)}"
        )
    on = torch_device(device)  # a clear error before moving anything to a device torch lacks
    dtype = TORCH_DTYPES[workload.dtype]
    if any(a or m for a, m in prunable.block_precisions(model)):
        model.to(on)  # blocks at their plan's precisions: the workload's dtype is the stream's
    else:
        model.to(on, dtype)
    inputs = {
        k: v.to(on, dtype) if v.is_floating_point() else v.to(on)
        for k, v in model_inputs(model, workload).items()
    }
    if workload.phase != "decode":
        return torch_timer(lambda: model(**inputs), on)
    check_workload(model, workload)  # decode needs a decoder (every decoder family has a KV cache)
    cache = prefilled_cache(model, workload.batch_size, workload.kv_len)
    keyword = _cache_keyword(model)  # `cache` from transformers 5.24 (`past_key_values` is deprecated)

    def step() -> None:
        model(**inputs, **{keyword: cache}, use_cache=True)
        cache.crop(-workload.seq_len)

    return torch_timer(step, on)
