"""ONNX Runtime profiler: the NPU path (QNN, OpenVINO, CoreML execution providers; CPU here).

The block is written directly as an ONNX graph, so what is timed does not depend on an exporter.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from hwprune.cost_models._spec import BlockSpec, Workload
from hwprune.cost_models.profilers._base import Profiler, ProfilerSettings, Timing, repeat_timed
from hwprune.errors import ConfigError

OPSET = 17
IR_VERSION = 8  # the IR of opset 17


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(
            "the ONNX Runtime profiler needs onnxruntime and onnx: pip install 'hwprune[onnx]'"
        ) from err
    return onnxruntime


def block_graph(spec: BlockSpec, workload: Workload, *, units: int, mlp: int, seed: int = 0) -> Any:
    """An ONNX model of one pre-norm block of the given widths (fp32), input "x" (B, T, hidden)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    b, t, hidden, hd, rep = (
        workload.batch_size,
        workload.seq_len,
        spec.hidden,
        spec.head_dim,
        spec.heads_per_unit,
    )
    heads = units * rep
    inits, nodes = [], []

    def const(name: str, value: Any) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(name: str, *shape: int) -> str:
        return const(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def layernorm(x: str, tag: str) -> str:
        return node(
            "LayerNormalization",
            [
                x,
                const(f"{tag}_g", np.ones(hidden, np.float32)),
                const(f"{tag}_b", np.zeros(hidden, np.float32)),
            ],
            f"{tag}_out",
            axis=-1,
        )

    def linear(x: str, tag: str, n_in: int, n_out: int) -> str:
        mm = node("MatMul", [x, weight(f"{tag}_w", n_in, n_out)], f"{tag}_mm")
        return node("Add", [mm, const(f"{tag}_b", np.zeros(n_out, np.float32))], f"{tag}_out")

    x = "x"
    if units:
        h = layernorm(x, "ln1")
        shape_q = const("shape_q", np.array([b, t, heads, hd], np.int64))
        shape_kv = const("shape_kv", np.array([b, t, units, hd], np.int64))
        q = node(
            "Transpose",
            [node("Reshape", [linear(h, "q", hidden, heads * hd), shape_q], "q_r")],
            "q_t",
            perm=[0, 2, 1, 3],
        )  # (B, nh, T, hd)
        k = node(
            "Transpose",
            [node("Reshape", [linear(h, "k", hidden, units * hd), shape_kv], "k_r")],
            "k_t",
            perm=[0, 2, 1, 3],
        )  # (B, nkv, T, hd)
        v = node(
            "Transpose",
            [node("Reshape", [linear(h, "v", hidden, units * hd), shape_kv], "v_r")],
            "v_t",
            perm=[0, 2, 1, 3],
        )
        if workload.phase == "decode":
            k = node("Concat", [weight("k_cache", b, units, workload.kv_len, hd), k], "k_all", axis=2)
            v = node("Concat", [weight("v_cache", b, units, workload.kv_len, hd), v], "v_all", axis=2)
        s = workload.attended
        if rep > 1:  # repeat each KV head for its query heads: (B, nkv, S, hd) -> (B, nh, S, hd)
            grouped = const("shape_g", np.array([b, units, 1, s, hd], np.int64))
            expand = const("shape_e", np.array([b, units, rep, s, hd], np.int64))
            flat = const("shape_f", np.array([b, heads, s, hd], np.int64))
            k = node(
                "Reshape",
                [node("Expand", [node("Reshape", [k, grouped], "k_g"), expand], "k_e"), flat],
                "k_rep",
            )
            v = node(
                "Reshape",
                [node("Expand", [node("Reshape", [v, grouped], "v_g"), expand], "v_e"), flat],
                "v_rep",
            )
        kt = node("Transpose", [k], "k_tt", perm=[0, 1, 3, 2])  # (B, nh, hd, S)
        scores = node("Mul", [node("MatMul", [q, kt], "qk"), const("scale", np.float32(hd**-0.5))], "scores")
        probs = node("Softmax", [scores], "probs", axis=-1)
        ctx = node(
            "Transpose", [node("MatMul", [probs, v], "ctx")], "ctx_t", perm=[0, 2, 1, 3]
        )  # (B, T, nh, hd)
        ctx = node("Reshape", [ctx, const("shape_ctx", np.array([b, t, heads * hd], np.int64))], "ctx_r")
        x = node("Add", [x, linear(ctx, "o", heads * hd, hidden)], "attn_res")
    if mlp:
        h = layernorm(x, "ln2")
        up = linear(h, "up", hidden, mlp)
        if spec.gated_mlp:
            g = linear(h, "gate", hidden, mlp)
            act = node("Mul", [node("Mul", [g, node("Sigmoid", [g], "sig")], "silu"), up], "act")
        else:  # exact GELU, 0.5 x (1 + erf(x / sqrt 2)); ORT fuses the pattern
            erf = node("Erf", [node("Mul", [up, const("inv_sqrt2", np.float32(2**-0.5))], "scaled")], "erf")
            one_plus = node("Add", [erf, const("one", np.float32(1.0))], "one_plus")
            act = node("Mul", [node("Mul", [up, one_plus], "x_gelu"), const("half", np.float32(0.5))], "act")
        x = node("Add", [x, linear(act, "down", mlp, hidden)], "mlp_res")
    if x == "x":  # nothing left: an identity keeps the graph valid
        x = node("Identity", [x], "identity")
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [b, t, hidden])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [b, t, hidden])],
        initializer=inits,
    )
    # Pin the IR version: a newer onnx writes IRs that released runtimes do not read yet.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


class OnnxRuntimeProfiler(Profiler):
    """Times blocks with ONNX Runtime on a chosen execution provider.

    Args:
        execution_provider: e.g. "CPUExecutionProvider", "QNNExecutionProvider",
            "OpenVINOExecutionProvider", "CoreMLExecutionProvider"; must be available in this build.
        threads: Intra-op threads (0 = ORT's default).
        warmup, repeats, seed: See `Profiler`.
    """

    backend = "onnxruntime"

    def __init__(
        self,
        *,
        execution_provider: str = "CPUExecutionProvider",
        threads: int = 0,
        warmup: int = 5,
        repeats: int = 20,
        seed: int = 0,
    ) -> None:
        super().__init__(warmup=warmup, repeats=repeats, seed=seed)
        ort = _ort()
        available = ort.get_available_providers()
        if execution_provider not in available:
            raise ConfigError(
                f"execution provider {execution_provider!r} is not in this onnxruntime build; available: {available}"
            )
        self.provider = execution_provider
        self.threads = threads

    @classmethod
    def configured(cls, settings: ProfilerSettings) -> OnnxRuntimeProfiler:
        return cls(
            execution_provider=settings.execution_provider or "CPUExecutionProvider",
            threads=settings.threads or 0,
            warmup=settings.warmup,
            repeats=settings.repeats,
        )

    def measure_block(self, spec: BlockSpec, workload: Workload, *, units: int, mlp: int) -> Timing:
        if workload.dtype != "fp32":
            raise ConfigError(f"ONNX Runtime profiler builds fp32 graphs, not {workload.dtype!r}")
        ort = _ort()
        model = block_graph(spec, workload, units=units, mlp=mlp, seed=self.seed)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), options, providers=[self.provider])
        x = (
            np.random.default_rng(self.seed)
            .standard_normal((workload.batch_size, workload.seq_len, spec.hidden))
            .astype(np.float32)
        )

        def run() -> float:
            t0 = time.perf_counter()
            session.run(None, {"x": x})
            return (time.perf_counter() - t0) * 1e3

        return repeat_timed(run, warmup=self.warmup, repeats=self.repeats)

    def metadata(self) -> dict[str, Any]:
        return super().metadata() | {"onnxruntime": _ort().__version__, "execution_provider": self.provider}
