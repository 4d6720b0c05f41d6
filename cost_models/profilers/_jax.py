"""JAX/XLA profiler: the TPU path, testable on XLA:CPU. Times a jitted block with block_until_ready."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from hwprune.cost_models._spec import BlockSpec, Workload
from hwprune.cost_models.profilers._base import Profiler, ProfilerSettings, Timing, repeat_timed
from hwprune.errors import ConfigError

JAX_DTYPES = ("fp32", "bf16", "fp16")


def _jax() -> Any:
    try:
        import jax
    except ImportError as err:
        raise ImportError("the JAX profiler needs jax: pip install 'hwprune[jax]'") from err
    return jax


class JaxProfiler(Profiler):
    """Times blocks compiled by XLA on the first device of `platform`.

    Args:
        platform: JAX platform: "cpu", "tpu" or "gpu".
        warmup, repeats, seed: See `Profiler`; the first warm-up run includes compilation.
    """

    backend = "jax"

    def __init__(self, *, platform: str = "cpu", warmup: int = 3, repeats: int = 20, seed: int = 0) -> None:
        super().__init__(warmup=max(warmup, 1), repeats=repeats, seed=seed)
        jax = _jax()
        try:
            self.device = jax.devices(platform)[0]
        except RuntimeError as err:
            raise ConfigError(
                f"JAX has no {platform!r} device here ({err}); available: {jax.devices()}"
            ) from err

    @classmethod
    def configured(cls, settings: ProfilerSettings) -> JaxProfiler:
        return cls(platform=settings.device, warmup=settings.warmup, repeats=settings.repeats)

    def measure_block(self, spec: BlockSpec, workload: Workload, *, units: int, mlp: int) -> Timing:
        jax = _jax()
        jnp = jax.numpy
        if workload.dtype not in JAX_DTYPES:
            raise ConfigError(f"JAX profiler runs {list(JAX_DTYPES)}, not {workload.dtype!r}")
        dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}[workload.dtype]
        rng = np.random.default_rng(self.seed)
        hd, hidden, rep = spec.head_dim, spec.hidden, spec.heads_per_unit
        heads = units * rep
        b, t = workload.batch_size, workload.seq_len

        def weight(*shape: int) -> Any:
            return jax.device_put(jnp.asarray(rng.standard_normal(shape) * 0.02, dtype=dtype), self.device)

        params = {
            "q": weight(hidden, heads * hd),
            "k": weight(hidden, units * hd),
            "v": weight(hidden, units * hd),
            "o": weight(heads * hd, hidden),
            "up": weight(hidden, mlp),
            "gate": weight(hidden, mlp),
            "down": weight(mlp, hidden),
        }
        cache = None
        if workload.phase == "decode" and units:
            cache = (weight(b, units, workload.kv_len, hd), weight(b, units, workload.kv_len, hd))

        def norm(x: Any) -> Any:
            mean = x.mean(-1, keepdims=True) if spec.norm == "layernorm" else 0.0
            var = ((x - mean) ** 2).mean(-1, keepdims=True)
            return (x - mean) * jax.lax.rsqrt(var + 1e-6)

        def block(p: dict, x: Any, cache: Any) -> Any:
            if units:
                h = norm(x)
                q = (
                    (h @ p["q"]).reshape(b, t, units, rep, hd).transpose(0, 2, 3, 1, 4)
                )  # (B, nkv, rep, T, hd)
                k = (h @ p["k"]).reshape(b, t, units, hd).transpose(0, 2, 1, 3)  # (B, nkv, T, hd)
                v = (h @ p["v"]).reshape(b, t, units, hd).transpose(0, 2, 1, 3)
                if cache is not None:
                    k = jnp.concatenate([cache[0], k], axis=2)  # (B, nkv, S, hd)
                    v = jnp.concatenate([cache[1], v], axis=2)
                scores = jnp.einsum("bgrtd,bgsd->bgrts", q, k) / np.sqrt(hd)  # (B, nkv, rep, T, S)
                ctx = jnp.einsum("bgrts,bgsd->bgrtd", jax.nn.softmax(scores, axis=-1), v)
                x = x + ctx.transpose(0, 3, 1, 2, 4).reshape(b, t, heads * hd) @ p["o"]  # (B, T, hidden)
            if mlp:
                h = norm(x)
                a = jax.nn.silu(h @ p["gate"]) * (h @ p["up"]) if spec.gated_mlp else jax.nn.gelu(h @ p["up"])
                x = x + a @ p["down"]
            return x

        fn = jax.jit(block)
        x = jax.device_put(jnp.asarray(rng.standard_normal((b, t, hidden)), dtype=dtype), self.device)

        def run() -> float:
            t0 = time.perf_counter()
            fn(params, x, cache).block_until_ready()
            return (time.perf_counter() - t0) * 1e3

        return repeat_timed(run, warmup=self.warmup, repeats=self.repeats)

    def metadata(self) -> dict[str, Any]:
        jax = _jax()
        return super().metadata() | {
            "jax": jax.__version__,
            "platform": self.device.platform,
            "device_kind": getattr(self.device, "device_kind", str(self.device)),
        }
