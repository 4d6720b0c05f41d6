"""Plain-number descriptions of what is timed: a transformer block's shape and the workload."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from hwprune.errors import ConfigError

DTYPE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
PHASES = ("prefill", "decode")
NORMS = ("layernorm", "rmsnorm")


@dataclass(frozen=True)
class BlockSpec:
    """Dense shape of one transformer block, and how many the model stacks.

    Attributes:
        hidden: Residual width.
        head_dim: Width of one attention head.
        heads: Query heads of the dense block.
        kv_heads: Key/value heads of the dense block (= heads without GQA).
        mlp: MLP width of the dense block.
        num_layers: Blocks in the model.
        gated_mlp: SwiGLU-style MLP (gate and up projections).
        norm: "layernorm" or "rmsnorm".
        head_width: Outputs of the projection after the last block (an LM head's vocabulary, a
            classifier's labels); 0 where the model ends with its hidden states.
        experts: Routed experts of a mixture-of-experts block (0: a dense MLP). `mlp` is then the
            shared expert's width (0 without one).
        top_k: Experts each token is routed to.
        expert_width: Neurons of each routed expert (a gated MLP).
    """

    hidden: int
    head_dim: int
    heads: int
    kv_heads: int
    mlp: int
    num_layers: int
    gated_mlp: bool = False
    norm: str = "layernorm"
    head_width: int = 0
    experts: int = 0
    top_k: int = 0
    expert_width: int = 0

    def __post_init__(self) -> None:
        positive = ("hidden", "head_dim", "heads", "kv_heads", "num_layers") + (
            () if self.experts else ("mlp",)
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"BlockSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.mlp < 0 or self.experts < 0:
            raise ConfigError(f"BlockSpec.mlp and experts must be >= 0, got {self.mlp}, {self.experts}")
        if self.experts and not (1 <= self.top_k <= self.experts and self.expert_width >= 1):
            raise ConfigError(
                f"a mixture-of-experts BlockSpec needs 1 <= top_k <= experts and expert_width >= 1, got "
                f"top_k={self.top_k}, experts={self.experts}, expert_width={self.expert_width}"
            )
        if self.head_width < 0:
            raise ConfigError(f"BlockSpec.head_width must be >= 0, got {self.head_width}")
        if self.heads % self.kv_heads:
            raise ConfigError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.norm not in NORMS:
            raise ConfigError(f"unknown norm {self.norm!r}; valid choices: {list(NORMS)}")

    def params(
        self,
        units: ArrayLike,
        mlp: ArrayLike,
        experts: ArrayLike | None = None,
        expert_width: ArrayLike | None = None,
    ) -> np.ndarray:
        """Projection weights of a block (biases and norms aside) at its widths, elementwise; routed
        experts (each a gated MLP) and their router rows included (None: the dense expert shape)."""
        u, m = np.asarray(units, dtype=np.float64), np.asarray(mlp, dtype=np.float64)
        heads = u * self.heads_per_unit
        attention = (
            self.hidden * self.head_dim * (2 * heads + 2 * u)
        )  # Q and O per query head, K and V per group
        e, w = self.expert_widths(experts, expert_width)
        return attention + self.hidden * m * (3 if self.gated_mlp else 2) + self.hidden * e * (3 * w + 1)

    def expert_widths(
        self, experts: ArrayLike | None, expert_width: ArrayLike | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(kept experts, expert width) as float arrays, the dense shape where None."""
        e = np.asarray(self.experts if experts is None else experts, dtype=np.float64)
        w = np.asarray(self.expert_width if expert_width is None else expert_width, dtype=np.float64)
        return e, w

    def flops(
        self,
        workload: Workload,
        units: ArrayLike,
        mlp: ArrayLike,
        experts: ArrayLike | None = None,
        expert_width: ArrayLike | None = None,
    ) -> np.ndarray:
        """Forward FLOPs of the blocks (2 per multiply-add) at per-layer widths (..., layers): each
        token through its top_k experts only, and the router."""
        heads = np.asarray(units, dtype=np.float64) * self.heads_per_unit
        attn = 2 * 2 * workload.attended * self.head_dim * heads  # scores and context, per query token
        e, w = self.expert_widths(experts, expert_width)
        dense = self.params(units, mlp, experts=np.zeros_like(e), expert_width=w)
        routed = np.where(e > 0, self.top_k * 3 * self.hidden * w + self.hidden * e, 0.0)
        return (workload.tokens * (2 * (dense + routed) + attn)).sum(-1)

    @property
    def heads_per_unit(self) -> int:
        """Query heads per attention unit (KV group)."""
        return self.heads // self.kv_heads

    @property
    def units(self) -> int:
        """Attention units (KV groups) of the dense block."""
        return self.kv_heads


@dataclass(frozen=True)
class Workload:
    """What the model is run on: latency depends on all of it.

    Attributes:
        batch_size: Sequences per forward.
        seq_len: Tokens per sequence (patches for ViT); for decode, the new tokens per step. 0 (the
            default) means the phase's own: 128 for prefill, 1 for decode (one generated token).
        dtype: Compute dtype, one of DTYPE_BYTES, or "auto" for the target device's default.
        phase: "prefill" (also encoders) or "decode" (one step against a KV cache).
        kv_len: Cached tokens attended to in decode.
    """

    batch_size: int = 1
    seq_len: int = 0
    dtype: str = "fp32"
    phase: str = "prefill"
    kv_len: int = 0

    def __post_init__(self) -> None:
        if self.seq_len == 0:  # frozen: the phase's default is filled in once, here
            object.__setattr__(self, "seq_len", 1 if self.phase == "decode" else 128)
        if self.batch_size < 1 or self.seq_len < 1:
            raise ConfigError(f"batch_size and seq_len must be >= 1, got {self.batch_size}, {self.seq_len}")
        if self.dtype not in DTYPE_BYTES and self.dtype != "auto":
            raise ConfigError(
                f"unknown dtype {self.dtype!r}; valid choices: {[*sorted(DTYPE_BYTES), 'auto']}"
            )
        if self.phase not in PHASES:
            raise ConfigError(f"unknown phase {self.phase!r}; valid choices: {list(PHASES)}")
        if self.phase == "decode" and self.kv_len < 1:
            raise ConfigError(f"decode needs kv_len >= 1 (tokens in the KV cache), got {self.kv_len}")
        if self.kv_len < 0:
            raise ConfigError(f"kv_len must be >= 0, got {self.kv_len}")

    @property
    def tokens(self) -> int:
        """Rows of every projection GEMM."""
        return self.batch_size * self.seq_len

    @property
    def attended(self) -> int:
        """Keys each query attends to."""
        return self.kv_len + self.seq_len if self.phase == "decode" else self.seq_len

    @property
    def bytes_per_element(self) -> int:
        if self.dtype == "auto":
            raise ValueError("workload dtype 'auto' must be resolved against a hardware profile first")
        return DTYPE_BYTES[self.dtype]

    def tag(self) -> str:
        """A short file-name tag: "b32_s128" for prefill, "decode_b1_kv2048" for one-token decode,
        "b32_s128_bf16" for a dtype set explicitly.

        The dtype "auto" (the device's default) is left out: such a table's dtype is in its metadata,
        and tables of other dtypes need names of their own beside it.
        """
        dtype = "" if self.dtype == "auto" else f"_{self.dtype}"
        if self.phase != "decode":
            return f"b{self.batch_size}_s{self.seq_len}{dtype}"
        new = f"_s{self.seq_len}" if self.seq_len != 1 else ""
        return f"decode_b{self.batch_size}{new}_kv{self.kv_len}{dtype}"

    def describe(self) -> str:
        extra = f", kv_len {self.kv_len}" if self.phase == "decode" else ""
        return f"{self.phase} batch {self.batch_size} x seq {self.seq_len}, {self.dtype}{extra}"
