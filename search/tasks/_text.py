"""Sentence embeddings for encoder models: tokenise, batch by length, mean-pool."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hwprune import hessian


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states that the attention mask keeps: (B, T, D) -> (B, D)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def embed_batch(model: nn.Module, batch: hessian.Batch) -> torch.Tensor:
    """Mean-pooled last hidden states of every row: (rows, D)."""
    out = model(**batch.inputs)
    # Pooled in fp32 whatever the model computes in (a bf16 or int8 model is judged on the same footing).
    return mean_pool(out.last_hidden_state.float(), batch.inputs["attention_mask"])


def length_batches(
    tokenizer: Any, texts: Sequence[str], *, batch_size: int, max_length: int
) -> tuple[list[hessian.Batch], torch.Tensor]:
    """Batches of similar-length texts (less padding), and the order that restores the input order.

    Returns:
        (batches, position): batch rows concatenated in order are texts[position].
    """
    lengths = [len(t) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer(
            [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        batches.append(
            hessian.Batch(inputs={"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        )
    return batches, torch.tensor(order)


@torch.no_grad()
def embed_texts(model: nn.Module, batches: list[hessian.Batch], position: torch.Tensor) -> torch.Tensor:
    """Embeddings of the texts `length_batches` made, back in input order: (N, D)."""
    sorted_emb = torch.cat([embed_batch(model, b) for b in batches])  # (N, D) in length order
    out = torch.empty_like(sorted_emb)
    out[position] = sorted_emb
    return out
