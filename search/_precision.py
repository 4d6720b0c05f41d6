"""The precision a pruned model is deployed at: prune, recover, then quantise (the last step of
`hwprune-apply`).

`bf16` is the whole model in bfloat16 (`model.to(torch.bfloat16)`): on CPUs with AVX-512 BF16 it
runs MiniLM 2.7x faster than fp32 at no measurable cost in accuracy (results/benchmarks/
precision_cpu.md), and on GPUs it is the tensor cores' format. The metric, the saved weights and the
timing of the pruned model are all at that precision; the dense model it is compared with is the
one the user started from (fp32), and the dense model at the same precision is timed beside both.
"""

from __future__ import annotations

import torch
from torch import nn

from hwprune import prunable

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_precision(precision: str) -> None:
    """Raise ValueError for a precision hwprune-apply cannot deploy, naming the valid ones."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; valid choices: {list(PRECISIONS)}")


def to_precision(model: nn.Module, precision: str) -> nn.Module:
    """`model` converted in place to `precision` (`prunable.cast`: as it reloads when saved)."""
    check_precision(precision)
    return prunable.cast(model, PRECISIONS[precision])


def copy_at_precision(model: nn.Module, precision: str) -> nn.Module:
    """A copy of `model` at `precision`, made parameter by parameter (never a second fp32 copy)."""
    check_precision(precision)
    dtype = PRECISIONS[precision]
    copy = prunable.converted_copy(
        model, params=lambda t: t.detach().to(dtype), buffers=lambda t: t.detach().clone()
    )
    return prunable.cast(copy, dtype)  # the persistent buffers, as `to_precision` converts them


def measured_precision(dtype: str) -> str:
    """The precision a model priced at `dtype` is evaluated at here: `dtype` where torch runs it on
    any device (fp32, bf16), else fp32 (int8, fp8 and fp16 need their runtime's quantisation; the
    report says so)."""
    return dtype if dtype in PRECISIONS else "fp32"
