"""Torch profiler: times a block on CPU (wall clock) or CUDA (CUDA events), with NVML metadata."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from hwprune.cost_models._spec import BlockSpec, Workload
from hwprune.cost_models.profilers._base import Profiler, ProfilerSettings, Timing, repeat_timed
from hwprune.cost_models.profilers._nvml import nvml_metadata
from hwprune.errors import ConfigError, UnsupportedModelError

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ReferenceBlock(nn.Module):
    """A transformer block of arbitrary per-layer widths, in plain torch ops.

    Pre-norm, separate Q/K/V/O projections, SDPA with grouped-query attention, GELU or SwiGLU MLP:
    the operators `transformers` blocks run. Zero units or zero neurons skip that sub-layer.
    """

    def __init__(self, spec: BlockSpec, *, units: int, mlp: int) -> None:
        super().__init__()
        self.spec, self.units, self.mlp = spec, units, mlp
        hd, hidden = spec.head_dim, spec.hidden
        heads = units * spec.heads_per_unit
        norm = nn.LayerNorm if spec.norm == "layernorm" else nn.RMSNorm
        self.norm1, self.norm2 = norm(hidden), norm(hidden)
        if units:
            self.q = nn.Linear(hidden, heads * hd)
            self.k = nn.Linear(hidden, units * hd)
            self.v = nn.Linear(hidden, units * hd)
            self.o = nn.Linear(heads * hd, hidden)
        if mlp:
            self.up = nn.Linear(hidden, mlp)
            self.gate = nn.Linear(hidden, mlp) if spec.gated_mlp else None
            self.down = nn.Linear(mlp, hidden)
        self.cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def prepare_decode(self, batch_size: int, kv_len: int) -> None:
        """Attach a KV cache of `kv_len` random tokens per sequence: calls are then decode steps."""
        if not self.units:
            return  # no attention: nothing reads a cache
        param = next(self.parameters())
        shape = (batch_size, self.units, kv_len, self.spec.head_dim)  # (B, kv heads, cached, hd)
        self.cache = (
            torch.randn(shape, device=param.device, dtype=param.dtype),
            torch.randn(shape, device=param.device, dtype=param.dtype),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        hd = self.spec.head_dim
        if self.units:
            h = self.norm1(x)
            q = self.q(h).view(b, t, -1, hd).transpose(1, 2)  # (B, nh, T, hd)
            k = self.k(h).view(b, t, -1, hd).transpose(1, 2)  # (B, nkv, T, hd)
            v = self.v(h).view(b, t, -1, hd).transpose(1, 2)  # (B, nkv, T, hd)
            if self.cache is not None:  # decode: attend to the cached tokens too
                k = torch.cat([self.cache[0], k], dim=2)  # (B, nkv, S, hd)
                v = torch.cat([self.cache[1], v], dim=2)
            ctx = nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=self.spec.heads_per_unit > 1)
            x = x + self.o(ctx.transpose(1, 2).reshape(b, t, -1))  # (B, T, nh*hd) -> (B, T, hidden)
        if self.mlp:
            h = self.norm2(x)
            a = (
                nn.functional.gelu(self.up(h))
                if self.gate is None
                else nn.functional.silu(self.gate(h)) * self.up(h)
            )
            x = x + self.down(a)
        return x


BlockFactory = Callable[[BlockSpec, int, int], nn.Module]


def torch_device(device: str) -> torch.device:
    """`device` ("cpu", "cuda" or "cuda:<index>") as a torch device this process can run on.

    Raises:
        ValueError: `device` is none of those.
        RuntimeError: A CUDA device that torch does not see.
    """
    valid = "valid choices: 'cpu', 'cuda', 'cuda:<index>'"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"unknown torch device {device!r}; {valid}") from err
    if parsed.type not in ("cpu", "cuda"):
        raise ConfigError(f"unknown torch device {device!r}; {valid}")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (parsed.index or 0) >= count:
            seen = f"only {count} CUDA device(s)" if count else "no CUDA device"
            raise ConfigError(f"device {device!r} requested but torch sees {seen}")
    return parsed


def torch_timer(run: Callable[[], object], device: torch.device | str = "cpu") -> Callable[[], float]:
    """`run` (a forward pass, say) as a callable that runs it once and returns the elapsed ms.

    On CUDA the time between events recorded on the stream before and after `run`: the device's
    time, including any gaps where it waited for the host to launch the next kernel, without the
    host's own time after the last launch. On CPU the wall clock. Runs under `torch.inference_mode`.

    Args:
        run: What to time; its result is discarded.
        device: Where `run` computes: "cpu" or "cuda[:i]".
    """
    device = torch_device(str(device))
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def run_cuda() -> float:
            with torch.inference_mode():
                start.record()
                run()
                end.record()
            torch.cuda.synchronize(device)
            return float(start.elapsed_time(end))

        return run_cuda

    def run_cpu() -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            run()
            return (time.perf_counter() - t0) * 1e3

    return run_cpu


def reference_block(spec: BlockSpec, units: int, mlp: int) -> nn.Module:
    return ReferenceBlock(spec, units=units, mlp=mlp)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch runs on `threads` CPU threads inside the block (None: as it is); restored after."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TorchProfiler(Profiler):
    """Times blocks with torch on "cpu" or "cuda".

    Args:
        device: "cpu" or "cuda[:i]".
        block_factory: Builds the block to time from (spec, units, mlp); defaults to
            `ReferenceBlock`. Pass a factory of real pruned model layers for the closest match.
        warmup, repeats, seed: See `Profiler`.
        threads: CPU threads for torch (None leaves torch's default).
        stack: Blocks run back to back per timed call, reported per block. A model's blocks run
            in sequence, each evicting the last one's weights from cache and overlapping dispatch
            with compute; a stack of the model's depth reproduces that, a lone block does not.
    """

    backend = "torch"

    def __init__(
        self,
        *,
        device: str = "cpu",
        block_factory: BlockFactory | None = None,
        warmup: int = 5,
        repeats: int = 20,
        seed: int = 0,
        threads: int | None = None,
        stack: int = 1,
    ) -> None:
        super().__init__(warmup=warmup, repeats=repeats, seed=seed)
        if stack < 1:
            raise ConfigError(f"stack must be >= 1, got {stack}")
        self.stack = stack
        self.device = torch_device(device)
        self.block_factory = block_factory or reference_block
        if threads is not None and threads < 1:
            raise ConfigError(f"threads must be >= 1 or None, got {threads}")
        self.threads = threads

    @classmethod
    def configured(cls, settings: ProfilerSettings) -> TorchProfiler:
        return cls(
            device=settings.device,
            block_factory=settings.block_factory,
            warmup=settings.warmup,
            repeats=settings.repeats,
            threads=settings.threads,
            stack=settings.stack,
        )

    def measure_block(self, spec: BlockSpec, workload: Workload, *, units: int, mlp: int) -> Timing:
        if workload.dtype not in TORCH_DTYPES:
            raise ConfigError(f"torch profiler runs {sorted(TORCH_DTYPES)}, not {workload.dtype!r}")
        # The profiler's threads and seed hold while it measures; the caller's are restored after.
        with torch_threads(self.threads), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self._measure(spec, workload, units=units, mlp=mlp)

    def _measure(self, spec: BlockSpec, workload: Workload, *, units: int, mlp: int) -> Timing:
        dtype = TORCH_DTYPES[workload.dtype]
        blocks = [
            self.block_factory(spec, units, mlp).to(self.device, dtype).eval() for _ in range(self.stack)
        ]
        x = torch.randn(workload.batch_size, workload.seq_len, spec.hidden, device=self.device, dtype=dtype)
        for block in blocks:
            if workload.phase == "decode":
                prepare = getattr(block, "prepare_decode", None)
                if prepare is None:
                    raise UnsupportedModelError(
                        f"{type(block).__name__} cannot run decode steps: it has no KV cache"
                    )
                prepare(workload.batch_size, workload.kv_len)
        stack = nn.Sequential(*blocks)
        t = repeat_timed(torch_timer(lambda: stack(x), self.device), warmup=self.warmup, repeats=self.repeats)
        return t.scaled(1.0 / self.stack)

    def metadata(self) -> dict[str, Any]:
        meta = super().metadata() | {
            "device": str(self.device),
            "torch": torch.__version__,
            "threads": self.threads or torch.get_num_threads(),
            "stack": self.stack,
            "block": getattr(self.block_factory, "__name__", type(self.block_factory).__name__),
        }
        if self.device.type == "cuda":
            index = self.device.index or 0
            meta["cuda_device"] = torch.cuda.get_device_name(index)
            meta["cuda_runtime"] = torch.version.cuda
            meta["nvml"] = nvml_metadata(index)
        return meta
