"""Routed experts of a mixture-of-experts layer: slicing them, gating them, masking their router.

`transformers` stores a layer's experts fused: `gate_up_proj` (experts, 2 * width, hidden) holds each
expert's gate rows then its up rows, `down_proj` (experts, hidden, width) its output columns; the
router's `weight` (experts, hidden) has one row per expert. Removing an expert removes its slice of
all three; removing neurons removes rows n and width + n of an expert's gate_up and column n of its
down projection. One tensor holds all of a layer's experts, so they keep equally many neurons.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class ExpertCoupling:
    """The router and the fused experts of one mixture-of-experts layer.

    Attributes:
        block: The mixture-of-experts module (its input is (batch, tokens, hidden)).
        router: Module with `weight` (experts, hidden) and `top_k` (Mixtral's and Qwen's TopKRouter).
        experts: Module with `gate_up_proj` (experts, 2 * width, hidden), `down_proj` (experts,
            hidden, width) and `act_fn`.
    """

    block: Any
    router: Any
    experts: Any

    @property
    def num_experts(self) -> int:
        return int(self.experts.gate_up_proj.shape[0])

    @property
    def width(self) -> int:
        return int(self.experts.down_proj.shape[-1])

    def squared_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of squared weights each expert (experts,) and each expert neuron (experts, width) owns.

        A neuron owns its gate and up rows and its down column; an expert owns its neurons and its
        router row.
        """
        width = self.width
        gate_up, down = self.experts.gate_up_proj.detach(), self.experts.down_proj.detach()
        neurons = gate_up[:, :width].pow(2).sum(-1) + gate_up[:, width:].pow(2).sum(-1)  # (experts, width)
        neurons = neurons + down.pow(2).sum(1)  # (experts, width)
        return neurons.sum(-1) + self.router.weight.detach().pow(2).sum(-1), neurons

    def keep(self, experts: torch.Tensor, neurons: torch.Tensor) -> None:
        """Slice in place to `experts` (k,), each keeping its row of `neurons` (k, width)."""
        gate_up, down, width = self.experts.gate_up_proj, self.experts.down_proj, self.width
        experts, neurons = experts.to(gate_up.device), neurons.to(gate_up.device)
        rows = torch.cat(
            [neurons, neurons + width], dim=1
        )  # (k, 2w): the expert's gate rows, then its up rows
        picked = gate_up.data[experts]  # (k, 2 * width, hidden)
        gate_up.data = picked.gather(
            1, rows[:, :, None].expand(-1, -1, picked.shape[2])
        ).clone()  # (k, 2w, hidden)
        picked = down.data[experts]  # (k, hidden, width)
        down.data = picked.gather(
            2, neurons[:, None, :].expand(-1, picked.shape[1], -1)
        ).clone()  # (k, hidden, w)
        self.router.weight.data = self.router.weight.data[experts].clone()  # (k, hidden)
        for param in (gate_up, down, self.router.weight):
            param.grad = None
        k, w = int(experts.numel()), int(neurons.shape[1])
        self.experts.num_experts = self.router.num_experts = k
        self.experts.intermediate_dim = w


def gated_experts_forward(
    experts: Any,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    expert_gate: torch.Tensor,
    neuron_gate: torch.Tensor,
    sample_of_token: torch.Tensor | None,
    observer: ExpertObserver | None = None,
) -> torch.Tensor:
    """The experts' eager forward with a multiplicative gate on each expert and each of its neurons.

    Args:
        hidden: (tokens, hidden) routed inputs.
        top_k_index: (tokens, k) experts of each token; top_k_weights: (tokens, k) their weights.
        expert_gate: (experts,) or per sample (B, experts), scaling each expert's output.
        neuron_gate: (experts, width) or per sample (B, experts, width), scaling each neuron's activation.
        sample_of_token: (tokens,) sample of each token, for per-sample gates.
        observer: Called for every expert that receives tokens with (expert, activations (n, width),
            routing weights (n,), its weighted output (n, hidden)), e.g. to hook its gradient.
    """
    out = torch.zeros_like(hidden)
    for e in range(experts.gate_up_proj.shape[0]):
        slot, token = torch.where((top_k_index == e).T)  # ordered as transformers' loop orders them
        if token.numel() == 0:
            continue
        gate, up = F.linear(hidden[token], experts.gate_up_proj[e]).chunk(2, dim=-1)  # (n, width) each
        act = experts.act_fn(gate) * up  # (n, width)
        ng, eg = neuron_gate[..., e, :], expert_gate[..., e]  # (width,) | (B, width); () | (B,)
        if sample_of_token is not None and ng.dim() == 2:
            ng = ng[sample_of_token[token]]  # (n, width)
        if sample_of_token is not None and eg.dim() == 1:
            eg = eg[sample_of_token[token]][:, None]  # (n, 1)
        weights = top_k_weights[token, slot]  # (n,)
        y = F.linear(act * ng, experts.down_proj[e]) * weights[:, None]  # (n, hidden)
        if observer is not None:
            observer(e, act, weights, y)
        out.index_add_(0, token, (y * eg).to(out.dtype))
    return out


ExpertObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def masked_routing(router: Any, logits: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The router's (logits, weights, indices) with only `allowed` (experts,) experts routable.

    What the router computes once the other experts' rows are gone: softmax over the allowed experts,
    top-k of them, renormalised where the router renormalises (Mixtral always; Qwen where
    `norm_topk_prob`).
    """
    logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))  # (tokens, experts)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    weights, indices = torch.topk(probs, router.top_k, dim=-1)  # (tokens, k)
    if getattr(router, "norm_topk_prob", True):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if hasattr(router, "norm_topk_prob"):  # Qwen's routers return the logits' dtype, Mixtral's fp32
        weights = weights.to(logits.dtype)
    return logits, weights, indices


def exportable_experts_forward(
    experts: Any, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts' forward as a graph exporters can trace: the same sums as transformers' eager loop.

    transformers dispatches tokens with `torch.histc` and grouped GEMMs (no ONNX operator) or a loop
    over the experts that happen to be hit by the example input (a trace would freeze that set).
    Here the loop runs over every expert, and each one gathers its tokens with a data-dependent
    `nonzero`, so the exported graph routes any input as the model does.

    Args:
        hidden: (tokens, hidden) routed inputs.
        top_k_index: (tokens, k) experts of each token; top_k_weights: (tokens, k) their weights.
    """
    out = torch.zeros_like(hidden)
    for e in range(experts.gate_up_proj.shape[0]):
        token, slot = torch.nonzero(top_k_index == e, as_tuple=True)  # (n,) each; n is data-dependent
        gate, up = F.linear(hidden[token], experts.gate_up_proj[e]).chunk(2, dim=-1)  # (n, width) each
        y = F.linear(experts.act_fn(gate) * up, experts.down_proj[e])  # (n, hidden)
        out = out.index_add(0, token, (y * top_k_weights[token, slot][:, None]).to(out.dtype))
    return out
