"""Analytical roofline latency per operator of a transformer block, with tile and wave quantisation.

Each operator costs max(compute, memory) + a launch overhead, where
    compute = waves * (2 * rows * tile_n * K_padded / split) / (per-unit peak * efficiency) * (1 + half_rows / M)
    waves   = ceil(tiles * split / compute_units),  tiles = batch * ceil(M / tile_m) * ceil(N / tile_n)
    split   = compute_units // tiles when the tiles cannot fill the device (split-K), else 1
    rows    = tile_m, or M rounded up to min_tile_m for a GEMM of fewer rows (decode's GEMV kernels)
    memory  = bytes moved / (bandwidth * memory efficiency)
so latency steps up when a width crosses a tile boundary (a GPU's CTA tiles and its waves over SMs,
a TPU's 128x128 MXU), instead of growing in a straight line with FLOPs. `half_rows` is where a GEMM
reaches half its peak efficiency as its row count M (tokens) grows: packing and loop overheads that
the datasheet does not show, fitted by calibration (0 in the datasheet model). Widths are arrays;
every formula is vectorised so one call scores thousands of candidate configurations.

The model also prices what runs outside the blocks (embeddings, the final norm, an output head of
`BlockSpec.head_width` columns), so whole-model latency, and the speedup of a pruned model over the
dense one, count the part pruning does not touch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hwprune.cost_models._base import CostModel
from hwprune.cost_models._hardware import HardwareProfile
from hwprune.cost_models._spec import BlockSpec, Workload
from hwprune.errors import ConfigError


@dataclass(frozen=True)
class Efficiency:
    """How a device falls short of its datasheet; calibration fits these to profiled tables.

    Attributes:
        compute: Fraction of peak FLOP/s the projection GEMMs reach.
        attention: Fraction of peak the attention GEMMs (scores, context) reach: many small
            head_dim-wide matrices, usually far less efficient than the projections.
        memory: Fraction of peak bandwidth memory-bound operators reach.
        overhead: Scale on the profile's launch overhead per operator.
        half_rows: GEMM rows (tokens) at which a GEMM runs at half its efficiency (0: no ramp).
        ramp_floor_rows: The ramp stays flat below this many rows: calibration sets it to the
            fewest rows its tables' GEMMs had, so a ramp fitted on prefill is not extrapolated to
            the one-row GEMMs of a decode step (which run as memory-bound GEMV kernels).
        outside: Scale on the modelled latency outside the blocks.
    """

    compute: float = 0.7
    attention: float = 0.7
    memory: float = 0.8
    overhead: float = 1.0
    half_rows: float = 0.0
    ramp_floor_rows: float = 1.0
    outside: float = 1.0

    def __post_init__(self) -> None:
        fractions = (self.compute, self.attention, self.memory)
        if (
            not all(0 < f <= 1.5 for f in fractions)
            or min(self.overhead, self.half_rows) < 0
            or self.ramp_floor_rows < 1
        ):
            raise ConfigError(f"efficiencies must be in (0, 1.5] and overhead, half_rows >= 0, got {self}")
        if not self.outside > 0:
            raise ConfigError(f"Efficiency.outside must be positive, got {self.outside}")


def _ceil_div(a: np.ndarray, b: int) -> np.ndarray:
    return -(-a // b)


class AnalyticalModel(CostModel):
    """Datasheet roofline of a block on a hardware profile.

    Args:
        profile: The device (validated).
        spec: Dense block shape.
        workload: What runs; dtype "auto" takes the profile's default.
        efficiency: Fractions of peak; calibration replaces the defaults.
        source: Label of predictions ("analytical", or "calibrated" once fitted).
    """

    def __init__(
        self,
        *,
        profile: HardwareProfile,
        spec: BlockSpec,
        workload: Workload,
        efficiency: Efficiency | None = None,
        source: str = "analytical",
    ) -> None:
        profile.validate()
        self.profile = profile
        self.hardware = profile.name
        self.spec = spec
        self.workload = profile.resolve_workload(workload)
        self.efficiency = efficiency or Efficiency()
        self.source = source
        self.base_ms = self.efficiency.outside * sum(self.outside_op_times().values()) * 1e3

    # ---------------------------------------------------------------- operator costs (seconds)

    def _gemm(
        self,
        active: np.ndarray,
        m: np.ndarray | int,
        n: np.ndarray | int,
        k: np.ndarray | int,
        *,
        batch: np.ndarray | int = 1,
        weight_bytes: np.ndarray | None = None,
        weights_resident: np.ndarray | bool = False,
        attention: bool = False,
    ) -> np.ndarray:
        hw, eff, b = self.profile, self.efficiency, self.workload.bytes_per_element
        m, n, k, batch = (np.asarray(x, dtype=np.int64) for x in (m, n, k, batch))
        tiles = batch * _ceil_div(m, hw.tile_m) * _ceil_div(n, hw.tile_n)
        k_pad = _ceil_div(k, hw.tile_k) * hw.tile_k
        # Too few output tiles to fill the device: the reduction is split across the idle units
        # (split-K, flash-decoding), each taking a share of K.
        split = np.clip(hw.compute_units // np.maximum(tiles, 1), 1, np.maximum(k_pad // hw.tile_k, 1))
        waves = _ceil_div(tiles * split, hw.compute_units)
        # A GEMM of a few rows (decode: one per sequence) runs a small-M kernel, padded to
        # min_tile_m rows rather than a full tile: its time is then the weights' bytes, not FLOPs.
        skinny = hw.min_tile_m or hw.tile_m
        rows = np.minimum(hw.tile_m, _ceil_div(m, skinny) * skinny)
        per_unit_flops = hw.peak_tflops[self.workload.dtype] * 1e12 / hw.compute_units
        fraction = eff.attention if attention else eff.compute
        compute = waves * (2.0 * rows * hw.tile_n * k_pad / split) / (per_unit_flops * fraction)
        compute = compute * (1.0 + eff.half_rows / np.maximum(m, eff.ramp_floor_rows))
        if hw.pad_memory:
            m = _ceil_div(m, hw.tile_m) * hw.tile_m
            n = _ceil_div(n, hw.tile_n) * hw.tile_n
            k = k_pad
        moved = b * batch * (m * k + m * n)
        if weight_bytes is None:
            weight_bytes = b * batch * k * n
        # Weights resident on chip cost no off-chip traffic (decided per configuration).
        moved = moved + np.where(weights_resident, 0, weight_bytes)
        memory = moved / (hw.memory_bandwidth_gbs * 1e9 * eff.memory)
        return np.where(active, np.maximum(compute, memory) + self._overhead(), 0.0)

    def _elementwise(
        self, active: np.ndarray, rows: np.ndarray | int, cols: np.ndarray | int, tensors_moved: float
    ) -> np.ndarray:
        """Memory-bound op over a (rows, cols) tensor, reading and writing `tensors_moved` copies."""
        hw = self.profile
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        if hw.pad_memory:
            rows = _ceil_div(rows, hw.tile_m) * hw.tile_m
            cols = _ceil_div(cols, hw.tile_n) * hw.tile_n
        moved = (rows * cols).astype(np.float64) * tensors_moved * self.workload.bytes_per_element
        memory = moved / (self.profile.memory_bandwidth_gbs * 1e9 * self.efficiency.memory)
        return np.where(active, memory + self._overhead(), 0.0)

    def _overhead(self) -> float:
        return self.profile.launch_overhead_us * 1e-6 * self.efficiency.overhead

    def _weights_resident(
        self,
        units: np.ndarray,
        mlp: np.ndarray,
        experts: np.ndarray | None = None,
        expert_width: np.ndarray | None = None,
    ) -> np.ndarray:
        """Whether the block's weights fit in on-chip memory (else they stream from DRAM)."""
        cap = self.profile.on_chip_memory_mib
        if cap is None:
            return np.zeros(np.broadcast(units, mlp).shape, dtype=bool)
        params = self.spec.params(units, mlp, experts, expert_width)
        return params * self.workload.bytes_per_element <= cap * 2**20

    # ---------------------------------------------------------------- the block

    def op_times(
        self,
        units: np.ndarray,
        mlp: np.ndarray,
        experts: np.ndarray | None = None,
        expert_width: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Seconds of every operator of one block (0 where a skipped sub-layer removes it)."""
        s, w = self.spec, self.workload
        units, mlp = np.broadcast_arrays(np.asarray(units, dtype=np.int64), np.asarray(mlp, dtype=np.int64))
        heads = units * s.heads_per_unit
        attn, ffn, always = heads > 0, mlp > 0, np.ones(units.shape, dtype=bool)
        t, hd, hidden = w.tokens, s.head_dim, s.hidden
        # Resident weights are only modelled for devices that keep them on chip (NPU SRAM).
        resident = self._weights_resident(units, mlp, experts, expert_width)
        ops: dict[str, np.ndarray] = {}

        def project(active: np.ndarray, n: np.ndarray | int, k: np.ndarray | int) -> np.ndarray:
            return self._gemm(active, t, n, k, weights_resident=resident)

        ops["q_proj"] = project(attn, heads * hd, hidden)
        ops["k_proj"] = project(attn, units * hd, hidden)
        ops["v_proj"] = project(attn, units * hd, hidden)
        # Scores and context are batched over (batch x heads); the key/value cache is read once per
        # KV head, not per query head, which the explicit byte count says.
        kv_bytes = 2 * w.batch_size * units * w.attended * hd * w.bytes_per_element
        ops["attn_scores"] = self._gemm(
            attn,
            w.seq_len,
            w.attended,
            hd,
            batch=w.batch_size * heads,
            weight_bytes=kv_bytes // 2,
            attention=True,
        )
        ops["softmax"] = self._elementwise(attn, w.batch_size * heads * w.seq_len, w.attended, 2.0)
        ops["attn_context"] = self._gemm(
            attn,
            w.seq_len,
            hd,
            w.attended,
            batch=w.batch_size * heads,
            weight_bytes=kv_bytes // 2,
            attention=True,
        )
        if w.phase == "decode":
            # transformers' DynamicCache appends by concatenation: every step copies the whole
            # cache (read + write) besides reading it for attention; a static or paged cache would not.
            ops["kv_append"] = self._elementwise(attn, w.batch_size * units * w.attended, 2 * hd, 2.0)
        ops["o_proj"] = project(attn, hidden, heads * hd)
        ops["mlp_up"] = project(ffn, mlp, hidden)
        if s.gated_mlp:
            ops["mlp_gate"] = project(ffn, mlp, hidden)
        ops["activation"] = self._elementwise(ffn, t, mlp, 3.0 if s.gated_mlp else 2.0)
        ops["mlp_down"] = project(ffn, hidden, mlp)
        ops["norms"] = 2 * self._elementwise(always, t, hidden, 2.0)
        ops["residuals"] = 2 * self._elementwise(always, t, hidden, 3.0)
        if s.experts:
            ops |= self._expert_op_times(always, ffn, experts, expert_width)
        return ops

    def _expert_op_times(
        self,
        always: np.ndarray,
        shared: np.ndarray,
        experts: np.ndarray | None,
        expert_width: np.ndarray | None,
    ) -> dict[str, np.ndarray]:
        """Seconds of a mixture-of-experts block's router and routed experts.

        Each token goes to top_k of the kept experts. With routing spread evenly, an expert that
        receives tokens gets routed / active of them, and the number that receive any is its
        expectation under uniform routing (every kept expert in a long prefill, about `routed` of
        them in a one-token decode step): each active expert reads its own weights and runs its own
        small GEMMs, which is why expert count and expert width cost differently.
        """
        s, t, hidden = self.spec, self.workload.tokens, self.spec.hidden
        e, width = (np.broadcast_to(a, always.shape) for a in s.expert_widths(experts, expert_width))
        routed = t * s.top_k  # token-to-expert assignments
        active = e * (1.0 - (1.0 - 1.0 / e) ** routed)  # experts that receive any token
        rows = np.ceil(routed / active).astype(np.int64)  # tokens per active expert
        width = width.astype(np.int64)
        ops = {
            "router": self._gemm(always, t, e.astype(np.int64), hidden),
            "experts_gate_up": active * self._gemm(always, rows, 2 * width, hidden),
            "experts_activation": self._elementwise(always, routed, width, 3.0),
            "experts_down": active * self._gemm(always, rows, hidden, width),
            # gather each expert's tokens, weight and scatter-add its outputs back
            "experts_dispatch": 3 * self._elementwise(always, routed, hidden, 2.0),
            # an eager per-expert loop launches a few more kernels (index, where, scale) per expert
            "experts_launches": active * 4 * self._overhead(),
        }
        if s.mlp:
            ops["shared_expert_gate"] = self._gemm(shared, t, 1, hidden)
        return ops

    def outside_op_times(self) -> dict[str, float]:
        """Seconds of what runs outside the blocks, which pruning leaves as it is.

        The embedding gather and its combination/norm, the final norm, and the output head where
        the model has one (for an LM in prefill, logits at every position, as `transformers` does).
        """
        s, w = self.spec, self.workload
        one = np.ones((), dtype=bool)
        ops = {
            "embeddings": self._elementwise(one, w.tokens, s.hidden, 2.0),  # gather: read + write
            "embedding_norm": self._elementwise(one, w.tokens, s.hidden, 3.0),
            "final_norm": self._elementwise(one, w.tokens, s.hidden, 2.0),
        }
        if s.head_width:
            ops["head"] = self._gemm(one, w.tokens, s.head_width, s.hidden)
        return {name: float(t) for name, t in ops.items()}

    def block_latency_ms(
        self,
        units: np.ndarray,
        mlp: np.ndarray,
        experts: np.ndarray | None = None,
        expert_width: np.ndarray | None = None,
    ) -> np.ndarray:
        return sum(self.op_times(units, mlp, experts, expert_width).values()) * 1e3  # type: ignore[return-value]
